"""A clerk signs in with a second factor, searches the PACS (Orthanc), ticks two exams,
shares them, watches the transfer reach Ready and downloads a one-page Access Page."""

import datetime
import re
import subprocess

from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import expect

from sharing.models import Share
from tests.conftest import CLERK_PASSWORD, totp_now

# The gateway's peer fixtures, for this test outside their folder.
from tests.dicomgw.conftest import orthanc, pacs_node_for, scp_port, scp_server  # noqa: F401
from tests.dicomgw.pacs_helpers import ct_files, make_patient, make_study, mr_files

PATIENT = make_patient("Lovelace", "Ada", "SH-100200", datetime.date(1981, 8, 29))
CT = make_study("sh-ct", PATIENT, description="CT HEAD", accession="SHACC0001", days_ago=20)
MR = make_study("sh-mr", PATIENT, modality="MR", description="MR BRAIN", accession="SHACC0002",
                days_ago=400)


def test_a_clerk_shares_two_pacs_exams_and_downloads_the_access_page(
        page, orthanc, scp_server, celery_worker, pacs_node_for, clerk, facility,  # noqa: F811
        artifacts_dir, tmp_path):
    for path in [*ct_files(tmp_path / "ct", CT, slices=30),
                 *mr_files(tmp_path / "mr", MR, slices=6)]:
        orthanc.upload(path)
    pacs_node_for(orthanc, name="Main PACS")

    page.goto("/clerk/pacs/")
    page.get_by_label("User name").fill(clerk.username)
    page.get_by_label("Password").fill(CLERK_PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    page.get_by_label("Code").fill(totp_now(TOTPDevice.objects.get(user=clerk, confirmed=True)))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url("**/clerk/pacs/")

    page.get_by_label("Patient name").fill("lovelace")
    page.get_by_role("button", name="Search", exact=True).click()
    results = page.locator("#pacs-results")
    expect(results).to_contain_text("2 studies found")
    for checkbox in results.get_by_role("checkbox").all():
        checkbox.check()
    page.get_by_role("button", name="Share selected…").click()

    page.get_by_label("Hand to the patient").check()
    page.get_by_role("button", name="Create share and Access Page").click()
    page.wait_for_url(re.compile(r".*/clerk/shares/\d+/$"))
    share = Share.objects.get()
    live = page.locator("#share-live")
    expect(live).to_contain_text("Ready", timeout=120_000)
    page.screenshot(path=artifacts_dir / "pacs-share-ready.png", full_page=True)
    share.refresh_from_db()
    assert share.status == "ready"

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download PDF").click()
    pdf = tmp_path / "access-page.pdf"
    download_info.value.save_as(pdf)
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert re.search(r"^Pages:\s+1$", info, re.MULTILINE)
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert "LOVELACE, Ada" in text and "1981/08/29" in text
    assert "CT HEAD" in text and "MR BRAIN" in text and "CT CT HEAD" not in text
    assert text.index("CT HEAD") < text.index("MR BRAIN")  # newest first
    subprocess.run(["pdftoppm", "-r", "80", "-png", "-singlefile", str(pdf),
                    str(artifacts_dir / "pacs-share-access-page")], check=True)
