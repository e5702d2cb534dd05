"""The offline viewer on recipients' media (viewer/offline, built by `make offline-viewer`
into the default MEDIA_VIEWER_DIR). ZIPs and a disc image are made with it, unpacked,
and opened from disk in headless Chromium as a recipient would: INDEX.HTM, "View the
images", then the media's folder picked once. The page may load nothing but the files of
that folder."""

import io
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomgw.media import iso_build, iso_job_start, zip_response
from dicomgw.models import IngestSource, MediaJob, Study
from dicomgw.services import ingest_file, ingest_files
from tests.conftest import BASE_DIR
from tests.dicomgw.pacs_helpers import ct_files, make_patient, make_study
from tests.dicomgw.test_media import ingest_folder

pytestmark = pytest.mark.browser

VIEWER_DIR = BASE_DIR / "viewer" / "offline" / "dist"
CT_SLICES = 6

# Luminance statistics of the image canvas, and a digest of its pixels to tell two
# renderings apart.
CANVAS_STATS = """() => {
  const canvas = document.getElementById('image');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, squares = 0, lit = 0, coloured = 0, digest = 0;
  const n = data.length / 4;
  for (let i = 0; i < data.length; i += 4) {
    const r = data[i], g = data[i + 1], b = data[i + 2];
    const v = 0.299 * r + 0.587 * g + 0.114 * b;
    sum += v; squares += v * v;
    if (v > 8) lit++;
    if (Math.abs(r - g) > 24 || Math.abs(g - b) > 24) coloured++;
    digest = (Math.imul(digest, 31) + r + 7 * g + 13 * b) >>> 0;
  }
  const mean = sum / n;
  return {mean: mean, std: Math.sqrt(Math.max(0, squares / n - mean * mean)),
          lit: lit / n, coloured: coloured / n, digest: digest};
}"""


@dataclass
class Visit:
    page: object
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        return self.page.evaluate(CANVAS_STATS)

    def viewport(self):
        return self.page.locator("#viewport")

    def wait_shown(self, index: int | None = None) -> None:
        selector = "#viewport[data-status='shown']"
        if index is not None:
            selector += f"[data-index='{index}']"
        self.page.locator(selector).wait_for()

    def assert_offline(self) -> None:
        assert self.requests and all(url.startswith("file://") for url in self.requests), [
            url for url in self.requests if not url.startswith("file://")]
        assert not self.errors, self.errors


@pytest.fixture
def viewer_dir(settings) -> Path:
    assert (VIEWER_DIR / "index.html").is_file(), (
        "the offline viewer is not built: run `make offline-viewer`")
    assert Path(settings.MEDIA_VIEWER_DIR) == VIEWER_DIR
    return VIEWER_DIR


def new_visit(browser, **context_options) -> Visit:
    options = {"viewport": {"width": 1280, "height": 900}, **context_options}
    context = browser.new_context(**options)
    page = context.new_page()
    page.set_default_timeout(30_000)
    visit = Visit(page)
    page.on("request", lambda request: visit.requests.append(request.url))
    page.on("pageerror", lambda error: visit.errors.append(str(error)))
    return visit


@pytest.fixture
def visit(browser):
    visit = new_visit(browser)
    yield visit
    visit.page.context.close()


def unzipped(studies, last_name: str, into: Path) -> Path:
    """The ZIP a recipient downloads with "Include the DICOM viewer" ticked, unpacked."""
    response = zip_response(studies=studies, patient_last_name=last_name, include_viewer=True)
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as archive:
        archive.extractall(into)
    [root] = list(into.iterdir())
    return root


def open_viewer(visit: Visit, root: Path, artifacts_dir: Path | None = None,
                shot: str | None = None) -> None:
    """INDEX.HTM, "View the images", the folder picked in the file chooser."""
    page = visit.page
    page.goto((root / "INDEX.HTM").as_uri())
    page.get_by_role("link", name="View the images").click()
    page.wait_for_url("**/IHE_PDI/index.html")
    assert page.get_by_role("heading", level=1).inner_text() == (
        "Choose the folder of this disc or download")
    assert page.locator("#folder-name").inner_text() == root.name
    assert "sends nothing over the network" in page.locator("#start").inner_text()
    if shot:
        page.screenshot(path=artifacts_dir / f"{shot}-start.png")
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Choose the folder…").click()
    chooser.value.set_files(root)
    visit.wait_shown(1)


