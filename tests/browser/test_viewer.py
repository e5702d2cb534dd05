"""The browser viewer (OHIF, served by us) in Chromium: a recipient presses View in the
Share Inbox and reads the exam at once; a clerk opens an archived study from its page.

Every test checks what the viewer draws, from the viewport's own canvas: an image that
is not blank, different after a window/level preset and after scrolling to the next
slice. Every request the page makes goes to our server and is answered; none is left
unanswered or refused (which also proves that no file the viewer loads was trimmed)."""

import datetime
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from django_otp.plugins.otp_totp.models import TOTPDevice
from PIL import Image
from playwright.sync_api import expect
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomgw.models import IngestSource, Study
from dicomgw.services import ingest_file
from pockethealth.models import AuditEvent
from sharing.models import Share
from sharing.services import Recipient, share_create
from tests.conftest import CLERK_PASSWORD, totp_now
from tests.dicomgw.pacs_helpers import ct_files, make_patient, make_study
from viewer.ohif import ohif_installed

pytestmark = pytest.mark.browser

CORPUS_CT = "encapsulation_variants/multi-frame/CT0012.explicit_little_endian.dcm"
VIEWPORT = "div.cornerstone-viewport-element"
SLICE = '[data-cy="viewport-overlay-bottom-right"]'
WINDOW = '[data-cy="viewport-overlay-bottom-left"]'
FIRST_IMAGE_SECONDS = 60

# What the viewport's canvas holds: mean and spread of its grey levels, how many levels
# occur, and a 48x48 thumbnail of it to compare two states.
CANVAS_JS = """(selector) => {
  const canvas = document.querySelector(selector + ' canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const {width, height} = canvas;
  const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
  const grid = 48, thumb = new Array(grid * grid).fill(0), counts = new Array(grid * grid).fill(0);
  const levels = new Set();
  let n = 0, sum = 0, squares = 0;
  for (let y = 0; y < height; y += 2) {
    for (let x = 0; x < width; x += 2) {
      const i = (y * width + x) * 4;
      const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
      n++; sum += grey; squares += grey * grey; levels.add(Math.round(grey));
      const cell = Math.floor(y * grid / height) * grid + Math.floor(x * grid / width);
      thumb[cell] += grey; counts[cell]++;
    }
  }
  const mean = sum / n;
  return {mean, std: Math.sqrt(Math.max(0, squares / n - mean * mean)), levels: levels.size,
          thumb: thumb.map((v, i) => counts[i] ? v / counts[i] : 0)};
}"""


@pytest.fixture(autouse=True)
def _viewer_installed():
    assert ohif_installed() is not None, "the OHIF viewer is not installed: run `make ohif`"


@dataclass
class Traffic:
    """Every request the page made, and those that failed or were refused."""

    origin: str
    requests: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.on("request", lambda r: self.requests.append(r.url))
        # The viewer cancels requests it no longer needs (a thumbnail's frame once the
        # viewport has it): those are the browser's doing, not an answer of ours.
        page.on("requestfailed", lambda r: r.failure != "net::ERR_ABORTED"
                and self.failures.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.failures.append(
            f"{r.url} {r.status}"))

    def assert_all_ours_and_answered(self) -> None:
        outside = [u for u in self.requests
                   if not u.startswith((self.origin + "/", "data:", "blob:"))]
        assert outside == [], f"requests that left our server: {outside}"
        assert self.failures == [], f"requests not answered: {self.failures}"

    def count(self, pattern: str) -> int:
        return sum(1 for u in self.requests if re.search(pattern, u))


@pytest.fixture
def traffic(page, live_server) -> Traffic:
    watched = Traffic(origin=live_server.url)
    watched.watch(page)
    return watched


# --- What is shared ----------------------------------------------------------------------


def archive(facility, paths) -> Study:
    """Ingest files as an upload would; all must be stored, in one study."""
    outcomes = [ingest_file(facility=facility, path=p, source=IngestSource.IMPORT)
                for p in paths]
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok]
    [uid] = {o.study_instance_uid for o in outcomes}
    return Study.objects.get(facility=facility, study_instance_uid=uid)


def share_of(study: Study, *, facility, clerk):
    return share_create(facility=facility, patient_or_identity=study.patient, studies=[study],
                        recipient=Recipient(method=Share.Method.PRINT), created_by=clerk)


