"""The disc image (dicomgw.media): built by the task into storage, read back with pycdlib
and genisoimage's isoinfo, served with HTTP ranges, removed when it expires."""

import datetime
import hashlib
import io
import subprocess
import time
from email import message_from_bytes
from pathlib import Path

import pycdlib
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.http import Http404
from django.test import RequestFactory
from django.utils import timezone
from pydicom.fileset import FileSet

from dicomgw.media import (
    IsoLayout,
    MediaFile,
    iso_build,
    iso_job_start,
    iso_write,
    media_jobs_purge,
    media_jobs_recover_stale,
)
from dicomgw.media_views import media_job_download, media_job_status, parse_ranges
from dicomgw.models import IngestSource, Instance, MediaJob, Study
from dicomgw.services import ingest_file

from .test_media import ingest_folder

NOW = datetime.datetime(2026, 3, 8, 6, 30, tzinfo=datetime.UTC)


@pytest.fixture
def viewer_dir(tmp_path) -> Path:
    viewer = tmp_path / "viewer"
    (viewer / "assets" / "fonts").mkdir(parents=True)
    (viewer / "index.html").write_text("<html><body>offline viewer</body></html>")
    (viewer / "assets" / "viewer-bundle.min.js").write_text("console.log('one');")
    (viewer / "assets" / "viewer-bundle-legacy.js").write_text("console.log('two');")
    (viewer / "assets" / "fonts" / "Source Sans Pro Regular.woff2").write_bytes(b"\0" * 3000)
    (viewer / "assets" / "empty.txt").write_bytes(b"")
    return viewer


@pytest.fixture
def studies(facility, testdata_dir) -> list[Study]:
    """The Japanese patient CD and the Philips fMRI series (empty Study ID)."""
    ingest_folder(facility, testdata_dir / "cd_ihe_pdi_hitachi_mr_jp")
    ingest_folder(facility, testdata_dir / "mr_vendor_series" / "philips_achieva_fmri")
    return list(Study.objects.filter(facility=facility))


@pytest.fixture
def small_studies(facility, testdata_dir) -> list[Study]:
    """Two small studies: the Philips fMRI series and a 12-bit image."""
    ingest_folder(facility, testdata_dir / "mr_vendor_series" / "philips_achieva_fmri")
    ingest_file(facility=facility, source=IngestSource.IMPORT,
                path=testdata_dir / "bits12_siemens_trio" / "12bitSigned_0x0F0F.dcm")
    return list(Study.objects.filter(facility=facility).order_by("pk"))


def start(studies, **overrides) -> MediaJob:
    options = {"patient_last_name": "Furuhashi", "include_viewer": False,
               "owner_ref": "share:1", "expires_at": timezone.now() + datetime.timedelta(days=7)}
    options.update(overrides)
    return iso_job_start(studies=studies, **options)


def built(studies, **overrides) -> MediaJob:
    job = start(studies, **overrides)
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == MediaJob.Status.READY, job.error
    return job


def read_iso(iso: pycdlib.PyCdlib, **path) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def names(iso: pycdlib.PyCdlib, **path) -> set[str]:
    found = set()
    for child in iso.list_children(**path):
        identifier = child.file_identifier()
        if identifier in (b"\0", b"\1", b".", b".."):
            continue
        found.add(identifier.decode("utf-16-be" if "joliet_path" in path else "ascii"))
    return found - {".", ".."}


