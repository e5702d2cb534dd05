"""In Chromium: a clerk makes a record request, hands the tablet to the patient, who draws
their signature with the mouse, and downloads the one-page Request Page that carries it.
And a patient who uses only the keyboard signs through a signing link with their typed
name."""

import datetime
import re
import subprocess

from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import expect

from pockethealth.codes import pin_matches
from retrieval.models import PatientConsent, RecordRequest
from retrieval.services import OutsideFacility, RequestPatient, consent_link_issue, request_create
from tests.conftest import CLERK_PASSWORD, totp_now

TABLET = {"width": 820, "height": 1180}


def sign_in(page, clerk, next_path: str) -> None:
    page.goto(next_path)
    page.get_by_label("User name").fill(clerk.username)
    page.get_by_label("Password").fill(CLERK_PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    page.get_by_label("Code").fill(totp_now(TOTPDevice.objects.get(user=clerk, confirmed=True)))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url(f"**{next_path}")


def draw_signature(page) -> None:
    """A signature drawn with the mouse: three strokes across the pad."""
    box = page.locator("canvas[data-pad]").bounding_box()
    left, top = box["x"] + 40, box["y"] + box["height"] / 2
    for stroke in range(3):
        page.mouse.move(left + stroke * 150, top)
        page.mouse.down()
        for step in range(1, 25):
            page.mouse.move(left + stroke * 150 + step * 5,
                            top + (30 if step % 4 < 2 else -30) + stroke * 5, steps=2)
        page.mouse.up()


def test_a_clerk_makes_a_request_the_patient_signs_on_the_tablet_and_the_page_is_downloaded(
        page, live_server, settings, clerk, facility, artifacts_dir, tmp_path):
    settings.SITE_URL = live_server.url
    sign_in(page, clerk, "/clerk/requests/new/")

    page.get_by_label("Family name").fill("Anthony")
    page.get_by_label("Given names").fill("Ryan")
    page.get_by_label("Date of birth").fill("1986-12-29")
    page.get_by_label("MRN (your facility)").fill("SAM-4471")
    page.get_by_label("Facility name").fill("Mercy Hospital St. Louis")
    page.get_by_label("Attention").fill("Film Library")
    page.get_by_label("Request details").fill("Chest X-ray, 2019 to 2021")
    page.get_by_label("Print or download").check()
    page.get_by_label("The patient signs now, on this screen or a tablet").check()
    page.screenshot(path=artifacts_dir / "record-request-new.png", full_page=True)
    page.get_by_role("button", name="Create request and Request Page").click()
    page.wait_for_url(re.compile(r".*/clerk/requests/\d+/sign/$"))
    made = RecordRequest.objects.get()
    assert made.awaits_consent

    # The tablet, handed to the patient: no clerical menu, the authorization to read.
    page.set_viewport_size(TABLET)
    expect(page.get_by_role("heading", name="Authorization to release imaging records")
           ).to_be_visible()
    expect(page.locator("nav.mainnav")).to_have_count(0)
    expect(page.locator(".sign-text")).to_contain_text(
        "I, Ryan Anthony, authorize Mercy Hospital St. Louis to release")
    # Signing without a signature says what is missing.
    page.get_by_label("Your full name").fill("Ryan Anthony")
    page.get_by_label("I have read the authorization above and I agree to it.").check()
    page.get_by_role("button", name="Sign", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("Draw your signature in the box")
    assert not PatientConsent.objects.exists()

    draw_signature(page)
    expect(page.locator("[data-pad-status]")).to_have_text("Signature drawn.")
    page.get_by_label("I have read the authorization above and I agree to it.").check()
    page.screenshot(path=artifacts_dir / "record-request-sign-tablet.png", full_page=True)
    page.get_by_role("button", name="Sign", exact=True).click()
    expect(page.get_by_role("heading", name="Thank you, your authorization is signed")
           ).to_be_visible()

    consent = PatientConsent.objects.get(request=made)
    assert consent.signature_kind == PatientConsent.SignatureKind.DRAWN
    assert consent.channel == PatientConsent.Channel.TABLET and consent.collected_by == clerk
    assert consent.user_agent and consent.address == "127.0.0.1"
    from PIL import Image

    with Image.open(consent.signature.open("rb")) as image:
        # The pad draws at the screen's density; three strokes leave plenty of ink.
        assert image.width >= 500 and sum(image.histogram()[:128]) > 500

    # Back with the clerk: the request, signed, and its page.
    page.get_by_role("link", name="Back to the request (staff)").click()
    page.set_viewport_size({"width": 1280, "height": 900})
    expect(page.locator("h1")).to_have_text("ANTHONY, Ryan")
    expect(page.get_by_role("heading", name="Patient's signed authorization")).to_be_visible()
    expect(page.locator(".timeline")).to_contain_text("Request made")
    page.screenshot(path=artifacts_dir / "record-request-detail.png", full_page=True)

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download PDF").click()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Requests").click()
    expect(page.locator("#request-results")).to_contain_text("ANTHONY, Ryan")
    page.screenshot(path=artifacts_dir / "record-request-list.png", full_page=True)
    pdf = tmp_path / "request-page.pdf"
    download_info.value.save_as(pdf)
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert re.search(r"^Pages:\s+1$", info, re.MULTILINE)
    assert re.search(r"^Page size:\s+612 x 792 pts \(letter\)", info, re.MULTILINE)
    text = " ".join(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True,
                                   text=True).stdout.split())
    assert "Signed Patient Authorization" in text and "Name: Ryan Anthony" in text
    assert "Patient DOB: 19861229" in text
    pin = re.search(r"upload PIN(?: \d)? (\d{6})\b", text)[1]
    made.refresh_from_db()
    assert pin_matches(pin, made.pin_hash)
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True,
                             text=True).stdout.splitlines()[2:]
    assert len(listing) == 1  # the drawn signature
    subprocess.run(["pdftoppm", "-r", "80", "-png", "-singlefile", str(pdf),
                    str(artifacts_dir / "record-request-page")], check=True)


def test_a_keyboard_user_signs_through_a_link_with_their_typed_name(
        browser, live_server, settings, clerk, facility):
    settings.SITE_URL = live_server.url
    made = request_create(
        facility=facility, target=OutsideFacility(name="Mercy Hospital St. Louis"),
        patient=RequestPatient(name="ANTHONY^Ryan", birth_date=datetime.date(1986, 12, 29)),
        details="Chest X-ray", created_by=clerk, consent_requested=True,
    ).request
    link = consent_link_issue(record_request=made, by=clerk)

    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto(link)
        expect(page.get_by_role("heading", name="Authorization to release imaging records")
               ).to_be_visible()
        page.get_by_label("Your full name").focus()
        page.keyboard.type("Ryan Anthony")
        # Tab through to the "typed name" box and the agreement, as a keyboard user does.
        for label in ("I cannot draw a signature here: my typed name above is my signature.",
                      "I have read the authorization above and I agree to it."):
            box = page.get_by_label(label)
            for _press in range(10):
                if box.evaluate("el => el === document.activeElement"):
                    break
                page.keyboard.press("Tab")
            page.keyboard.press("Space")
            expect(box).to_be_checked()
        page.get_by_role("button", name="Sign", exact=True).focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Thank you, your authorization is signed")
               ).to_be_visible()
    finally:
        context.close()
    consent = PatientConsent.objects.get(request=made)
    assert consent.signature_kind == PatientConsent.SignatureKind.TYPED
    assert consent.channel == PatientConsent.Channel.LINK and consent.typed_name == "Ryan Anthony"
