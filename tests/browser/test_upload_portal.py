"""An outside facility in Chromium: enters the PIN, reads the request, uploads the real
patient CD as a folder (all 67 images byte for byte, the JPEGs, README.TXT and
AUTORUN.INF listed and left out, the Japanese name shown), confirms; an upload whose
server goes down midway resumes by itself without sending a stored file again; a dropped
folder is read whole (its directories a few entries at a time) and uploaded; and a
request is declined."""

import datetime
import hashlib
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect
from pydicom import dcmread

from retrieval.models import RecordRequest, Upload, UploadedFile
from retrieval.services import request_create
from tests.retrieval.conftest import outside_facility, request_patient
from tests.servers import WebServer

pytestmark = pytest.mark.browser

CD = "cd_ihe_pdi_hitachi_mr_jp"
JAPANESE_NAME = "ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地"
SHOWN_NAME = "ﾌﾙﾊｼ, ﾀｲﾁ (古橋, 大地)"
TABLET = {"width": 768, "height": 1024}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture
def made(transactional_db, facility, clerk):
    return request_create(
        facility=facility, target=outside_facility(),
        patient=request_patient(name=JAPANESE_NAME, birth_date=datetime.date(1975, 3, 29)),
        details="MRI of the lumbar spine, January 2018, with the report if available.",
        created_by=clerk)


@pytest.fixture
def cd_dir(testdata_dir) -> Path:
    return testdata_dir / CD


def shoot(page, artifacts_dir, name, *, tablet=False):
    if tablet:
        page.set_viewport_size(TABLET)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts_dir / f"{name}{'-tablet' if tablet else ''}.png",
                    full_page=True)
    if tablet:
        page.set_viewport_size(DESKTOP)


