"""The Request Page PDF, read back with poppler (pdftotext, pdfinfo, pdfimages) and zbar:
what it says, one sheet whatever the lengths, the signed section only when signed, a QR
code that leads to the upload link, and nothing fetched while rendering."""

import re
import shutil
import subprocess

from pockethealth.codes import pin_matches
from retrieval.models import PatientConsent
from retrieval.pdf import request_page_for, request_page_html, request_page_pdf
from retrieval.services import (
    consent_sign,
    name_as_read,
    request_page_issue,
    upload_address,
    upload_link,
    upload_token_hash,
)
from sharing.pdf import AssetFetcher
from tests.sharing.conftest import pdf_pages, pdf_png, pdf_text, qr_payloads

from .conftest import outside_facility, request_patient, signature_png

# 1,000 characters (the most a request takes), the last words easy to find.
LAST_WORDS = " Last: XR left knee."
LONG_DETAILS = (("CT abdomen and pelvis with contrast, all priors since 2015; MRI lumbar "
                 "spine and the radiology reports. ") * 12)[:1000 - len(LAST_WORDS)]
LONG_DETAILS = LONG_DETAILS.rstrip().ljust(1000 - len(LAST_WORDS), ".") + LAST_WORDS


def page_bytes(record_request) -> bytes:
    record_request.refresh_from_db()
    with record_request.request_page.open("rb") as fh:
        return fh.read()


