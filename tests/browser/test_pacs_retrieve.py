"""A clerk signs in (password and authenticator code) in Chromium, checks the connection
to the PACS, searches Orthanc, ticks a study and retrieves it through a real Celery
worker into our storage SCP, watching the progress until it is complete."""

import datetime
import os
import re
import signal

from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import expect

from dicomgw.models import Instance, RetrieveJob
from tests.conftest import CLERK_PASSWORD, totp_now

# The gateway's peer fixtures, for this test outside their folder.
from tests.dicomgw.conftest import orthanc, pacs_node_for, scp_port, scp_server  # noqa: F401
from tests.dicomgw.pacs_helpers import ct_files, make_patient, make_study

PATIENT = make_patient("Abernathy-Quinn", "Harriet", "BR-880001", datetime.date(1966, 4, 21))
CT = make_study("br-ct", PATIENT, description="CT CHEST ABD PELVIS", accession="BRACC0001")
SLICES = 240


def test_a_clerk_searches_the_pacs_retrieves_a_study_and_watches_it_arrive(
        page, orthanc, scp_server, celery_worker, pacs_node_for, clerk, facility,  # noqa: F811
        artifacts_dir, tmp_path):
    files = ct_files(tmp_path / "files", CT, slices=SLICES)
    for path in files:
        orthanc.upload(path)
    node = pacs_node_for(orthanc, name="Main PACS")

    page.goto("/clerk/pacs/")
    assert "/account/login/" in page.url
    page.get_by_label("User name").fill(clerk.username)
    page.get_by_label("Password").fill(CLERK_PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    device = TOTPDevice.objects.get(user=clerk, confirmed=True)
    page.get_by_label("Code").fill(totp_now(device))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url("**/clerk/pacs/")

    expect(page.get_by_label("PACS", exact=True)).to_have_value(str(node.pk))
    page.get_by_role("button", name="Check connection").click()
    expect(page.locator("#verify-result")).to_contain_text(
        "The PACS answered the verification (C-ECHO)")

    page.get_by_label("Patient name").fill("abernathy")
    page.get_by_label("Modality").select_option("CT")
    page.get_by_role("button", name="Search", exact=True).click()
    results = page.locator("#pacs-results")
    expect(results).to_contain_text("1 study found")
    row = results.get_by_role("row").filter(has_text="ABERNATHY-QUINN, Harriet")
    expect(row).to_contain_text("BR-880001")
    expect(row).to_contain_text("1966/04/21")
    expect(row).to_contain_text("CT CHEST ABD PELVIS")
    expect(row).to_contain_text(str(SLICES))
    expect(row).to_contain_text("Not yet")
    assert "abernathy" not in page.url
    page.screenshot(path=artifacts_dir / "pacs-search.png", full_page=True)

    row.get_by_role("checkbox").check()
    # The study arrives in well under a second, between two of the page's looks: the
    # PACS is held still (SIGSTOP) until the page has shown the retrieve in progress.
    os.kill(orthanc.process.pid, signal.SIGSTOP)
    try:
        page.get_by_role("button", name="Retrieve selected studies").click()
        page.wait_for_url(re.compile(r".*/clerk/pacs/retrieves/\d+/$"))
        job = RetrieveJob.objects.get()
        progress = page.locator("#job-progress")
        expect(progress.locator(".status")).to_have_text("In progress", timeout=30_000)
        page.screenshot(path=artifacts_dir / "pacs-retrieve-progress.png", full_page=True)
    finally:
        os.kill(orthanc.process.pid, signal.SIGCONT)
    expect(progress.get_by_role("progressbar")).not_to_have_attribute(
        "aria-valuenow", "0", timeout=30_000)

    expect(progress.locator(".status")).to_have_text("Complete", timeout=120_000)
    expect(progress).to_contain_text(f"The study is in the archive: all {SLICES} images.")
    expect(progress.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    page.screenshot(path=artifacts_dir / "pacs-retrieve-complete.png", full_page=True)
    job.refresh_from_db()
    assert job.status == "complete"
    assert Instance.objects.filter(facility=facility).count() == SLICES

    page.get_by_role("link", name="Open the study in the archive").click()
    page.wait_for_url("**/clerk/archive/studies/**")
    expect(page.get_by_role("heading", level=1)).to_have_text("CT CHEST ABD PELVIS")

    # And back: the clerk sends the archived study to the PACS.
    page.get_by_role("link", name="Send to PACS").click()
    page.wait_for_url("**/clerk/pacs/send/**")
    expect(page.get_by_label("Send to")).to_have_value(str(node.pk))
    page.screenshot(path=artifacts_dir / "pacs-send.png", full_page=True)
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_url(re.compile(r".*/clerk/pacs/pushes/\d+/$"))
    progress = page.locator("#job-progress")
    expect(progress.locator(".status")).to_have_text("Complete", timeout=120_000)
    expect(progress).to_contain_text(f"The PACS accepted the study: all {SLICES} images.")
    page.screenshot(path=artifacts_dir / "pacs-push-complete.png", full_page=True)

    page.goto("/clerk/pacs/retrieves/")
    expect(page.get_by_role("table")).to_contain_text("ABERNATHY-QUINN, Harriet")
    page.screenshot(path=artifacts_dir / "pacs-retrieves.png", full_page=True)

    # Searching again now shows the study as in the archive.
    page.goto("/clerk/pacs/")
    expect(page.locator("#pacs-results")).to_contain_text("In archive")