def restudied(path: Path | str, out: Path, *, study_uid: str, series_number: int,
              description: str) -> Path:
    """A copy of a file as a series of our test patient's study: the identifying
    attributes replaced, the pixel data (compressed as it was) written back untouched."""
    ds = dcmread(path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "LOVELACE^ADA", "SMH-1815", "19810829"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240611", "101500"
    ds.StudyDescription, ds.AccessionNumber = "MR KNEE", "A-77"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), series_number
    ds.SeriesDescription = description
    ds.Modality = "MR"
    target = out / f"{series_number}.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


# --- Driving the viewer ---------------------------------------------------------------------


def open_inbox(page, made, birth_date: datetime.date) -> None:
    page.goto("/view")
    page.get_by_label("Security code").fill(made.code)
    page.get_by_label("Patient's date of birth").fill(birth_date.strftime("%Y/%m/%d"))
    page.get_by_role("button", name="Open the Share Inbox").click()
    page.wait_for_url("**/view/inbox")


def canvas(page, viewport: str = VIEWPORT) -> dict | None:
    return page.evaluate(CANVAS_JS, viewport)


def wait_for_image(page, viewport: str = VIEWPORT) -> dict:
    """The canvas once it shows an image: more than a handful of grey levels, spread."""
    deadline = time.monotonic() + FIRST_IMAGE_SECONDS
    while True:
        state = canvas(page, viewport)
        if state and state["std"] > 8 and state["levels"] > 16:
            return state
        assert time.monotonic() < deadline, f"the viewport stayed blank: {state}"
        page.wait_for_timeout(100)


def changed(before: dict, after: dict) -> float:
    """Mean absolute difference of two canvas thumbnails, in grey levels."""
    return float(np.mean(np.abs(np.array(before["thumb"]) - np.array(after["thumb"]))))


def wait_for_change(page, before: dict, minimum: float = 2.0) -> dict:
    deadline = time.monotonic() + 15
    while True:
        after = canvas(page)
        if after and changed(before, after) >= minimum:
            return after
        assert time.monotonic() < deadline, "the image did not change"
        page.wait_for_timeout(100)


def shoot(page, artifacts_dir: Path, name: str) -> Path:
    path = artifacts_dir / f"{name}.png"
    page.screenshot(path=path)
    return path


def viewport_png_stats(page) -> tuple[float, int]:
    """Spread and number of grey levels of a screenshot of the viewport."""
    png = page.locator(VIEWPORT).first.screenshot()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(pixels.std()), int(len(np.unique(pixels)))


def press_view(page) -> None:
    """View in the inbox: the exam's page, whose address becomes the app's route."""
    page.get_by_role("link", name="View").first.click()
    page.wait_for_url(re.compile(r".*/view/app/viewer\?StudyInstanceUIDs=[0-9.]+$"))


# --- A recipient ---------------------------------------------------------------------------


def test_view_opens_a_corpus_ct_whose_window_and_slice_change_the_image(
        transactional_db, page, traffic, facility, clerk, testdata_dir, artifacts_dir):
    study = archive(facility, [testdata_dir / CORPUS_CT])
    made = share_of(study, facility=facility, clerk=clerk)
    open_inbox(page, made, study.patient.birth_date)

    inbox_link = page.get_by_role("link", name="View").first.get_attribute("href")
    assert study.study_instance_uid not in inbox_link
    assert re.fullmatch(r"/view/studies/\d+/viewer", inbox_link)
    press_view(page)
    first = wait_for_image(page)
    expect(page.locator(SLICE)).to_contain_text("(1/2)")
    std, levels = viewport_png_stats(page)
    assert std > 8 and levels > 16
    shoot(page, artifacts_dir, "viewer-corpus-ct")
    assert AuditEvent.objects.filter(action="share.study.view",
                                     actor_ref=str(made.share.pk)).count() == 1

    # A preset from the viewport's window/level menu: lung (1500/-600).
    page.locator('[data-cy="windowLevelMenu-btn"]').click()
    page.get_by_text("Modality Window Presets").click()
    page.get_by_text("Lung", exact=False).first.click()
    expect(page.locator(WINDOW)).to_contain_text("1500")
    lung = wait_for_change(page, first)
    shoot(page, artifacts_dir, "viewer-corpus-ct-lung")

    # The mouse wheel goes to the second frame of the multi-frame CT.
    box = page.locator(VIEWPORT).first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    expect(page.locator(SLICE)).to_contain_text("(2/2)")
    wait_for_change(page, lung)
    shoot(page, artifacts_dir, "viewer-corpus-ct-frame2")

    # The app's route (which names the study) was put in the address bar in place: no
    # request asked for it.
    assert traffic.count(r"/view/app/") == 0
    # Frames came from our DICOMweb root, in the stored transfer syntax.
    assert traffic.count(r"/view/dicomweb/studies/[0-9.]+/series/[0-9.]+/instances/"
                         r"[0-9.]+/frames/") >= 2
    traffic.assert_all_ours_and_answered()