def test_disc_image_reads_back_with_pycdlib_isoinfo_fileset_and_dcmdump(
        studies, viewer_dir, tmp_path):
    job = built(studies, include_viewer=True, viewer_dir=viewer_dir)
    assert job.download_name == "ISO_Furuhashi.iso"
    assert job.progress_percent == 100 and job.bytes_done == job.bytes_total > 0
    path = Path(default_storage.path(job.file.name))
    assert path.stat().st_size == job.size and job.size % 2048 == 0

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        # IHE PDI: the DICOMDIR, README.TXT and INDEX.HTM at the root, the file-set in its
        # folder, web content only under IHE_PDI, and no AUTORUN.INF.
        assert names(iso, iso_path="/") == {"DICOMDIR.;1", "README.TXT;1", "INDEX.HTM;1",
                                            "IMAGES", "IHE_PDI"}
        assert names(iso, joliet_path="/") == {"DICOMDIR", "README.TXT", "INDEX.HTM",
                                               "IMAGES", "IHE_PDI"}
        assert names(iso, joliet_path="/IHE_PDI/assets") == {
            "viewer-bundle.min.js", "viewer-bundle-legacy.js", "empty.txt", "fonts"}
        level1 = names(iso, iso_path="/IHE_PDI/ASSETS")
        assert len(level1) == 4 and all(len(n.split(".")[0]) <= 8 for n in level1)
        assert read_iso(iso, joliet_path="/IHE_PDI/assets/fonts/Source Sans Pro Regular.woff2"
                        ) == b"\0" * 3000
        assert read_iso(iso, joliet_path="/IHE_PDI/assets/empty.txt") == b""

        instances = {i.sop_instance_uid: i for i in Instance.objects.filter(
            series__study__in=studies)}
        out = tmp_path / "disc"
        for number in range(1, len(instances) + 1):
            data = read_iso(iso, iso_path=f"/IMAGES/DICOMS/IM{number}.;1")
            assert read_iso(iso, joliet_path=f"/IMAGES/DICOMS/IM{number}") == data
            (out / "IMAGES" / "DICOMS").mkdir(parents=True, exist_ok=True)
            (out / "IMAGES" / "DICOMS" / f"IM{number}").write_bytes(data)
        (out / "DICOMDIR").write_bytes(read_iso(iso, iso_path="/DICOMDIR.;1"))
        index = read_iso(iso, joliet_path="/INDEX.HTM").decode()
        readme = read_iso(iso, iso_path="/README.TXT;1")
    finally:
        iso.close()

    assert 'href="IHE_PDI/index.html"' in index and "<script" not in index
    assert readme.isascii()
    fileset = FileSet(out / "DICOMDIR")
    assert len(fileset) == len(instances)
    for item in fileset:
        instance = instances.pop(item.SOPInstanceUID)
        assert hashlib.sha256(Path(item.path).read_bytes()).hexdigest() == instance.sha256
    assert not instances
    dump = subprocess.run(["dcmdump", "-q", str(out / "DICOMDIR")], capture_output=True,
                          text=True, errors="replace", timeout=60)
    assert dump.returncode == 0, dump.stderr

    info = subprocess.run(["isoinfo", "-d", "-i", str(path)], capture_output=True, text=True,
                          errors="replace")
    assert "Joliet with UCS level 3 found" in info.stdout
    listing = subprocess.run(["isoinfo", "-l", "-i", str(path)], capture_output=True,
                             text=True, errors="replace")
    assert listing.returncode == 0 and "DICOMDIR.;1" in listing.stdout
    assert "IM94.;1" in listing.stdout  # 67 + 27 images
    joliet = subprocess.run(["isoinfo", "-J", "-l", "-i", str(path)], capture_output=True,
                            text=True, errors="replace")
    assert "viewer-bundle-legacy.js" in joliet.stdout
    assert "Source Sans Pro Regular.woff2" in joliet.stdout
    extracted = subprocess.run(["isoinfo", "-J", "-x", "/IMAGES/DICOMS/IM1", "-i", str(path)],
                               capture_output=True)
    assert extracted.stdout == (out / "IMAGES" / "DICOMS" / "IM1").read_bytes()

    # libisofs (xorriso) is a third reader; it reports any structure it dislikes.
    found = subprocess.run(["xorriso", "-report_about", "WARNING", "-indev", str(path),
                            "-find", "/", "-type", "f"], capture_output=True, text=True,
                           errors="replace")
    assert found.returncode == 0 and "WARNING" not in found.stderr + found.stdout, found.stderr
    assert len(found.stdout.splitlines()) == 94 + 3 + 5  # images, DICOMDIR…, viewer


def test_disc_without_viewer_has_a_plain_index(studies):
    job = built(studies[:1])
    iso = pycdlib.PyCdlib()
    iso.open(default_storage.path(job.file.name))
    try:
        assert "IHE_PDI" not in names(iso, iso_path="/")
        index = read_iso(iso, joliet_path="/INDEX.HTM").decode()
    finally:
        iso.close()
    assert "IHE_PDI" not in index and "DICOMDIR" in index and "README.TXT" in index
    assert "古橋" in index  # the patient's name as the archive decoded it


