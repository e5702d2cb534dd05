"""A clerk in Chromium: signs in with the second factor, ticks two archived exams, makes
a share, downloads its Access Page; and watches a PACS transfer finish on the share page."""

import datetime
import re
import subprocess

import pytest
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from dicomgw.models import RetrieveJob
from sharing.models import Share
from sharing.services import PacsStudy, PatientIdentity, Recipient, share_create
from tests.conftest import CLERK_PASSWORD, totp_now

from .conftest import ADA_DOB, make_patient, make_study

pytestmark = pytest.mark.browser


def sign_in_on(page, clerk, path):
    page.goto(path)
    page.get_by_label("User name").fill(clerk.username)
    page.get_by_label("Password").fill(CLERK_PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    page.get_by_label("Code").fill(totp_now(TOTPDevice.objects.get(user=clerk)))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url(f"**{path}")


def test_a_clerk_shares_two_exams_and_downloads_a_one_page_access_page(
        transactional_db, page, facility, clerk, artifacts_dir, tmp_path):
    patient = make_patient(facility)
    make_study(patient, "CR", "CHEST 2 VIEW", datetime.date(2020, 3, 29))
    make_study(patient, "CT", "HEAD WITHOUT CONTRAST", datetime.date(2020, 2, 5))
    make_study(patient, "MR", "BREAST BILATERAL", datetime.date(2020, 1, 31))

    sign_in_on(page, clerk, f"/clerk/shares/new/?patient={patient.pk}")
    page.get_by_label("CHEST 2 VIEW").check()
    page.get_by_label("BREAST BILATERAL").check()
    page.get_by_label("Hand to the patient").check()
    page.get_by_label("Note to the recipient").fill("For Dr. Osler, cardiology.")
    page.evaluate("window.scrollTo(0, 0)")  # a sticky table head follows the scroll
    page.screenshot(path=artifacts_dir / "share-new.png", full_page=True)
    page.get_by_role("button", name="Create share and Access Page").click()

    page.wait_for_url("**/clerk/shares/*/")
    share = Share.objects.get()
    assert page.get_by_text("Share created.").is_visible()
    assert "Ready" in page.locator("#share-live").inner_text()
    page.screenshot(path=artifacts_dir / "share-detail.png", full_page=True)

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download PDF").click()
    download = download_info.value
    assert download.suggested_filename == f"access-page-{share.pk}.pdf"
    pdf = tmp_path / "access-page.pdf"
    download.save_as(pdf)
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert re.search(r"^Pages:\s+1$", info, re.MULTILINE)
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert "CR CHEST 2 VIEW" in text and "MR BREAST BILATERAL" in text
    assert "CT HEAD" not in text

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Shares").click()
    page.wait_for_url("**/clerk/shares/")
    assert "LOVELACE, ADA" in page.get_by_role("table").inner_text()
    page.screenshot(path=artifacts_dir / "share-list.png", full_page=True)


def test_the_share_page_shows_a_pacs_transfer_arriving_then_ready(
        transactional_db, page, facility, clerk, node, artifacts_dir):
    made = share_create(
        facility=facility, created_by=clerk, recipient=Recipient(method=Share.Method.PRINT),
        patient_or_identity=PatientIdentity(name="LOVELACE^ADA", patient_id="SMH-1815",
                                            birth_date=ADA_DOB),
        pacs_studies=[PacsStudy(node=node, study_instance_uid="1.2.3.4.5",
                                description="CT CHEST", study_date=datetime.date(2024, 1, 2),
                                modalities=("CT",), num_instances=40)],
    )
    job = RetrieveJob.objects.get()
    sign_in_on(page, clerk, f"/clerk/shares/{made.share.pk}/")
    live = page.locator("#share-live")
    assert "Transfer in progress" in live.inner_text()

    RetrieveJob.objects.filter(pk=job.pk).update(status="running", expected=40, archived=20,
                                                 updated_at=timezone.now())
    page.wait_for_function(
        "document.querySelector('#share-live').innerText.includes('20 / 40')")
    page.screenshot(path=artifacts_dir / "share-transferring.png", full_page=True)

    study = make_study(make_patient(facility), "CT", "CT CHEST", datetime.date(2024, 1, 2),
                       images=40, uid="1.2.3.4.5")
    RetrieveJob.objects.filter(pk=job.pk).update(status="complete", archived=40, study=study,
                                                 finished_at=timezone.now())
    page.wait_for_function(
        "document.querySelector('#share-live').innerText.includes('In the archive')")
    assert "every exam is in the archive" in live.inner_text()
    assert Share.objects.get().status == Share.Status.READY