def test_a_generated_16_bit_ct_scrolls_window_levels_zooms_and_measures(
        transactional_db, page, traffic, facility, clerk, tmp_path, artifacts_dir):
    patient = make_patient("Tremblay", "Marie", "VW-4410", datetime.date(1961, 3, 14))
    files = ct_files(tmp_path / "ct", make_study("vw-ct", patient, description="CT ABDOMEN"),
                     slices=24)
    study = archive(facility, files)
    made = share_of(study, facility=facility, clerk=clerk)
    open_inbox(page, made, datetime.date(1961, 3, 14))
    press_view(page)

    first = wait_for_image(page)
    expect(page.locator(SLICE)).to_contain_text("(1/24)")
    expect(page.locator(WINDOW)).to_contain_text("400")  # the file's soft-tissue window
    shoot(page, artifacts_dir, "viewer-ct16")
    thumbnails = page.locator('[data-cy="study-browser-thumbnail"]')
    expect(thumbnails).to_have_count(1)
    expect(thumbnails.first).to_contain_text("PORTAL VENOUS")

    # Scrolling: arrow keys and the mouse wheel step through the slices.
    box = page.locator(VIEWPORT).first.bounding_box()
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(*centre)
    for _ in range(5):
        page.mouse.wheel(0, 120)
    expect(page.locator(SLICE)).to_contain_text("(6/24)")
    page.keyboard.press("ArrowDown")
    expect(page.locator(SLICE)).to_contain_text("(7/24)")
    slice7 = wait_for_change(page, first)
    shoot(page, artifacts_dir, "viewer-ct16-slice7")

    # Window/level: the bone preset's key, then a drag with the window/level tool.
    page.keyboard.press("4")
    expect(page.locator(WINDOW)).to_contain_text("2500")
    bone = wait_for_change(page, slice7)
    page.mouse.move(*centre)
    page.mouse.down()
    page.mouse.move(centre[0] + 120, centre[1] + 80, steps=8)
    page.mouse.up()
    expect(page.locator(WINDOW)).not_to_contain_text("2500")
    dragged = wait_for_change(page, bone, minimum=0.5)
    shoot(page, artifacts_dir, "viewer-ct16-window")

    # Zoom in with the zoom tool (drag down), pan, then a length measurement in mm.
    page.locator('[data-cy="Zoom-btn"]').click()
    page.mouse.move(*centre)
    page.mouse.down()
    page.mouse.move(centre[0], centre[1] + 150, steps=8)
    page.mouse.up()
    zoom = page.locator(WINDOW).filter(has_text="Zoom")
    expect(zoom).to_have_text(re.compile(r"Zoom:\s*[1-9]\d*\.\d+x"))
    zoomed = wait_for_change(page, dragged)
    page.locator('[data-cy="Pan-btn"]').click()
    page.mouse.move(*centre)
    page.mouse.down()
    page.mouse.move(centre[0] + 60, centre[1] + 40, steps=8)
    page.mouse.up()
    wait_for_change(page, zoomed)
    page.locator('[data-cy="Length-btn"]').click()
    page.mouse.move(centre[0] - 100, centre[1])
    page.mouse.down()
    page.mouse.move(centre[0] + 100, centre[1], steps=10)
    page.mouse.up()
    label = page.locator(f"{VIEWPORT} ~ * svg text, {VIEWPORT} svg text").filter(
        has_text=re.compile(r"^\d+(\.\d+)? mm$")).first
    expect(label).to_be_visible()
    shoot(page, artifacts_dir, "viewer-ct16-measured")

    # On a tablet, in portrait: the same viewer, the image still drawn.
    page.set_viewport_size({"width": 768, "height": 1024})
    wait_for_image(page)
    shoot(page, artifacts_dir, "viewer-ct16-tablet")
    traffic.assert_all_ours_and_answered()