def series_button(page, title: str):
    return page.locator(".series", has=page.locator(".series-title", has_text=re.compile(
        f"^{re.escape(title)}$")))


def drag(page, dx: int, dy: int) -> None:
    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y + dy / 2, steps=4)
    page.mouse.move(x + dx, y + dy, steps=4)
    page.mouse.up()


def window_of(visit: Visit) -> tuple[str, str]:
    viewport = visit.viewport()
    return viewport.get_attribute("data-ww"), viewport.get_attribute("data-wc")


def wait_window_changes(visit: Visit, before: tuple[str, str]) -> None:
    visit.page.wait_for_function(
        "([ww, wc]) => { const v = document.getElementById('viewport');"
        " return v.dataset.ww !== ww || v.dataset.wc !== wc; }", arg=list(before))
    # The canvas is painted in the same animation frame as the attributes.
    visit.page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")


# --- A generated CT --------------------------------------------------------------------


@pytest.fixture
def ct_study(facility, tmp_path) -> Study:
    patient = make_patient("Okafor", "Daniel", "CT-3982615", birth_date=date(1978, 11, 2),
                           sex="M")
    study = make_study("offline-ct", patient, description="CT CHEST ABDOMEN PELVIS")
    outcomes = ingest_files(facility=facility, source=IngestSource.IMPORT,
                            paths=ct_files(tmp_path / "ct", study, slices=CT_SLICES))
    assert all(outcome.ok for outcome in outcomes)
    return Study.objects.get(facility=facility)


@pytest.fixture
def ct_zip(ct_study, tmp_path) -> Path:
    return unzipped([ct_study], "Okafor", tmp_path / "zip")


