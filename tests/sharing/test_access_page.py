"""The Access Page PDF: every field, exactly one page whatever goes on it, a QR code that
opens /view with the code (never the date of birth), and a renderer that fetches nothing
but our own assets."""

import datetime
import http.server
import re
import threading

import pytest
from django.core.files.base import ContentFile

from pockethealth.codes import code_format
from sharing.models import Share
from sharing.pdf import AssetFetcher, access_page_for, access_page_html, access_page_pdf
from sharing.services import Recipient, share_create

from .conftest import (
    ADA_DOB,
    fax_recipient,
    free_port,
    make_patient,
    make_study,
    pdf_pages,
    pdf_png,
    pdf_text,
    qr_payloads,
)


def squash(text: str) -> str:
    return " ".join(text.split())


def make_share(facility, clerk, patient, studies, recipient=None):
    return share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=recipient or fax_recipient(), created_by=clerk)


def many_studies(patient, count, description="CT CHEST ABDOMEN PELVIS WITH CONTRAST"):
    start = datetime.date(2024, 1, 1)
    return [make_study(patient, "CT", f"{description} {n}", start - datetime.timedelta(days=n))
            for n in range(count)]


def test_a_faxed_access_page_carries_every_field(facility, clerk, patient, studies,
                                                 fax_gateway, tmp_path):
    facility.support_phone = "555-0177"
    facility.save()
    made = make_share(facility, clerk, patient, studies)
    text = squash(pdf_text(made.share.access_page.read(), tmp_path))

    for expected in [
        "St. Anthony's Memorial Hospital", "Medical Imaging Records Transfer",
        "Powered by ImageLink",
        "Attn:", "Film Library, Palm Beach MRI Clinic", "Subject:", "Chart transfer request",
        "From:", "Note:", "Thanks - SMH film library",
        "Institution:", "Patient Name:", "LOVELACE, ADA", "DOB:", "1981/08/29", "YYYY/MM/DD",
        "How to Access Imaging", "images.example.org/view", code_format(made.code),
        "patient's date of birth",
        "What's Included", "CR CHEST 2 VIEW", "Mar 29, 2020", "CT HEAD WITHOUT CONTRAST",
        "Feb 05, 2020", "MR BREAST BILATERAL", "Jan 31, 2020",
        "Access Expiry:", "9 months",
        "Quality:", "DIAGNOSTIC", "Compression:", "None", "Format:", "DICOM",
        "How to View", "How to Download/Import", "Having trouble?",
        "1-800-555-0199", "support@imagelink.example", "555-0177",
    ]:
        assert expected in text, expected
    # Newest exam first.
    assert text.index("CR CHEST 2 VIEW") < text.index("CT HEAD") < text.index("MR BREAST")
    assert "more exam" not in text


def test_the_expiry_prints_in_the_facility_time_zone(facility, clerk, patient, studies,
                                                     tmp_path):
    facility.time_zone = "America/Vancouver"
    facility.save()
    made = share_create(
        facility=facility, patient_or_identity=patient, studies=studies,
        recipient=Recipient(method=Share.Method.PRINT), created_by=clerk,
        now=datetime.datetime(2024, 3, 1, 6, 30, tzinfo=datetime.UTC),
    )
    text = squash(pdf_text(made.share.access_page.read(), tmp_path))
    # 30 days after 06:30 UTC on March 1 is 23:30 the evening before in Vancouver, where
    # daylight saving time has begun in between.
    assert "Mar 30, 2024" in text
    assert "2024-03-30 23:30 PDT" in text


def test_the_fax_block_appears_only_when_faxed(facility, clerk, patient, studies,
                                               fax_gateway, tmp_path):
    handed = make_share(facility, clerk, patient, studies[:1],
                        Recipient(method=Share.Method.PATIENT, note="Bring to Dr. Osler"))
    faxed = make_share(facility, clerk, patient, studies[:1])
    handed_text = squash(pdf_text(handed.share.access_page.read(), tmp_path))
    faxed_text = squash(pdf_text(faxed.share.access_page.read(), tmp_path))
    for label in ("Attn:", "Subject:", "From:"):
        assert label in faxed_text
        assert label not in handed_text
    assert "Bring to Dr. Osler" in handed_text
    assert "Institution:" in handed_text and "LOVELACE, ADA" in handed_text


def test_the_qr_code_opens_view_with_the_code_and_never_the_birth_date(
        facility, clerk, patient, studies, tmp_path):
    made = make_share(facility, clerk, patient, studies,
                      Recipient(method=Share.Method.PATIENT))
    png = pdf_png(made.share.access_page.read(), tmp_path, dpi=200)
    payloads = qr_payloads(png)
    assert payloads == [f"https://images.example.org/view?code={made.code}"]
    for form in ("1981", "19810829", "1981-08-29", "08/29"):
        assert form not in payloads[0]


@pytest.mark.parametrize("exam_count", [1, 40])
def test_the_page_is_one_page_for_one_exam_and_for_forty(facility, clerk, patient,
                                                         fax_gateway, tmp_path, exam_count):
    made = make_share(facility, clerk, patient, many_studies(patient, exam_count))
    pdf = made.share.access_page.read()
    assert pdf_pages(pdf, tmp_path) == 1
    text = squash(pdf_text(pdf, tmp_path))
    if exam_count == 1:
        assert "more exam" not in text
    else:
        shown = len(re.findall(r"CT CHEST ABDOMEN PELVIS WITH CONTRAST \d+", text))
        assert shown >= 3
        assert f"+ {exam_count - shown} more exams" in text
        # The newest are the ones listed.
        assert "CONTRAST 0" in text and "CONTRAST 39" not in text