def test_jpeg_2000_and_jpeg_ls_series_render(
        transactional_db, page, traffic, facility, clerk, tmp_path, artifacts_dir):
    study_uid = generate_uid()
    files = [
        restudied(get_testdata_file("MR_small_jp2klossless.dcm"), tmp_path, study_uid=study_uid,
                  series_number=1, description="JPEG 2000 LOSSLESS"),
        restudied(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"), tmp_path,
                  study_uid=study_uid, series_number=2, description="JPEG-LS LOSSLESS"),
    ]
    study = archive(facility, files)
    assert study.num_series == 2
    made = share_of(study, facility=facility, clerk=clerk)
    open_inbox(page, made, datetime.date(1981, 8, 29))
    press_view(page)

    thumbnails = page.locator('[data-cy="study-browser-thumbnail"]')
    expect(thumbnails).to_have_count(2)
    first = wait_for_image(page)
    shown = page.locator('[data-cy="viewport-overlay-top-left"]').inner_text()
    shoot(page, artifacts_dir, "viewer-compressed-first")
    other = thumbnails.filter(has_text="JPEG-LS" if "2000" in shown else "JPEG 2000")
    other.dblclick()
    expect(page.locator('[data-cy="viewport-overlay-top-left"]')).not_to_contain_text(
        "JPEG-LS" if "JPEG-LS" in shown else "JPEG 2000")
    second = wait_for_image(page)
    assert changed(first, second) > 2
    shoot(page, artifacts_dir, "viewer-compressed-second")

    # The frames went out as stored, and the browser decoded them with the codecs we
    # serve (WebAssembly, from our own folder).
    assert traffic.count(r"/static/ohif/[0-9a-f]+\.wasm$") >= 2
    traffic.assert_all_ours_and_answered()


def test_an_exam_whose_images_have_not_arrived_says_so(
        transactional_db, page, facility, clerk, artifacts_dir):
    from dicomgw.models import PacsNode
    from sharing.services import PacsStudy, PatientIdentity

    node = PacsNode.objects.create(facility=facility, name="Main PACS", ae_title="MAINPACS",
                                   host="127.0.0.1", port=1)
    made = share_create(
        facility=facility, created_by=clerk, recipient=Recipient(method=Share.Method.PRINT),
        patient_or_identity=PatientIdentity(name="LOVELACE^ADA", patient_id="SMH-1815",
                                            birth_date=datetime.date(1981, 8, 29)),
        pacs_studies=[PacsStudy(node=node, study_instance_uid="1.2.3.4.5.6",
                                description="CT HEAD", study_date=datetime.date(2025, 2, 5),
                                modalities=("CT",), num_instances=120)])
    open_inbox(page, made, datetime.date(1981, 8, 29))
    exam = made.share.share_studies.get()
    page.goto(f"/view/studies/{exam.pk}/viewer")
    expect(page.get_by_role("status")).to_contain_text("have not arrived yet")
    # Nor does the app open on a study the session was not given.
    response = page.goto("/view/app/viewer?StudyInstanceUIDs=1.2.3.4.5.7")
    assert response.status == 404


def test_the_viewer_needs_the_recipients_session(transactional_db, page, live_server):
    page.goto("/view/app/viewer?StudyInstanceUIDs=1.2.3.4.5.6")
    page.wait_for_url("**/view")
    assert page.get_by_label("Security code").is_visible()


# --- A clerk -------------------------------------------------------------------------------


def test_a_clerk_opens_an_archived_study_from_its_page(
        transactional_db, page, traffic, facility, clerk, other_facility, testdata_dir,
        artifacts_dir):
    study = archive(facility, [testdata_dir / CORPUS_CT])
    page.goto(f"/clerk/archive/studies/{study.pk}/")
    page.get_by_label("User name").fill(clerk.username)
    page.get_by_label("Password").fill(CLERK_PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/account/verify/**")
    page.get_by_label("Code").fill(totp_now(TOTPDevice.objects.get(user=clerk, confirmed=True)))
    page.get_by_role("button", name="Verify and sign in").click()
    page.wait_for_url(f"**/clerk/archive/studies/{study.pk}/")

    page.get_by_role("link", name="View", exact=True).click()
    page.wait_for_url(re.compile(r".*/clerk/viewer/app/viewer\?StudyInstanceUIDs=[0-9.]+$"))
    wait_for_image(page)
    expect(page.locator(SLICE)).to_contain_text("(1/2)")
    shoot(page, artifacts_dir, "viewer-clerk")
    assert traffic.count(r"/clerk/dicomweb/studies/[0-9.]+/series") >= 1
    traffic.assert_all_ours_and_answered()

    # The way back is to the study's page.
    page.get_by_role("link", name="Study").click()
    page.wait_for_url(f"**/clerk/archive/studies/{study.pk}/")

    # Another facility's study is not theirs to open.
    theirs = archive(other_facility, [get_testdata_file("MR_small_jp2klossless.dcm")])
    assert page.goto(f"/clerk/viewer/studies/{theirs.pk}/").status == 404
    assert page.goto("/clerk/viewer/app/viewer?StudyInstanceUIDs="
                     f"{theirs.study_instance_uid}").status == 404