def test_level_one_names_are_unique_and_joliet_keeps_the_real_ones(tmp_path):
    files = [MediaFile(path=f"IHE_PDI/{name}", size=1, sha256="", data=b"x")
             for name in ("viewer-bundle.js", "viewer-bundle-2.js", "Viewer Bundle.js",
                          "a.b.c.d", "ÉCRAN.htm", "x" * 80 + ".js")]
    files.append(MediaFile(path="DICOMDIR", size=1, sha256="", data=b"d"))
    layout = IsoLayout(files, volume_id="t", now=NOW)
    ihe = layout.root.children["IHE_PDI"]
    level1 = [child.iso_name for child in ihe.children.values()]
    assert len(set(level1)) == len(level1)
    assert all(len(n.split(b".")[0]) <= 8 and len(n.split(b".")[1].split(b";")[0]) <= 3
               for n in level1)
    assert layout.root.children["DICOMDIR"].iso_name == b"DICOMDIR.;1"
    out = tmp_path / "t.iso"
    iso_write(files=files, out_path=out, volume_id="t", now=NOW)
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        joliet = names(iso, joliet_path="/IHE_PDI")
        assert {"viewer-bundle.js", "viewer-bundle-2.js", "Viewer Bundle.js", "a.b.c.d",
                "ÉCRAN.htm"} <= joliet
        assert any(len(n) == 64 and n.endswith(".js") for n in joliet)
        for name in joliet:
            assert read_iso(iso, joliet_path=f"/IHE_PDI/{name}") == b"x"
    finally:
        iso.close()


def test_directory_with_thousands_of_files_spans_sectors(tmp_path):
    files = [MediaFile(path=f"IMAGES/DICOMS/IM{n}", size=3, sha256="", data=b"abc")
             for n in range(1, 3001)]
    out = tmp_path / "many.iso"
    iso_write(files=files, out_path=out, volume_id="many", now=NOW)
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        assert len(names(iso, iso_path="/IMAGES/DICOMS")) == 3000
        assert read_iso(iso, iso_path="/IMAGES/DICOMS/IM2999.;1") == b"abc"
        assert read_iso(iso, joliet_path="/IMAGES/DICOMS/IM3000") == b"abc"
    finally:
        iso.close()


# --- Jobs ----------------------------------------------------------------------------


def test_asking_again_for_the_same_image_finds_the_same_job(small_studies):
    later = timezone.now() + datetime.timedelta(days=30)
    first = start(small_studies)
    again = start(list(reversed(small_studies)), expires_at=later)
    assert again.pk == first.pk
    first.refresh_from_db()
    assert first.expires_at == later
    assert start(small_studies, owner_ref="share:2").pk != first.pk
    assert start(small_studies, include_viewer=False, patient_last_name="Other").pk != first.pk
    assert start(small_studies[:1]).pk != first.pk

    # A new image in one of the studies makes a new disc.
    grown = small_studies[0]
    Study.objects.filter(pk=grown.pk).update(num_instances=grown.num_instances + 1)
    assert start(Study.objects.filter(pk__in=[s.pk for s in small_studies])).pk != first.pk


def test_an_expired_job_is_not_reused(small_studies):
    job = built(small_studies)
    MediaJob.objects.filter(pk=job.pk).update(expires_at=timezone.now())
    fresh = start(small_studies)
    assert fresh.pk != job.pk and fresh.status == MediaJob.Status.QUEUED
    job.refresh_from_db()
    assert job.status == MediaJob.Status.EXPIRED
    assert not default_storage.exists(job.file.name or "x")


def test_a_second_run_of_the_task_does_nothing(small_studies):
    job = built(small_studies[:1])
    name = job.file.name
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.file.name == name and job.status == MediaJob.Status.READY


def test_purge_removes_expired_images_only(small_studies):
    now = timezone.now()
    expiring = built(small_studies[:1], owner_ref="share:old",
                     expires_at=now + datetime.timedelta(days=1))
    lasting = built(small_studies[:1], owner_ref="share:new",
                    expires_at=now + datetime.timedelta(days=30))
    running = start(small_studies, owner_ref="share:busy", expires_at=now)
    MediaJob.objects.filter(pk=running.pk).update(status=MediaJob.Status.RUNNING)
    path = Path(default_storage.path(expiring.file.name))
    assert path.exists()

    assert media_jobs_purge(now=now - datetime.timedelta(seconds=1)) == 0
    assert media_jobs_purge(now=now + datetime.timedelta(days=1)) == 1
    assert not path.exists()
    expiring.refresh_from_db()
    assert expiring.status == MediaJob.Status.EXPIRED and not expiring.file
    lasting.refresh_from_db()
    assert lasting.status == MediaJob.Status.READY
    assert default_storage.exists(lasting.file.name)
    running.refresh_from_db()
    assert running.status == MediaJob.Status.RUNNING  # purged once its build ends

    response = media_job_download(RequestFactory().get("/"), expiring)
    assert response.status_code == 410