def test_the_page_stays_one_page_with_a_long_note_and_very_long_names(
        facility, clerk, fax_gateway, tmp_path):
    facility.name = ("The Very Long Named Regional Health Sciences Centre " * 4)[:200]
    facility.save()
    patient = make_patient(
        facility, name="Wolfeschlegelsteinhausenbergerdorff-Featherstonehaugh^"
                       "Maximiliana Anastasia Konstantina^Bartholomew-Fitzwilliam^Dr.^III",
    )
    studies = many_studies(patient, 40, description="X" * 64)
    note = ("Please compare with the prior studies from 2019; the referring physician "
            "asked for the full series. Call the film library if anything is missing. "
            "Extension 4471: ask for the supervisor on duty, please")
    assert len(note) == 200
    made = make_share(facility, clerk, patient, studies, fax_recipient(
        note=note, attn="A" * 120, institution="Palm Beach " * 18,
        subject="Subject " * 15,
    ))
    pdf = made.share.access_page.read()
    assert pdf_pages(pdf, tmp_path) == 1
    text = squash(pdf_text(pdf, tmp_path))
    assert code_format(made.code) in text
    assert "1981/08/29" in text
    assert "WOLFESCHLEGELSTEINHAUSENBERGERDORFF" in text.replace(" ", "")
    assert "Having trouble?" in text  # the end of the page is still on it


def test_an_unbreakable_300_character_note_is_clipped_not_spilled(
        facility, clerk, patient, fax_gateway, tmp_path):
    made = make_share(facility, clerk, patient, many_studies(patient, 8),
                      fax_recipient(note="N" * 300))
    assert pdf_pages(made.share.access_page.read(), tmp_path) == 1


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def bait_server():
    _CountingHandler.hits = []
    server = http.server.HTTPServer(("127.0.0.1", free_port()), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_markup_in_a_note_or_name_is_printed_as_text_and_fetches_nothing(
        facility, clerk, fax_gateway, tmp_path, bait_server):
    bait = f"http://127.0.0.1:{bait_server.server_port}/x.png"
    patient = make_patient(facility, name=f'<img src="{bait}">^Ada')
    made = make_share(facility, clerk, patient, [make_study(patient, "CT", "HEAD",
                                                            datetime.date(2020, 1, 1))],
                      fax_recipient(note=f'<img src="{bait}"><link rel=stylesheet '
                                         'href="file:///etc/passwd">'))
    text = squash(pdf_text(made.share.access_page.read(), tmp_path))
    assert "<img src=" in text
    assert "file:///etc/passwd" in text
    assert bait_server.RequestHandlerClass.hits == []


def test_the_renderer_refuses_the_network_and_local_files_even_in_raw_html(
        facility, clerk, patient, studies, tmp_path, bait_server):
    """Should markup ever reach the template unescaped, the fetcher still refuses."""
    made = make_share(facility, clerk, patient, studies,
                      Recipient(method=Share.Method.PATIENT))
    page = access_page_for(made.share, made.code)
    bait = f"http://127.0.0.1:{bait_server.server_port}/x.png"
    html = access_page_html(page).replace(
        "</body>",
        f'<img src="{bait}"><img src="file:///etc/passwd">'
        '<img src="https://example.com/x.png"><link rel="stylesheet" href="/etc/passwd">'
        "</body>",
    )
    from weasyprint import HTML

    from sharing.pdf import ASSET_ORIGIN

    fetcher = AssetFetcher()
    HTML(string=html, base_url=f"{ASSET_ORIGIN}/", url_fetcher=fetcher).write_pdf()
    assert bait_server.RequestHandlerClass.hits == []
    assert bait in fetcher.refused
    assert "file:///etc/passwd" in fetcher.refused
    assert "https://example.com/x.png" in fetcher.refused
    assert f"{ASSET_ORIGIN}/etc/passwd" in fetcher.refused
    # What it did serve: our stylesheet and data: URIs (the QR code).
    assert fetcher.served and all(
        url == "data:" or url.startswith(f"{ASSET_ORIGIN}/static/sharing/")
        for url in fetcher.served)


def test_the_facilitys_logo_is_embedded_and_an_svg_logo_is_ignored(
        facility, clerk, patient, studies, tmp_path):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (240, 80), (11, 90, 122)).save(buffer, "PNG")
    facility.logo.save("logo.png", ContentFile(buffer.getvalue()))
    page = access_page_for(
        make_share(facility, clerk, patient, studies[:1],
                   Recipient(method=Share.Method.PRINT)).share, "K3Q2PBKF1")
    assert page.logo_data_uri.startswith("data:image/png;base64,")
    fetcher = AssetFetcher()
    assert pdf_pages(access_page_pdf(page, fetcher=fetcher), tmp_path) == 1
    assert not fetcher.refused

    facility.logo.save("logo.svg", ContentFile(
        b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>'))
    page = access_page_for(
        make_share(facility, clerk, patient, studies[1:2],
                   Recipient(method=Share.Method.PRINT)).share, "K3Q2PBKF1")
    assert page.logo_data_uri == ""


def test_the_birth_date_on_the_page_is_the_patients(facility, clerk, patient, studies,
                                                    tmp_path):
    made = make_share(facility, clerk, patient, studies, Recipient(method=Share.Method.PRINT))
    text = squash(pdf_text(made.share.access_page.read(), tmp_path))
    assert text.count(ADA_DOB.strftime("%Y/%m/%d")) == 2  # patient details and step 3