def slow_uploads(page, bytes_per_second: int) -> None:
    """Chromium's own network emulation, so that an upload lasts long enough to watch."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1,
        "uploadThroughput": bytes_per_second})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disc_index(cd_dir: Path) -> dict[str, str]:
    """The DICOMDIR's referenced files: path below the disc's folder -> SOP Instance UID."""
    index = dcmread(cd_dir / "DICOMDIR")
    return {f"{CD}/" + "/".join(record.ReferencedFileID): record.ReferencedSOPInstanceUIDInFile
            for record in index.DirectoryRecordSequence if "ReferencedFileID" in record}


def assert_disc_archived(made, cd_dir: Path) -> None:
    """Every image the DICOMDIR lists arrived, byte for byte, and nothing else was
    archived from the disc."""
    upload = Upload.objects.get(request=made.request)
    stored = {row.path: row for row in UploadedFile.objects.filter(
        upload=upload, instance__isnull=False).select_related("instance")}
    expected = disc_index(cd_dir)
    assert len(expected) == 67
    assert set(stored) == set(expected)
    for path, row in stored.items():
        assert row.instance.sop_instance_uid == expected[path]
        with row.instance.file.open("rb") as fh:
            archived = hashlib.sha256(fh.read()).hexdigest()
        assert archived == sha256(cd_dir / path.split("/", 1)[1]) == row.instance.sha256


def enter_pin_and_begin(page, made) -> None:
    page.get_by_label("Upload PIN").fill(made.pin)
    page.get_by_role("button", name="Begin").click()
    page.wait_for_url("**/request")
    page.get_by_role("button", name="Ready to Upload").click()
    page.wait_for_url("**/files")


def test_the_patient_cd_is_uploaded_as_a_folder_and_confirmed(
        made, page, cd_dir, artifacts_dir):
    slug = made.request.facility.short_name
    page.goto(f"/upload/{slug}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Send imaging records")
    shoot(page, artifacts_dir, "upload-1-pin")
    shoot(page, artifacts_dir, "upload-1-pin", tablet=True)

    page.get_by_label("Upload PIN").fill(f"{(int(made.pin) + 1) % 10**6:06d}")
    page.get_by_role("button", name="Begin").click()
    expect(page.get_by_role("alert")).to_contain_text("This PIN does not open a request")
    shoot(page, artifacts_dir, "upload-1-pin-wrong")

    page.get_by_label("Upload PIN").fill(made.pin)
    page.get_by_role("button", name="Begin").click()
    page.wait_for_url("**/request")
    expect(page.get_by_role("heading", level=1)).to_have_text(SHOWN_NAME)
    expect(page.locator(".u-details")).to_contain_text("MRI of the lumbar spine")
    shoot(page, artifacts_dir, "upload-2-request")
    shoot(page, artifacts_dir, "upload-2-request", tablet=True)

    page.get_by_role("button", name="Ready to Upload").click()
    page.wait_for_url("**/files")
    shoot(page, artifacts_dir, "upload-3-choose")
    shoot(page, artifacts_dir, "upload-3-choose", tablet=True)

    page.locator("[data-folder-input]").set_input_files(cd_dir)
    expect(page.locator("[data-chosen-name]")).to_have_text(f"Folder “{CD}”")
    expect(page.locator("[data-chosen-summary]")).to_have_text("249 files, 39.4 MB")
    shoot(page, artifacts_dir, "upload-4-chosen")

    slow_uploads(page, 6_000_000)
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("[data-active] li").first).to_be_visible()
    page.wait_for_function("Number(document.querySelector('[data-count=images]').textContent)"
                           " >= 20")
    shoot(page, artifacts_dir, "upload-5-progress")
    shoot(page, artifacts_dir, "upload-5-progress", tablet=True)

    page.wait_for_url("**/review", timeout=120_000)
    assert_disc_archived(made, cd_dir)
    expect(page.get_by_role("heading", name=SHOWN_NAME)).to_be_visible()
    expect(page.locator(".u-stats dd").first).to_have_text("67")
    expect(page.locator(".u-missing")).to_have_count(0)
    skipped = page.locator("[data-skipped]")
    for name in ("README.TXT", "AUTORUN.INF", "LBLPRINT.JPG", "IHE_PDI/IMAGE/D0000000.JPG",
                 "IHE_PDI/THUMBNIL/D0000066.JPG", "IHE_PDI/DESIGN/GO_NEXT.GIF"):
        expect(skipped).to_contain_text(f"{CD}/{name}")
    expect(page.locator(".u-list summary").last).to_contain_text(
        "182 files are not DICOM and were left out")
    page.locator(".u-list summary").last.click()
    shoot(page, artifacts_dir, "upload-6-review")
    shoot(page, artifacts_dir, "upload-6-review", tablet=True)

    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url("**/done")
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Success! Your upload is processing")
    expect(page.locator(".u-done-summary")).to_contain_text("67 images · 1 study")
    shoot(page, artifacts_dir, "upload-7-done")
    shoot(page, artifacts_dir, "upload-7-done", tablet=True)
    made.request.refresh_from_db()
    assert made.request.status == RecordRequest.Status.RECEIVED


# What Chromium hands a page for a dropped folder: FileSystemEntry objects, a directory
# read through a reader that returns its entries a few at a time (at most 100 per call in
# Chromium) until it returns none. A test cannot drop a folder from the desktop, so the
# same objects are made in the page around the disc's real files (read through a file
# input), handing out fewer entries per call than Chromium does, and dropped.
DROP_FOLDER = """([files, perCall]) => {
  const root = {name: "", children: new Map()};
  for (const file of files) {
    const parts = file.webkitRelativePath.split("/");
    let dir = root;
    parts.slice(0, -1).forEach((part, i) => {
      if (!dir.children.has(part)) {
        dir.children.set(part, {name: part, children: new Map(),
                                path: "/" + parts.slice(0, i + 1).join("/")});
      }
      dir = dir.children.get(part);
    });
    dir.children.set(parts[parts.length - 1], {file, path: "/" + file.webkitRelativePath});
  }
  let calls = 0;
  const entry = (node) => node.file ? {
    isFile: true, isDirectory: false, name: node.file.name, fullPath: node.path,
    file: (resolve) => setTimeout(() => resolve(node.file), 0),
  } : {
    isFile: false, isDirectory: true, name: node.name, fullPath: node.path,
    createReader: () => {
      const left = Array.from(node.children.values());
      return {readEntries: (resolve) => setTimeout(() => {
        calls += 1;
        resolve(left.splice(0, perCall).map(entry));
      }, 0)};
    },
  };
  const top = Array.from(root.children.values())[0];
  const event = new Event("drop", {bubbles: true, cancelable: true});
  Object.defineProperty(event, "dataTransfer", {value: {
    items: [{webkitGetAsEntry: () => entry(top)}], files: [], dropEffect: "none"}});
  document.querySelector("[data-drop]").dispatchEvent(event);
  return new Promise((resolve) => {
    const wait = () => document.querySelector("[data-chosen]").hidden
      ? setTimeout(wait, 20) : resolve(calls);
    wait();
  });
}"""


def test_a_dropped_folder_is_read_whole_and_uploaded(made, page, cd_dir, artifacts_dir):
    page.goto(f"/upload/{made.request.facility.short_name}")
    enter_pin_and_begin(page, made)
    page.evaluate("""() => {
      const input = document.createElement("input");
      input.type = "file"; input.webkitdirectory = true; input.id = "disc-files";
      input.hidden = true;
      document.body.append(input);
    }""")
    page.locator("#disc-files").set_input_files(cd_dir)
    disc = page.locator("#disc-files").evaluate_handle("input => Array.from(input.files)")
    calls = page.evaluate(DROP_FOLDER, [disc, 7])
    # Every folder read to its end: 7 entries a call, then the call that returns none.
    folders = [cd_dir, *(p for p in cd_dir.rglob("*") if p.is_dir())]
    assert calls == sum(-(-len(list(f.iterdir())) // 7) + 1 for f in folders)
    expect(page.locator("[data-chosen-name]")).to_have_text(f"Folder “{CD}”")
    expect(page.locator("[data-chosen-summary]")).to_have_text("249 files, 39.4 MB")

    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_url("**/review", timeout=120_000)
    assert_disc_archived(made, cd_dir)
    expect(page.locator(".u-stats dd").first).to_have_text("67")
    expect(page.locator(".u-missing")).to_have_count(0)


def test_a_dropped_folder_that_cannot_be_read_says_so(made, page, cd_dir):
    page.goto(f"/upload/{made.request.facility.short_name}")
    enter_pin_and_begin(page, made)
    page.evaluate("""() => {
      const folder = {isFile: false, isDirectory: true, name: "DISC", fullPath: "/DISC",
        createReader: () => ({readEntries: (resolve, reject) =>
          setTimeout(() => reject(new DOMException("gone", "NotReadableError")), 0)})};
      const event = new Event("drop", {bubbles: true, cancelable: true});
      Object.defineProperty(event, "dataTransfer", {value: {
        items: [{webkitGetAsEntry: () => folder}], files: [], dropEffect: "none"}});
      document.querySelector("[data-drop]").dispatchEvent(event);
    }""")
    expect(page.locator("[data-drop] .u-drop-title")).to_have_text(
        "The folder could not be read. Choose it with the button below instead.")
    expect(page.locator("[data-chosen]")).to_be_hidden()
    page.locator("[data-folder-input]").set_input_files(cd_dir)
    expect(page.locator("[data-chosen-summary]")).to_have_text("249 files, 39.4 MB")


# --- A server that goes down midway --------------------------------------------------


@pytest.fixture
def web_server(transactional_db, tmp_path):
    """A server whose upload page sends four files to a request, so that a disc is a
    score of requests, several in flight whenever the server goes down."""
    server = WebServer(tmp_path, UPLOAD_BATCH_FILES="4")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def impatient_web_server(transactional_db, tmp_path):
    """A server whose upload page gives a request up after 4 s without a sign of life."""
    server = WebServer(tmp_path, UPLOAD_STALL_SECONDS="4")
    server.start()
    yield server
    server.stop()


def settled_images(made) -> int:
    return UploadedFile.objects.filter(upload__request=made.request,
                                       outcome=UploadedFile.Outcome.STORED).count()


def upload_until_stored(page, made, cd_dir, *, bytes_per_second: int, stored: int) -> None:
    """Start uploading the disc at ``bytes_per_second`` and wait until at least
    ``stored`` of its images are."""
    page.goto(f"/upload/{made.request.facility.short_name}")
    enter_pin_and_begin(page, made)
    page.locator("[data-folder-input]").set_input_files(cd_dir)
    slow_uploads(page, bytes_per_second)
    page.get_by_role("button", name="Upload", exact=True).click()
    deadline = time.monotonic() + 60
    while settled_images(made) < stored:
        assert time.monotonic() < deadline, "the upload did not get going"
        time.sleep(0.05)


def expect_whole_disc_reviewed(page, *, timeout: float) -> None:
    page.wait_for_url("**/review", timeout=timeout)
    expect(page.locator(".u-stats dd").first).to_have_text("67")
    expect(page.locator(".u-missing")).to_have_count(0)


def test_an_upload_resumes_after_the_server_goes_down_without_sending_a_file_twice(
        made, browser, web_server, cd_dir, artifacts_dir):
    context = browser.new_context(base_url=web_server.url, viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        upload_until_stored(page, made, cd_dir, bytes_per_second=3_000_000, stored=20)
        web_server.kill()
        before = settled_images(made)
        assert before < 67
        offline = page.locator("[data-offline]")
        expect(offline).to_be_visible()
        expect(offline).to_contain_text("Connection lost.")
        shoot(page, artifacts_dir, "upload-5-offline")
        time.sleep(3)
        web_server.start()

        expect_whole_disc_reviewed(page, timeout=180_000)
    finally:
        context.close()

    assert_disc_archived(made, cd_dir)
    log = web_server.log_path.read_text()
    # The files went several to a request; none was sent after it was stored.
    accepted = re.findall(r'"POST /upload/[\w-]+/batch HTTP/1\.1" 200', log)
    assert 1 <= len(accepted) < 67 - before
    assert "sent again after it was settled" not in log
    assert log.count("Starting development server") == 2


def test_an_upload_whose_server_stops_answering_carries_on_once_it_answers_again(
        made, browser, impatient_web_server, cd_dir, artifacts_dir):
    """The requests in flight neither fail nor finish while the server is frozen: the
    page gives them up, says the connection is lost, and finishes the disc when the
    server answers again."""
    server = impatient_web_server
    context = browser.new_context(base_url=server.url, viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        upload_until_stored(page, made, cd_dir, bytes_per_second=1_000_000, stored=10)
        server.freeze()
        before = settled_images(made)
        assert before < 67
        offline = page.locator("[data-offline]")
        expect(offline).to_be_visible(timeout=20_000)
        expect(offline).to_contain_text("Connection lost.")
        time.sleep(2)
        server.thaw()

        expect_whole_disc_reviewed(page, timeout=120_000)
    finally:
        context.close()
    assert_disc_archived(made, cd_dir)


def test_a_facility_with_no_records_declines_the_request(made, page, artifacts_dir):
    page.goto(f"/upload/{made.request.facility.short_name}")
    page.get_by_label("Upload PIN").fill(made.pin)
    page.get_by_role("button", name="Begin").click()
    page.get_by_role("link", name="Decline this request").click()
    page.wait_for_url("**/decline")
    shoot(page, artifacts_dir, "upload-decline")
    page.get_by_role("button", name="Decline the request").click()
    expect(page.locator(".field-error").first).to_be_visible()
    page.get_by_label("No records for this patient").check()
    page.get_by_role("button", name="Decline the request").click()
    page.wait_for_url("**/declined")
    expect(page.get_by_role("heading", level=1)).to_have_text("Thank you for your answer")
    shoot(page, artifacts_dir, "upload-declined")
    shoot(page, artifacts_dir, "upload-declined", tablet=True)
    made.request.refresh_from_db()
    assert made.request.status == "declined"
    assert made.request.decline_reason == "No records for this patient"
