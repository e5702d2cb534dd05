"""A recipient in Chromium: opens a clerk's share of demo studies with the code and date
of birth, sees the exams newest first, extends access once, downloads a ZIP whose
DICOMDIR and files check out; and watches a transfer finish on the inbox."""

import datetime
import hashlib
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import expect
from pydicom.fileset import FileSet

from dicomgw import media
from dicomgw.demo import TREMBLAY, demo_studies_load
from dicomgw.models import Instance, MediaJob, Patient, RetrieveJob, Study
from pockethealth.codes import code_format, code_generate
from sharing.models import Share
from sharing.services import PacsStudy, PatientIdentity, Recipient, share_create
from tests.sharing.conftest import make_patient, make_study

pytestmark = pytest.mark.browser

TABLET = {"width": 768, "height": 1024}


@pytest.fixture
def demo_share(transactional_db, facility, clerk):
    """The demo archive, and a share of Marie Tremblay's exams (a recent CT and a chest
    radiograph from three years before) as the clerk makes it."""
    report = demo_studies_load(facility=facility, ct_slices=12, today=datetime.date.today())
    assert not report.problems, report.problems
    patient = Patient.objects.get(facility=facility, patient_id=TREMBLAY.patient_id)
    studies = list(Study.objects.filter(patient=patient))
    assert len(studies) == 2
    return share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=Recipient(method=Share.Method.PRINT,
                                            institution="Palm Beach MRI Clinic"),
                        created_by=clerk)


def shoot(page, artifacts_dir, name, *, tablet=False):
    if tablet:
        page.set_viewport_size(TABLET)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts_dir / f"{name}{'-tablet' if tablet else ''}.png",
                    full_page=True)
    if tablet:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_a_recipient_opens_the_share_sees_exams_newest_first_and_extends_once(
        demo_share, page, artifacts_dir):
    page.goto("/view")
    shoot(page, artifacts_dir, "recipient-view")
    shoot(page, artifacts_dir, "recipient-view", tablet=True)

    # A mistyped code: the plain answer, the date of birth kept, the code to type again.
    page.get_by_label("Security code").fill(code_format(code_generate()))
    page.get_by_label("Patient's date of birth").fill("1961/03/14")
    page.get_by_role("button", name="Open the Share Inbox").click()
    assert page.get_by_role("alert").inner_text().startswith(
        "The security code and date of birth do not match")
    shoot(page, artifacts_dir, "recipient-view-wrong")

    page.get_by_label("Security code").fill(code_format(demo_share.code).lower())
    page.get_by_label("Patient's date of birth").fill("1961-03-14")
    page.get_by_role("button", name="Open the Share Inbox").click()
    page.wait_for_url("**/view/inbox")
    assert page.get_by_role("heading", level=1).inner_text() == "TREMBLAY, Marie Louise"
    dates = page.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert len(dates) == 2 and dates == sorted(dates, reverse=True)
    descriptions = page.locator("tbody tr td.r-desc label").all_inner_texts()
    assert descriptions == ["CT CHEST ABDOMEN PELVIS W CONTRAST", "XR CHEST 2 VIEWS"]
    assert page.get_by_role("button", name="Download ZIP").is_disabled()
    shoot(page, artifacts_dir, "recipient-inbox")
    shoot(page, artifacts_dir, "recipient-inbox", tablet=True)

    page.get_by_role("button", name="Extend").click()
    page.wait_for_url("**/view/inbox")
    assert "Access extended until" in page.get_by_role("status").first.inner_text()
    assert page.get_by_role("button", name="Extend").count() == 0
    share = Share.objects.get(pk=demo_share.share.pk)
    assert share.extended
    shoot(page, artifacts_dir, "recipient-inbox-extended")

    page.get_by_role("link", name="View").first.click()
    page.wait_for_url("**/view/app/viewer?StudyInstanceUIDs=*")
    expect(page.locator('[data-cy="study-browser-thumbnail"]').first).to_contain_text(
        "PORTAL VENOUS", timeout=60_000)
    shoot(page, artifacts_dir, "recipient-exam")
    page.get_by_role("link", name="Share Inbox").click()
    page.wait_for_url("**/view/inbox")

    page.get_by_role("button", name="Leave").click()
    page.wait_for_url("**/view")
    assert "You have left the Share Inbox" in page.get_by_role("status").inner_text()
    page.goto("/view/inbox")
    page.wait_for_url("**/view")

    # Ten wrong dates of birth later (someone else, elsewhere), the right pair is told
    # the share is locked and whom to call.
    Share.objects.filter(pk=share.pk).update(locked_at=share.created_at)
    page.get_by_label("Security code").fill(demo_share.code)
    page.get_by_label("Patient's date of birth").fill("1961/03/14")
    page.get_by_role("button", name="Open the Share Inbox").click()
    assert page.get_by_role("heading", level=1).inner_text() == "This share is locked"
    shoot(page, artifacts_dir, "recipient-locked")


@pytest.fixture
def offline_viewer(settings, tmp_path):
    """A stand-in for the offline viewer's folder (the viewer is its own issue)."""
    folder = tmp_path / "viewer"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>Offline viewer</title>")
    settings.MEDIA_VIEWER_DIR = str(folder)
    return folder