def test_the_ct_zip_opens_from_disk_and_windows_zooms_and_scrolls(
        visit, ct_zip, viewer_dir, artifacts_dir):
    root = ct_zip
    index = (root / "IHE_PDI" / "index.html").read_bytes()
    assert index == (viewer_dir / "index.html").read_bytes()
    assert not (root / "IHE_PDI" / ".built").exists()
    open_viewer(visit, root, artifacts_dir, "offline-viewer-ct")
    page = visit.page

    assert page.locator("#patient").inner_text().startswith("Okafor, Daniel")
    assert "ID CT-3982615" in page.locator("#patient").inner_text()
    assert "CT CHEST ABDOMEN PELVIS" in page.locator("#series-panel").inner_text()
    assert page.locator("#slice-label").inner_text() == f"Image 1 of {CT_SLICES}"
    # The file's own window (SOFT TISSUE, the first of two) comes first.
    assert window_of(visit) == ("400", "40")
    first = visit.stats()
    assert first["std"] > 20 and 0.1 < first["lit"] < 0.9, first
    page.screenshot(path=artifacts_dir / "offline-viewer-ct.png")

    # Presets: the file's second window is offered by its name, and bone from the CT set.
    presets = page.locator("#presets .preset").all_inner_texts()
    assert presets == ["Image default", "Lung", "Full range", "Bone", "Brain"]
    page.get_by_role("button", name="Lung", exact=True).click()
    wait_window_changes(visit, ("400", "40"))
    assert window_of(visit) == ("1500", "-600")
    lung = visit.stats()
    assert lung["digest"] != first["digest"] and lung["mean"] != first["mean"]
    lung_button = page.get_by_role("button", name="Lung", exact=True)
    assert lung_button.get_attribute("aria-pressed") == "true"
    page.screenshot(path=artifacts_dir / "offline-viewer-ct-lung.png")
    page.keyboard.press("4")  # the fourth button: Bone
    wait_window_changes(visit, ("1500", "-600"))
    assert window_of(visit) == ("1800", "400")

    # Dragging right widens the window, dragging down raises the level.
    before = window_of(visit)
    drag(page, 120, 60)
    wait_window_changes(visit, before)
    ww, wc = (float(v) for v in window_of(visit))
    assert ww > 1800 and wc > 400
    dragged = visit.stats()
    assert dragged["digest"] != lung["digest"]

    # Scrolling: the wheel, the arrow keys, End and the slider move through the slices.
    box = page.locator("#viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 100)
    visit.wait_shown(2)
    assert page.locator("#slice-label").inner_text() == f"Image 2 of {CT_SLICES}"
    assert "Image 2 of 6" in page.locator("#corner-bl").inner_text()
    assert visit.stats()["digest"] != dragged["digest"]
    assert window_of(visit) == (f"{ww:g}", f"{wc:g}")  # the chosen window stays
    page.keyboard.press("ArrowDown")
    visit.wait_shown(3)
    page.keyboard.press("End")
    visit.wait_shown(CT_SLICES)
    page.get_by_label("Image", exact=True).focus()
    page.keyboard.press("Home")
    visit.wait_shown(1)

    # Zoom: the button and the overlay agree, and the image grows on the canvas.
    shown = visit.stats()
    page.get_by_role("button", name="Zoom in").click()
    page.get_by_text("Zoom 125%").wait_for()
    zoomed = visit.stats()
    assert zoomed["lit"] > shown["lit"]
    page.keyboard.press("0")
    page.get_by_text("Zoom 100%").wait_for()
    assert window_of(visit) == ("400", "40")
    visit.assert_offline()


def test_the_viewer_works_on_a_tablet_with_touch(browser, ct_zip, viewer_dir, artifacts_dir):
    root = ct_zip
    visit = new_visit(browser, viewport={"width": 820, "height": 1180}, has_touch=True,
                      is_mobile=True, device_scale_factor=2)
    try:
        open_viewer(visit, root)
        page = visit.page
        panel = page.locator("#series-panel").bounding_box()
        image = page.locator("#viewport").bounding_box()
        assert panel["y"] + panel["height"] <= image["y"] + 1  # the series strip sits above
        assert image["width"] >= 800 and image["height"] >= 500
        page.get_by_role("button", name="Next image").tap()
        visit.wait_shown(2)
        # One finger dragging across the image changes the window.
        before = window_of(visit)
        client = page.context.new_cdp_session(page)
        x, y = image["x"] + image["width"] / 2, image["y"] + image["height"] / 2
        client.send("Input.dispatchTouchEvent", {"type": "touchStart",
                                                 "touchPoints": [{"x": x, "y": y}]})
        for step in range(1, 6):
            client.send("Input.dispatchTouchEvent", {
                "type": "touchMove", "touchPoints": [{"x": x + 20 * step, "y": y + 8 * step}]})
        client.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        wait_window_changes(visit, before)
        page.screenshot(path=artifacts_dir / "offline-viewer-ct-tablet.png")
        visit.assert_offline()
    finally:
        visit.page.context.close()


def test_without_a_dicomdir_every_file_is_read(visit, ct_zip, viewer_dir):
    root = ct_zip
    (root / "DICOMDIR").unlink()
    open_viewer(visit, root)
    assert visit.page.locator("#patient").inner_text().startswith("Okafor, Daniel")
    assert visit.page.locator("#slice-label").inner_text() == f"Image 1 of {CT_SLICES}"
    assert visit.stats()["std"] > 20
    visit.assert_offline()


def test_files_chosen_one_by_one_are_found_by_their_names(visit, ct_zip, viewer_dir):
    """Where a device cannot pick a folder, the files come without their folders; the
    DICOMDIR's file IDs still find them."""
    root = ct_zip
    page = visit.page
    page.goto((root / "IHE_PDI" / "index.html").as_uri())
    files = [root / "DICOMDIR", *sorted((root / "IMAGES" / "DICOMS").iterdir())]
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Choose all its files instead").click()
    chooser.value.set_files(files)
    visit.wait_shown(1)
    assert page.locator("#slice-label").inner_text() == f"Image 1 of {CT_SLICES}"
    assert page.locator(".notice").count() == 0
    visit.assert_offline()


def test_a_folder_without_images_gets_a_plain_answer(visit, viewer_dir, tmp_path):
    folder = tmp_path / "IMAGES_Nobody"
    shutil.copytree(viewer_dir, folder / "IHE_PDI")
    page = visit.page
    page.goto((folder / "IHE_PDI" / "index.html").as_uri())
    page.locator("#folder-input").set_input_files(folder / "IHE_PDI")
    status = page.get_by_role("status").filter(has_text="No DICOM images were found")
    status.wait_for()
    assert "the one that holds INDEX.HTM and DICOMDIR" in status.inner_text()
    assert page.locator("#viewer").is_hidden()
    visit.assert_offline()


# --- The Japanese patient CD -------------------------------------------------------------


@pytest.fixture
def mr_cd(facility, testdata_dir) -> list[Study]:
    ingest_folder(facility, testdata_dir / "cd_ihe_pdi_hitachi_mr_jp")
    return list(Study.objects.filter(facility=facility))


MR_SERIES = {"T2 SAG": 11, "T1 SAG": 11, "T2 AX": 17, "T1 AX": 17, "STIR SAG": 11}


def check_japanese_cd(visit: Visit, artifacts_dir: Path, shot: str) -> None:
    page = visit.page
    patient = page.locator("#patient").inner_text()
    assert "ﾌﾙﾊｼ, ﾀｲﾁ" in patient and "古橋 大地" in patient, patient
    for title, count in MR_SERIES.items():
        button = series_button(page, title)
        button.wait_for()
        assert f"{count} images" in button.inner_text()
    assert page.locator("#slice-label").inner_text() == "Image 1 of 11"
    first = visit.stats()
    assert first["std"] > 15 and first["lit"] > 0.1, first

    before = window_of(visit)
    drag(page, -80, 40)
    wait_window_changes(visit, before)
    assert visit.stats()["digest"] != first["digest"]

    page.locator("#viewport").focus()
    page.keyboard.press("ArrowDown")
    visit.wait_shown(2)
    assert page.locator("#slice-label").inner_text() == "Image 2 of 11"

    series_button(page, "T2 AX").click()
    page.get_by_text("Image 1 of 17", exact=True).wait_for()
    visit.wait_shown(1)
    page.get_by_label("Image", exact=True).fill("9")
    visit.wait_shown(9)
    assert page.locator("#slice-label").inner_text() == "Image 9 of 17"
    assert series_button(page, "T2 AX").get_attribute("aria-current") == "true"
    page.wait_for_function("() => [...document.querySelectorAll('.thumb')].every(c => {"
                           " const d = c.getContext('2d').getImageData(0, 0, 64, 64).data;"
                           " return d.some((v, i) => i % 4 !== 3 && v > 40); })")
    page.screenshot(path=artifacts_dir / f"{shot}.png")
    visit.assert_offline()


def test_the_japanese_mr_cd_as_a_zip_shows_the_kanji_name_and_five_series(
        visit, mr_cd, viewer_dir, tmp_path, artifacts_dir):
    root = unzipped(mr_cd, "Furuhashi", tmp_path / "zip")
    open_viewer(visit, root)
    check_japanese_cd(visit, artifacts_dir, "offline-viewer-mr-jp-zip")


def test_the_names_in_iso_2022_headers_read_without_a_dicomdir(
        visit, mr_cd, viewer_dir, tmp_path, artifacts_dir):
    """The images keep ISO 2022 IR 13 and IR 87 with escape sequences (PS3.5 6.1.2.5);
    with no DICOMDIR the viewer reads them from each file."""
    root = unzipped(mr_cd, "Furuhashi", tmp_path / "zip")
    (root / "DICOMDIR").unlink()
    open_viewer(visit, root)
    check_japanese_cd(visit, artifacts_dir, "offline-viewer-mr-jp-headers")


def test_a_disc_written_elsewhere_opens_through_its_own_dicomdir(
        visit, viewer_dir, testdata_dir, tmp_path, artifacts_dir):
    """The Japanese clinic's own CD: a DICOMDIR written by DCMTK, file IDs DCMDT/D0000000…,
    and 181 files that are not DICOM beside the images."""
    disc = tmp_path / "disc"
    shutil.copytree(testdata_dir / "cd_ihe_pdi_hitachi_mr_jp", disc)
    shutil.copytree(viewer_dir, tmp_path / "viewer")
    page = visit.page
    page.goto((tmp_path / "viewer" / "index.html").as_uri())
    page.locator("#folder-input").set_input_files(disc)
    visit.wait_shown(1)
    assert "古橋 大地" in page.locator("#patient").inner_text()
    assert page.locator(".series").count() == len(MR_SERIES)
    assert page.locator(".notice").count() == 0
    assert visit.stats()["std"] > 15
    page.screenshot(path=artifacts_dir / "offline-viewer-mr-jp-original-cd.png")
    visit.assert_offline()


def test_the_disc_image_opens_the_same_way(visit, mr_cd, viewer_dir, tmp_path, artifacts_dir):
    job = iso_job_start(studies=mr_cd, patient_last_name="Furuhashi", include_viewer=True,
                        owner_ref="share:1", expires_at=timezone.now() + timedelta(days=1))
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == MediaJob.Status.READY, job.error
    disc = tmp_path / "DICOM_IMAGES"
    # The names a computer shows of the disc are its Joliet names.
    extracted = subprocess.run(
        ["xorriso", "-osirrox", "on", "-joliet", "on", "-indev",
         default_storage.path(job.file.name), "-extract", "/", str(disc)],
        capture_output=True, text=True)
    assert extracted.returncode == 0, extracted.stderr
    assert (disc / "IHE_PDI" / "index.html").is_file() and (disc / "DICOMDIR").is_file()
    open_viewer(visit, disc)
    check_japanese_cd(visit, artifacts_dir, "offline-viewer-mr-jp-disc")


# --- Compressed images -------------------------------------------------------------------

# Series title, pydicom test file. Files named alike hold the same pixels in different
# transfer syntaxes, so their lossless renderings must be identical.
CODEC_FILES = [
    ("NATIVE MR", "MR_small.dcm"),
    ("BIG ENDIAN MR", "MR_small_bigendian.dcm"),
    ("RLE MR", "MR_small_RLE.dcm"),
    ("JPEG-LS MR", "MR_small_jpeg_ls_lossless.dcm"),
    ("J2K MR", "MR_small_jp2klossless.dcm"),
    ("NATIVE RGB", "SC_rgb.dcm"),
    ("RLE RGB", "SC_rgb_rle.dcm"),
    ("RLE RGB 16-BIT", "SC_rgb_rle_16bit.dcm"),
    ("JPEG BASELINE RGB", "SC_rgb_jpeg_dcmtk.dcm"),
    ("NATIVE US", "US1_UNCR.dcm"),
    ("J2K US", "US1_J2KR.dcm"),
    ("NATIVE CR", "RG1_UNCR.dcm"),
    ("J2K CR", "RG1_J2KR.dcm"),
    ("NATIVE MULTIFRAME", "emri_small.dcm"),
    ("RLE MULTIFRAME", "emri_small_RLE.dcm"),
    ("JPEG-LS MULTIFRAME", "emri_small_jpeg_ls_lossless.dcm"),
    ("J2K MULTIFRAME", "emri_small_jpeg_2k_lossless.dcm"),
    ("JPEG LOSSLESS NM", "JPEG-LL.dcm"),
    ("DEFLATED", "image_dfl.dcm"),
    ("PALETTE US", "OBXXXX1A.dcm"),
    ("JPEG 12-BIT NM", "JPEG-lossy.dcm"),
]
SAME_PIXELS = {
    "NATIVE MR": ["BIG ENDIAN MR", "RLE MR", "JPEG-LS MR", "J2K MR"],
    "NATIVE RGB": ["RLE RGB", "RLE RGB 16-BIT"],
    "NATIVE US": ["J2K US"],
    "NATIVE CR": ["J2K CR"],
    "NATIVE MULTIFRAME": ["RLE MULTIFRAME", "JPEG-LS MULTIFRAME", "J2K MULTIFRAME"],
}


@pytest.fixture
def codec_study(facility, tmp_path) -> Study:
    """One study whose series each hold one of the pydicom test files, its pixel data as
    it was."""
    study_uid = generate_uid()
    for number, (title, name) in enumerate(CODEC_FILES, start=1):
        ds = dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SeriesNumber, ds.SeriesDescription = number, title
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "CODEC^TEST", "CODEC-1", "19700101"
        ds.StudyDescription, ds.StudyDate, ds.StudyTime = "COMPRESSION TEST", "20240301", "0900"
        path = tmp_path / "codecs" / f"{number}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.IMPORT)
        assert outcome.ok, (name, outcome.reason)
    return Study.objects.get(facility=facility)


def test_compressed_images_render_or_say_why_not(
        visit, codec_study, viewer_dir, tmp_path, artifacts_dir):
    root = unzipped([codec_study], "Codec", tmp_path / "zip")
    open_viewer(visit, root)
    page = visit.page
    rendered = {}
    for title, _name in CODEC_FILES:
        series_button(page, title).click()
        page.wait_for_function(
            "title => document.querySelector('.series[aria-current=true] .series-title')"
            ".textContent === title && ['shown', 'message'].includes("
            "document.getElementById('viewport').dataset.status)", arg=title)
        status = visit.viewport().get_attribute("data-status")
        if title == "JPEG 12-BIT NM":
            assert status == "message"
            message = page.locator("#image-message")
            assert message.is_visible()
            assert message.inner_text().startswith(
                "This image is compressed as JPEG Extended (12-bit), which this viewer "
                "cannot show. Open the folder in a DICOM viewer"), message.inner_text()
            assert visit.stats()["lit"] == 0  # black, with the message over it
            page.screenshot(path=artifacts_dir / "offline-viewer-unsupported.png")
            continue
        assert status == "shown", (title, page.locator("#image-message").inner_text())
        rendered[title] = visit.stats()
        assert rendered[title]["std"] > 8, (title, rendered[title])
        if title == "JPEG LOSSLESS NM":
            # No window in the file: its full range, 0 to 278 as pydicom decodes it.
            assert window_of(visit) == ("279", "139")
        if title == "J2K CR":
            page.screenshot(path=artifacts_dir / "offline-viewer-j2k-cr.png")

    for reference, others in SAME_PIXELS.items():
        for title in others:
            assert rendered[title]["digest"] == rendered[reference]["digest"], title
    for title in ("NATIVE RGB", "JPEG BASELINE RGB"):
        assert rendered[title]["coloured"] > 0.3, (title, rendered[title])
    assert rendered["PALETTE US"]["coloured"] > 0.01
    assert abs(rendered["JPEG BASELINE RGB"]["mean"] - rendered["NATIVE RGB"]["mean"]) < 4
    # MONOCHROME1: the lungs of the chest radiograph are dark, its edge bright.
    assert rendered["NATIVE CR"]["mean"] > 90

    # A multi-frame file: ten frames to scroll through.
    series_button(page, "J2K MULTIFRAME").click()
    page.get_by_text("Image 1 of 10", exact=True).wait_for()
    visit.wait_shown(1)
    frame_one = visit.stats()
    page.locator("#viewport").focus()
    page.keyboard.press("ArrowDown")
    visit.wait_shown(2)
    assert "frame 2 of 10" in page.locator("#corner-bl").inner_text()
    assert visit.stats()["digest"] != frame_one["digest"]
    series_button(page, "JPEG BASELINE RGB").click()
    visit.wait_shown(1)
    page.screenshot(path=artifacts_dir / "offline-viewer-jpeg-rgb.png")
    visit.assert_offline()