def images(pdf: bytes, tmp_path) -> list[list[str]]:
    """The raster images of the PDF (``pdfimages -list``), one row of columns each."""
    path = tmp_path / "images.pdf"
    path.write_bytes(pdf)
    listing = subprocess.run(["pdfimages", "-list", str(path)], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    return [line.split() for line in listing[2:] if line.strip()]


def flat(text: str) -> str:
    return " ".join(text.split())


def printed_pin(text: str) -> str:
    """The PIN under step 2 (pdftotext may put the number of step 3 before it)."""
    return re.search(r"upload PIN(?: \d)? (\d{6})\b", text)[1]


def test_the_page_has_what_the_outside_facility_needs(record_request, tmp_path, facility):
    made, pin, token = record_request()
    pdf = page_bytes(made)
    assert pdf_pages(pdf, tmp_path) == 1
    text = flat(pdf_text(pdf, tmp_path))
    assert "Medical Record Request" in text
    assert "Attn: Film Library, Mercy Hospital St. Louis" in text
    assert "Subject: Medical Record Request for Ryan ANTHONY" in text
    assert "From: St. Anthony's Memorial Hospital" in text
    assert ("This is an authorized request from St. Anthony's Memorial Hospital for the "
            "release of medical imaging records for patient Ryan ANTHONY") in text
    assert "Records Requested" in text
    assert "Patient Name: Ryan ANTHONY" in text
    assert "Patient DOB: 19861229 YYYYMMDD" in text
    assert "Request Details: Chest X-ray, 2019 to 2021" in text
    assert "Transfer Instructions" in text
    assert "images.example.org/upload/st-anthony" in text.replace("/ ", "/")
    assert upload_address(facility) == "https://images.example.org/upload/st-anthony"
    assert printed_pin(text) == pin and pin_matches(printed_pin(text), made.pin_hash)
    assert "Don't have the requested records?" in text and "Decline" in text
    assert "Contact St. Anthony's Memorial Hospital ☎ 555-0100 Fax 555-0101" in text
    assert "Signed Patient Authorization" not in text
    assert "replaces any earlier Request Page" not in text
    # The QR code is vector (SVG): no raster image on an unsigned page.
    assert images(pdf, tmp_path) == []


def test_the_qr_code_leads_to_the_upload_link_with_a_long_token(record_request, tmp_path):
    made, _pin, token = record_request()
    payloads = qr_payloads(pdf_png(page_bytes(made), tmp_path, dpi=200))
    link = upload_link(made, token)
    assert payloads == [link]
    assert link == f"https://images.example.org/upload/st-anthony?t={token}"
    assert len(token) >= 22 and upload_token_hash(token) == made.link_token_hash


def test_long_names_and_a_1000_character_request_fit_one_page_signed_or_not(
        record_request, tmp_path, artifacts_dir):
    long_family = "Featherstonehaugh-Cholmondeley-Marjoribanks"
    made, _pin, _token = record_request(
        patient=request_patient(name=f"{long_family}^Alexandra Josephine Maximiliana"),
        target=outside_facility(
            name="The Regional Academic Health Sciences Centre for Diagnostic Imaging "
                 "and Interventional Radiology of the Greater Metropolitan Area",
            attn="Health Information Management, Release of Information Department"),
        details=LONG_DETAILS[:1000])
    assert len(made.details) == 1000
    pdf = page_bytes(made)
    assert pdf_pages(pdf, tmp_path) == 1
    text = flat(pdf_text(pdf, tmp_path))
    assert long_family in text.replace("- ", "-").replace(" -", "-")
    assert LAST_WORDS.strip() in text  # the whole of the details, not clipped

    consent_sign(record_request=made, typed_name="Alexandra Featherstonehaugh",
                 signature_png=signature_png(), channel=PatientConsent.Channel.TABLET)
    signed = page_bytes(made)
    assert pdf_pages(signed, tmp_path) == 1
    shutil.copy(pdf_png(signed, tmp_path, dpi=100), artifacts_dir / "request-page-long.png")


def test_the_signed_section_appears_with_the_signature_once_signed(
        record_request, tmp_path, artifacts_dir):
    made, pin, _token = record_request()
    consent, codes = consent_sign(record_request=made, typed_name="Ryan Anthony",
                                  signature_png=signature_png(),
                                  channel=PatientConsent.Channel.TABLET)
    pdf = page_bytes(made)
    text = flat(pdf_text(pdf, tmp_path))
    assert pdf_pages(pdf, tmp_path) == 1
    assert "Signed Patient Authorization" in text
    assert ("I, Ryan ANTHONY, authorize Mercy Hospital St. Louis to release the medical "
            "imaging records described in this request to St. Anthony's Memorial "
            "Hospital.") in text
    assert "through ImageLink, a secure record exchange platform" in text
    assert "Patient Signature" in text and "Name: Ryan Anthony" in text
    assert f"Date: {consent.signed_on:%Y-%m-%d}" in text
    # The new page carries a new PIN, and says the old page no longer works.
    assert printed_pin(text) == codes.pin and pin_matches(codes.pin, made.pin_hash)
    assert not pin_matches(pin, made.pin_hash) or pin == codes.pin
    assert "the earlier PIN no longer works" in text
    # The signature is the one raster image, at the size it was drawn.
    (row,) = images(pdf, tmp_path)
    assert row[2] == "image" and (row[3], row[4]) == ("600", "200")
    shutil.copy(pdf_png(pdf, tmp_path, dpi=100), artifacts_dir / "request-page-signed.png")


def test_a_reissued_page_says_it_replaces_the_earlier_one(record_request, clerk, tmp_path):
    made, _pin, _token = record_request()
    codes = request_page_issue(record_request=made, by=clerk)
    text = flat(pdf_text(page_bytes(made), tmp_path))
    assert printed_pin(text) == codes.pin
    assert "This page replaces any earlier Request Page for this patient" in text


def test_a_japanese_name_is_printed_in_both_forms(record_request, tmp_path):
    made, _pin, _token = record_request(
        patient=request_patient(name="Yamada^Tarou=山田^太郎=やまだ^たろう"))
    assert name_as_read(made.patient_name) == "Tarou Yamada (山田, 太郎 / やまだ, たろう)"
    text = flat(pdf_text(page_bytes(made), tmp_path))
    assert "Tarou Yamada (山田, 太郎 / やまだ, たろう)" in text


def test_rendering_fetches_nothing_but_our_own_stylesheet(record_request):
    made, pin, token = record_request()
    consent_sign(record_request=made, typed_name="Ryan Anthony",
                 signature_png=signature_png(), channel=PatientConsent.Channel.TABLET)
    made.refresh_from_db()
    page = request_page_for(record_request=made, pin=pin, link=upload_link(made, token),
                            upload_address="images.example.org/upload/st-anthony",
                            patient_name="<img src='https://evil.example/x.png'>",
                            issued_on=made.created_at.date())
    assert "<img src='https" not in request_page_html(page)  # escaped, never markup
    fetcher = AssetFetcher()
    request_page_pdf(page, fetcher=fetcher)
    assert fetcher.refused == []
    assert any(url.endswith("/static/retrieval/request_page.css") for url in fetcher.served)


def test_names_at_their_longest_still_fit_and_the_signed_text_is_whole(record_request,
                                                                        tmp_path):
    """The longest the form takes: 150-character family and given names, a 200-character
    facility with a 120-character attention line, 1,000 characters of details."""
    family = ("Wolfeschlegelsteinhausenbergerdorff " * 5)[:150].strip()
    target = ("Regional Academic Health Sciences Centre " * 5)[:200].strip()
    made, _pin, _token = record_request(
        patient=request_patient(name=f"{family}^{family.lower()}"),
        target=outside_facility(name=target, attn=("Release of Information " * 6)[:120]),
        details=LONG_DETAILS)
    consent_sign(record_request=made, typed_name="Alexandra Featherstonehaugh",
                 signature_png=signature_png(), channel=PatientConsent.Channel.TABLET)
    pdf = page_bytes(made)
    assert pdf_pages(pdf, tmp_path) == 1
    text = flat(pdf_text(pdf, tmp_path))
    assert "retrieval of the information in them." in text  # the last words signed
    assert LAST_WORDS.strip() in text
    assert len(images(pdf, tmp_path)) == 1