def test_the_ticked_exams_download_as_a_zip_whose_dicomdir_reads_back(
        demo_share, page, artifacts_dir, tmp_path, offline_viewer):
    page.goto(f"/view?code={demo_share.code}")
    page.wait_for_url("**/view")
    assert page.get_by_label("Security code").input_value() == code_format(demo_share.code)
    page.get_by_label("Patient's date of birth").fill("14/03/1961")
    page.get_by_role("button", name="Open the Share Inbox").click()
    page.wait_for_url("**/view/inbox")

    page.get_by_label("Select every exam").check()
    assert page.get_by_text("2 exams selected.").is_visible()
    page.get_by_label("Include the DICOM viewer").check()
    shoot(page, artifacts_dir, "recipient-inbox-selected")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download ZIP").click()
    download = info.value
    assert download.suggested_filename == "IMAGES_Tremblay.zip"
    path = tmp_path / "images.zip"
    download.save_as(path)
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "x")
    root = tmp_path / "x" / "IMAGES_Tremblay"
    file_set = FileSet(root / "DICOMDIR")
    instances = Instance.objects.filter(series__study__patient__patient_id=TREMBLAY.patient_id)
    assert len(file_set) == instances.count()
    expected = set(instances.values_list("sha256", flat=True))
    found = {hashlib.sha256(Path(item.path).read_bytes()).hexdigest() for item in file_set}
    assert found == expected
    assert (root / "IHE_PDI" / "index.html").is_file() and (root / "INDEX.HTM").is_file()


def test_a_disk_image_is_prepared_while_the_recipient_waits_then_downloaded(
        demo_share, page, artifacts_dir, tmp_path):
    page.goto("/view")
    page.get_by_label("Security code").fill(demo_share.code)
    page.get_by_label("Patient's date of birth").fill("1961/03/14")
    page.get_by_role("button", name="Open the Share Inbox").click()
    page.wait_for_url("**/view/inbox")
    page.locator('input[name="exam"]').first.check()
    page.get_by_role("button", name="Download Disk Image").click()
    page.wait_for_url("**/view/inbox")
    job = MediaJob.objects.get()
    assert job.owner_ref == f"share:{demo_share.share.pk}"
    assert "Waiting" in page.locator(f"#media-job-{job.pk}").inner_text()
    shoot(page, artifacts_dir, "recipient-inbox-iso-waiting")

    media.iso_build(job_id=job.pk)  # what the worker does
    link = page.get_by_role("link", name="Download the disk image")
    link.wait_for()
    shoot(page, artifacts_dir, "recipient-inbox-iso-ready")
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "ISO_Tremblay.iso"
    path = tmp_path / "disc.iso"
    download.save_as(path)
    with open(path, "rb") as fh:
        fh.seek(16 * 2048 + 1)
        assert fh.read(5) == b"CD001"


def test_the_inbox_follows_a_transfer_and_offers_the_exam_when_it_arrives(
        transactional_db, page, facility, clerk, artifacts_dir):
    from dicomgw.models import PacsNode

    node = PacsNode.objects.create(facility=facility, name="Main PACS", ae_title="MAINPACS",
                                   host="127.0.0.1", port=1)
    made = share_create(
        facility=facility, created_by=clerk, recipient=Recipient(method=Share.Method.PRINT),
        patient_or_identity=PatientIdentity(name="LOVELACE^ADA", patient_id="SMH-1815",
                                            birth_date=datetime.date(1981, 8, 29)),
        pacs_studies=[PacsStudy(node=node, study_instance_uid="1.2.3.4.5.6",
                                description="CT HEAD WITHOUT CONTRAST",
                                study_date=datetime.date(2025, 2, 5), modalities=("CT",),
                                num_instances=120)])
    job = RetrieveJob.objects.get()
    RetrieveJob.objects.filter(pk=job.pk).update(status="running", archived=30, expected=120,
                                                 remaining=90)
    page.goto("/view")
    page.get_by_label("Security code").fill(made.code)
    page.get_by_label("Patient's date of birth").fill("1981/08/29")
    page.get_by_role("button", name="Open the Share Inbox").click()
    page.wait_for_url("**/view/inbox")
    transfer = page.locator("#transfer")
    assert "Transfer in progress" in transfer.inner_text() and "25%" in transfer.inner_text()
    assert page.locator('input[name="exam"]').is_disabled()
    shoot(page, artifacts_dir, "recipient-inbox-transfer")

    RetrieveJob.objects.filter(pk=job.pk).update(archived=90)
    page.wait_for_function(
        "document.querySelector('#transfer .r-pct').textContent.trim() === '75%'")

    # The last images arrive: the page reloads once and offers the exam.
    patient = make_patient(facility)
    study = make_study(patient, "CT", "CT HEAD WITHOUT CONTRAST", datetime.date(2025, 2, 5),
                       images=120, uid="1.2.3.4.5.6")
    RetrieveJob.objects.filter(pk=job.pk).update(status="complete", archived=120,
                                                 remaining=0, study=study)
    page.wait_for_selector("#transfer", state="detached")
    assert page.locator('input[name="exam"]').is_enabled()
    assert page.get_by_role("link", name="View").count() == 1