def test_a_build_whose_worker_died_is_queued_again(small_studies):
    job = start(small_studies[:1])
    leftover = default_storage.save("discs/dead/ISO_Furuhashi.iso.part", ContentFile(b"half"))
    stale = timezone.now() - datetime.timedelta(hours=1)
    MediaJob.objects.filter(pk=job.pk).update(status=MediaJob.Status.RUNNING, attempts=1,
                                              updated_at=stale,
                                              file="discs/dead/ISO_Furuhashi.iso")
    assert media_jobs_recover_stale(now=timezone.now()) == [job.pk]
    job.refresh_from_db()
    assert job.status == MediaJob.Status.QUEUED
    iso_build(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == MediaJob.Status.READY and job.attempts == 2
    assert not default_storage.exists(leftover)


def test_a_missing_archive_file_is_retried_then_fails(small_studies):
    job = start(small_studies[:1])
    victim = Instance.objects.filter(series__study=small_studies[0]).first()
    Path(victim.file.path).unlink()
    for attempt in (1, 2):
        assert iso_build(job_id=job.pk) == 30.0 * attempt
        job.refresh_from_db()
        assert job.status == MediaJob.Status.QUEUED and job.attempts == attempt
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == MediaJob.Status.FAILED and not job.file
    assert "could not be written" in job.error
    assert not list(Path(default_storage.path("discs")).rglob("*.iso*"))


def test_an_archived_file_changed_on_disc_fails_the_job(small_studies):
    job = start(small_studies[:1])
    victim = Instance.objects.filter(series__study=small_studies[0]).first()
    with open(victim.file.path, "ab") as fh:
        fh.write(b"tampered")
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == MediaJob.Status.FAILED and job.attempts == 1
    assert "not the size the archive recorded" in job.error


def test_a_missing_viewer_fails_the_job_with_a_reason(small_studies, tmp_path):
    job = start(small_studies[:1], include_viewer=True, viewer_dir=tmp_path / "nowhere")
    assert iso_build(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == MediaJob.Status.FAILED
    assert "viewer folder does not exist" in job.error


def test_status_fragment_polls_until_ready_then_links_the_download(small_studies, rf):
    job = start(small_studies[:1])
    response = media_job_status(rf.get("/inbox/media/7/"), job,
                                download_url="/inbox/media/7/download/")
    html = response.content.decode()
    assert response["Cache-Control"] == "no-store"
    assert 'hx-get="/inbox/media/7/"' in html and 'role="progressbar"' in html
    assert "/download/" not in html

    iso_build(job_id=job.pk)
    html = media_job_status(rf.get("/inbox/media/7/"), job,
                            download_url="/inbox/media/7/download/").content.decode()
    assert "hx-get" not in html
    assert 'href="/inbox/media/7/download/"' in html

    MediaJob.objects.filter(pk=job.pk).update(expires_at=timezone.now())
    html = media_job_status(rf.get("/x/"), job, download_url="/d/").content.decode()
    assert "has expired" in html and 'href="/d/"' not in html and "hx-get" not in html

    MediaJob.objects.filter(pk=job.pk).update(
        status=MediaJob.Status.FAILED, error="The disc image could not be made.",
        expires_at=timezone.now() + datetime.timedelta(days=1))
    html = media_job_status(rf.get("/x/"), job).content.decode()
    assert "could not be made" in html and "hx-get" not in html


# --- Download with ranges ------------------------------------------------------------


def body(response) -> bytes:
    if hasattr(response, "streaming_content"):
        return b"".join(response.streaming_content)
    return response.content


@pytest.fixture
def ready_job(small_studies) -> tuple[MediaJob, bytes]:
    job = built(small_studies[:1])
    return job, Path(default_storage.path(job.file.name)).read_bytes()


def get(job, method="get", **headers):
    request = getattr(RequestFactory(), method)("/download/", headers=headers)
    return media_job_download(request, job)


def test_download_serves_the_whole_image(ready_job):
    job, data = ready_job
    response = get(job)
    assert response.status_code == 200
    assert int(response["Content-Length"]) == len(data)
    assert response["Accept-Ranges"] == "bytes"
    assert response["Content-Disposition"] == 'attachment; filename="ISO_Furuhashi.iso"'
    assert response["Cache-Control"] == "no-store"
    assert body(response) == data
    head = get(job, method="head")
    assert head.status_code == 200 and body(head) == b""
    assert int(head["Content-Length"]) == len(data)


def test_download_answers_range_requests(ready_job):
    job, data = ready_job
    size = len(data)

    response = get(job, Range="bytes=0-99")
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes 0-99/{size}"
    assert response["Content-Length"] == "100" and body(response) == data[:100]

    response = get(job, Range="bytes=-2048")
    assert response["Content-Range"] == f"bytes {size - 2048}-{size - 1}/{size}"
    assert body(response) == data[-2048:]

    resume = size - 5000
    response = get(job, Range=f"bytes={resume}-")
    assert response.status_code == 206 and body(response) == data[resume:]

    response = get(job, Range=f"bytes=32768-{size + 10_000}")
    assert body(response) == data[32768:]

    response = get(job, Range="bytes=0-9, 100-109, 5-12")
    assert response.status_code == 206
    assert response["Content-Type"].startswith("multipart/byteranges; boundary=")
    raw = body(response)
    assert int(response["Content-Length"]) == len(raw)
    message = message_from_bytes(
        f"Content-Type: {response['Content-Type']}\r\n\r\n".encode() + raw)
    parts = [(part["Content-Range"], part.get_payload(decode=True))
             for part in message.get_payload()]
    assert parts == [(f"bytes 0-12/{size}", data[0:13]), (f"bytes 100-109/{size}", data[100:110])]


def test_unsatisfiable_and_malformed_ranges(ready_job):
    job, data = ready_job
    size = len(data)
    response = get(job, Range=f"bytes={size}-")
    assert response.status_code == 416 and response["Content-Range"] == f"bytes */{size}"
    assert get(job, Range="bytes=-0").status_code == 416
    # Not a byte-range set: ignored, the whole image is sent.
    for header in ("bytes=abc", "items=0-5", "bytes=9-3", "bytes=-"):
        response = get(job, Range=header)
        assert response.status_code == 200, header
    assert body(get(job, Range="bytes=abc")) == data


def test_if_range_sends_the_whole_image_when_it_changed(ready_job):
    job, data = ready_job
    etag = get(job)["ETag"]
    last_modified = get(job)["Last-Modified"]
    assert get(job, Range="bytes=0-9", If_Range=etag).status_code == 206
    assert get(job, Range="bytes=0-9", If_Range=last_modified).status_code == 206
    response = get(job, Range="bytes=0-9", If_Range='"something-else"')
    assert response.status_code == 200 and body(response) == data
    assert get(job, Range="bytes=0-9",
               If_Range="Tue, 01 Jan 2019 00:00:00 GMT").status_code == 200


def test_download_is_refused_until_ready_and_once_expired(small_studies):
    job = start(small_studies[:1])
    with pytest.raises(Http404):
        get(job)
    iso_build(job_id=job.pk)
    assert get(job).status_code == 200
    MediaJob.objects.filter(pk=job.pk).update(expires_at=timezone.now())
    assert get(job).status_code == 410  # before the purge has removed it


def test_parse_ranges():
    assert parse_ranges("bytes=0-0", 10) == [(0, 0)]
    assert parse_ranges("bytes=5-", 10) == [(5, 9)]
    assert parse_ranges("bytes=-3", 10) == [(7, 9)]
    assert parse_ranges("bytes=-30", 10) == [(0, 9)]
    assert parse_ranges("bytes=0-3,4-6", 10) == [(0, 6)]
    assert parse_ranges("bytes=20-30", 10) == []
    assert parse_ranges("bytes=3-1", 10) is None
    assert parse_ranges("bytes 0-1", 10) is None


# --- Through the real worker -----------------------------------------------------------


def test_worker_builds_the_image_the_view_serves(celery_worker, facility, testdata_dir,
                                                 settings, tmp_path):
    # The worker keeps generated files under STORAGE_ROOT/media (settings.MEDIA_ROOT).
    storages = {name: dict(conf) for name, conf in settings.STORAGES.items()}
    storages["default"]["OPTIONS"] = {**storages["default"]["OPTIONS"],
                                      "location": str(tmp_path / "storage" / "media")}
    settings.STORAGES = storages
    ingest_folder(facility, testdata_dir / "transfer_syntaxes_siemens_trio")
    job = start(list(Study.objects.filter(facility=facility)), owner_ref="share:worker")
    deadline = time.monotonic() + 120
    while job.status not in (MediaJob.Status.READY, MediaJob.Status.FAILED):
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.2)
        job.refresh_from_db()
    assert job.status == MediaJob.Status.READY, job.error
    data = body(get(job))
    assert len(data) == job.size
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        assert len(names(iso, joliet_path="/IMAGES/DICOMS")) == 9
    finally:
        iso.close()
