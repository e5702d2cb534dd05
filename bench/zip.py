"""ZIP download benchmark: a generated ~1 GB CT (2,000 slices of 512x512x16 bits)
ingested into a throwaway archive, shared, and downloaded by a recipient as
``IMAGES_<Lastname>.zip`` over HTTP (``POST /view/download`` in a recipient session, the
whole product under gunicorn), beside ``cp -r`` of the same archived files and Orthanc's
``/studies/<id>/media`` of the same study, in the same run. Also the DICOMDIR of 10,000
images: ours (from the archive index) beside dcmtk's ``dcmmkdir`` (from the files), and
the time to the first byte of their ZIP.

Everything runs on 127.0.0.1 in a throwaway folder: a fresh database (SQLite, or a
PostgreSQL database created and dropped for the run with ``--postgres``), gunicorn with
one sync worker serving ``pockethealth.wsgi`` (every app and URL of the product loaded,
as in production), an Orthanc holding the study. The page cache is warm for every
contender (the files are read once before timing); our download and ``cp -r`` take
turns; medians are reported. curl downloads to /dev/null and gives the time to the
first byte (status line and headers, Content-Length among them) and the throughput;
``cp -r`` copies into /dev/shm when it has room, so that neither side waits on the
disc's write-back. Orthanc deflates its ZIP, so its download is cut after
``--orthanc-seconds`` and its rate taken over that time.

Memory is the peak resident set (VmHWM) of the gunicorn worker, each case in a fresh
worker: a 20-slice CT, the 1 GB CT (every round) and the 10,000 small images.

    .venv/bin/python bench/zip.py [--rounds 3] [--slices 2000] [--orthanc-seconds 20]
                                  [--dicomdir-images 10000] [--postgres URL] [--keep]

The last line printed is one JSON object with the medians."""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlencode

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

CT_SEED = 6000
SMALL_CT_SEED = 6001
MB = 1_000_000


# --- Helpers shared with bench/iso.py -------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), in MB (2^20)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM back to its current RSS (Linux: "5" to clear_refs), so
    the next peak measures what happens from now on, not start-up."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def create_postgres_database(server_url: str) -> tuple[str, str]:
    import psycopg2

    name = f"ph_bench_media_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(server_url.rstrip("/") + "/postgres")
    try:
        conn.autocommit = True
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return server_url.rstrip("/") + f"/{name}", name


def drop_postgres_database(server_url: str, name: str) -> None:
    import psycopg2
    from django.db import connections

    connections.close_all()
    conn = psycopg2.connect(server_url.rstrip("/") + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def setup_django(work: Path, *, database_url: str | None) -> dict:
    """Point this process (and return the environment for children) at a throwaway
    installation in ``work``."""
    env = {**os.environ, "PH_VAR_DIR": str(work / "var"), "CELERY_BROKER_URL": "filesystem://",
           "DJANGO_SETTINGS_MODULE": "pockethealth.settings", "DEBUG": "false",
           "LOG_LEVEL": "WARNING",
           "DATABASE_URL": database_url or f"sqlite:///{work / 'var' / 'bench.sqlite3'}"}
    for name in ("STORAGE_ROOT", "SPOOL_DIR", "CACHE_URL", "SITE_URL"):
        env.pop(name, None)
        os.environ.pop(name, None)
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return env


@dataclass
class LoadedStudy:
    study_id: int
    files: list[Path]  # the archived copies
    bytes: int
    facility_id: int


def bench_facility(short_name: str):
    """A facility of its own for each study, so that its archive folder holds only it."""
    from pockethealth.models import Facility

    return Facility.objects.create(name=f"Benchmark Hospital {short_name}",
                                   short_name=short_name, time_zone="UTC")


def generate_and_ingest(work: Path, *, slices: int, say, seed: int = CT_SEED) -> LoadedStudy:
    """A CT of ``slices`` slices from the demo generator, ingested file by file."""
    from dicomgw.demo import DEMO_STUDIES, iter_ct_study
    from dicomgw.models import IngestSource, Instance
    from dicomgw.services import ingest_file

    facility = bench_facility(f"bench-{seed}")
    ct = next(study for study in DEMO_STUDIES if study.modality == "CT")
    say(f"Generating and ingesting a {slices}-slice CT…")
    started = time.monotonic()
    study_id = None
    for path in iter_ct_study(work / "gen", ct, seed=seed, anchor=date(2025, 1, 15),
                              slices=slices):
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.DEMO)
        if not outcome.ok:
            raise RuntimeError(f"ingest failed: {outcome.reason}")
        study_id = outcome.instance.series.study_id
        path.unlink()
    shutil.rmtree(work / "gen", ignore_errors=True)
    instances = list(Instance.objects.filter(series__study_id=study_id))
    files = [Path(instance.file.path) for instance in instances]
    total = sum(instance.size for instance in instances)
    say(f"  {len(files)} files, {total / MB:.0f} MB in {time.monotonic() - started:.0f} s")
    return LoadedStudy(study_id=study_id, files=files, bytes=total, facility_id=facility.pk)


def warm(files: list[Path]) -> None:
    """Read every file once, so each contender starts from the same warm page cache."""
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(8 << 20):
                pass


# --- A share and its recipient --------------------------------------------------------


@dataclass
class SharedStudy:
    code: str
    birth_date: str  # as the recipient types it
    exam_ids: list[int]


def share_study(study_id: int) -> SharedStudy:
    """Share the study with a recipient (handed to the patient), as a clerk would."""
    from dicomgw.models import Study
    from pockethealth.models import StaffUser
    from sharing.models import Share
    from sharing.services import Recipient, share_create

    study = Study.objects.select_related("patient", "facility").get(pk=study_id)
    clerk = StaffUser.objects.create_user(username=f"clerk-{study.facility.short_name}",
                                          password=uuid.uuid4().hex, facility=study.facility)
    made = share_create(facility=study.facility, patient_or_identity=study.patient,
                        studies=[study], recipient=Recipient(method=Share.Method.PATIENT),
                        created_by=clerk)
    return SharedStudy(code=made.code, birth_date=study.patient.birth_date.strftime("%Y/%m/%d"),
                       exam_ids=list(made.share.share_studies.values_list("pk", flat=True)))


def _cookies(headers: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for name, value in headers:
        if name.lower() == "set-cookie":
            key, _sep, rest = value.partition("=")
            found[key.strip()] = rest.split(";")[0]
    return found


@dataclass
class Recipient:
    """A recipient's browser: its cookies and CSRF token, after opening the share."""

    port: int
    cookie: str
    token: str

    def download_args(self, shared: SharedStudy) -> tuple[str, list[str]]:
        form = urlencode([("csrfmiddlewaretoken", self.token), ("format", "zip"),
                          *(("exam", str(exam)) for exam in shared.exam_ids)])
        return (f"http://127.0.0.1:{self.port}/view/download",
                ["-H", f"Cookie: {self.cookie}", "--data", form])


def open_share(port: int, shared: SharedStudy) -> Recipient:
    """The form, then the code and date of birth, then the Share Inbox, over HTTP."""
    import http.client

    from django.conf import settings

    def request(method: str, path: str, body: str | None = None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    _status, headers, body = request("GET", "/view")
    csrf = _cookies(headers)["csrftoken"]
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()
    cookie = f"csrftoken={csrf}"
    status, headers, _body = request(
        "POST", "/view", body=urlencode({"csrfmiddlewaretoken": token, "code": shared.code,
                                         "birth_date": shared.birth_date}),
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    if status != 303:
        raise RuntimeError(f"the share did not open: {status}")
    name = settings.RECIPIENT_SESSION_COOKIE_NAME
    cookie += f"; {name}={_cookies(headers)[name]}"
    status, _headers, _body = request("GET", "/view/inbox", headers={"Cookie": cookie})
    if status != 200:
        raise RuntimeError(f"the inbox did not open: {status}")
    return Recipient(port=port, cookie=cookie, token=token)


# --- Contenders ------------------------------------------------------------------------


@dataclass
class Download:
    seconds: float
    ttfb_ms: float
    bytes: int

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds


def curl(url: str, *extra: str, output: str = "/dev/null", max_seconds: float = 0) -> Download:
    limit = ["--max-time", str(max_seconds)] if max_seconds else []
    result = subprocess.run(
        ["curl", "-sS", "-o", output, *limit, "-w",
         "%{http_code} %{time_starttransfer} %{time_total} %{size_download}", *extra, url],
        capture_output=True, text=True, timeout=3600)
    code, ttfb, total, size = result.stdout.split()
    # curl exits 28 when --max-time cuts the download: expected for Orthanc's.
    if code != "200" or result.returncode not in ((0, 28) if max_seconds else (0,)):
        raise RuntimeError(f"curl {url}: {code} {result.stderr}")
    return Download(seconds=float(total), ttfb_ms=float(ttfb) * 1000, bytes=int(size))


def copy_target(work: Path, size: int) -> Path:
    """Where ``cp -r`` copies to: memory (/dev/shm) when it has room, so the copy is not
    held back by the disc's write-back (the peer at its best), else the work folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * size:
        return Path(tempfile.mkdtemp(prefix="bench-zip-copy-", dir=shm)) / "copy"
    return work / "copy"


def copy_tree(source: Path, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


class Gunicorn:
    """The product (``pockethealth.wsgi``) under gunicorn with one sync worker."""

    def __init__(self, env: dict, log_path: Path):
        self.log = open(log_path, "ab")  # closed in stop()
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
             "--workers", "1", "--worker-class", "sync", "--timeout", "1800",
             "pockethealth.wsgi"],
            cwd=BASE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.worker_pids():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not start (see {log_path})")
            time.sleep(0.2)
        [self.worker] = self.worker_pids()

    def worker_pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@dataclass
class Served:
    """What one fresh worker did: its downloads and its memory."""

    downloads: list[Download]
    rss_ready_mb: float  # after the recipient opened the share, before any download
    peak_mb: float  # VmHWM: the process's peak, start-up included


def serve(env: dict, work: Path, shared: SharedStudy, *, times: int,
          between=None, check: Path | None = None) -> Served:
    """A fresh worker; the recipient opens the share and downloads its ZIP ``times``
    times (``between()`` runs after each), the first time into ``check`` when given."""
    server = Gunicorn(env, work / "gunicorn.log")
    try:
        recipient = open_share(server.port, shared)
        url, extra = recipient.download_args(shared)
        rss_ready = vm_rss_mb(server.worker)
        downloads = []
        for number in range(times):
            output = str(check) if check is not None and number == 0 else "/dev/null"
            downloads.append(curl(url, *extra, output=output))
            if between is not None:
                between()
        return Served(downloads=downloads, rss_ready_mb=rss_ready,
                      peak_mb=vm_hwm_mb(server.worker))
    finally:
        server.stop()


def check_zip(path: Path, *, images: int) -> None:
    """The ZIP tests clean and holds the images, DICOMDIR, README.TXT and SHA256SUMS."""
    tested = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
    if tested.returncode != 0:
        raise RuntimeError(f"the ZIP does not test clean: {tested.stdout[-500:]}")
    listing = subprocess.run(["unzip", "-Z1", str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
    names = {name.split("/", 1)[1] for name in listing}
    if not {"DICOMDIR", "README.TXT", "SHA256SUMS"} <= names or sum(
            1 for n in names if n.startswith("IMAGES/DICOMS/IM")) != images:
        raise RuntimeError("the ZIP lacks files")


def start_orthanc(work: Path):
    from dicomgw.demopacs import DemoPacsConfig, start_orthanc, wait_for_orthanc

    config = DemoPacsConfig(root=work / "orthanc", ae_title="BENCHPACS", port=free_port(),
                            http_port=free_port(), scp_ae_title="UNUSED", scp_host="127.0.0.1",
                            scp_port=free_port())
    config.root.mkdir(parents=True)
    process = start_orthanc(config)
    wait_for_orthanc(config, process, stop=threading.Event())
    return config, process


def orthanc_upload(config, files: list[Path]) -> str:
    """Store the files in Orthanc; returns Orthanc's id of their study."""
    from dicomgw.demopacs import OrthancApi

    api = OrthancApi(config.http_port, timeout=120)
    try:
        study = None
        for path in files:
            answer = api.request("POST", "/instances", path.read_bytes())
            study = answer["ParentStudy"]
    finally:
        api.close()
    return study


# --- DICOMDIR of many images -----------------------------------------------------------


def write_small_images(folder: Path, count: int, per_series: int = 500) -> list[Path]:
    """``count`` small CT images (16x16) in series of ``per_series``, named as on media
    (IMAGES/DICOMS/IMn), every key a DICOMDIR needs present."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    target = folder / "IMAGES" / "DICOMS"
    target.mkdir(parents=True)
    study_uid = generate_uid()
    pixels = np.zeros((16, 16), np.uint16)
    paths = []
    series_uid = None
    for n in range(count):
        if n % per_series == 0:
            series_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = "Bench^Many", "BENCH10K"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "BENCH10K"
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = "20250115", "101500", "MANY"
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, n // per_series + 1
        ds.Modality, ds.InstanceNumber = "CT", n % per_series + 1
        ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
        path = target / f"IM{n + 1}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class DicomdirTimes:
    ours: float  # plan (index query) + layout + encoding
    layout: float  # of which the layout, which precedes the ZIP's first byte
    encode: float  # of which the encoding, which follows the images in the ZIP
    dcmmkdir: float
    study_id: int


def dicomdir_rounds(work: Path, count: int, rounds: int, say) -> DicomdirTimes:
    """Medians of ours (from the index) and dcmmkdir (from the files) over ``count``
    images, and the id of their study."""
    from dicomgw.media import Dicomdir, media_plan
    from dicomgw.models import IngestSource, Study
    from dicomgw.services import ingest_file

    folder = work / "many"
    say(f"Writing and ingesting {count} small images for the DICOMDIR comparison…")
    paths = write_small_images(folder, count)
    facility = bench_facility("bench-many")
    for path in paths:
        if not ingest_file(facility=facility, path=path, source=IngestSource.DEMO).ok:
            raise RuntimeError("ingest of a small image failed")
    studies = list(Study.objects.filter(facility=facility))
    ours, layout, encode, theirs = [], [], [], []
    for _round in range(rounds):
        started = time.perf_counter()
        plan = media_plan(studies=studies)
        planned = time.perf_counter()
        dicomdir = Dicomdir(plan)
        laid_out = time.perf_counter()
        data = b"".join(dicomdir.chunks())
        ours.append(time.perf_counter() - started)
        layout.append(laid_out - planned)
        encode.append(time.perf_counter() - laid_out)
        if data.count(b"IMAGE ") < count or len(data) != dicomdir.size:
            raise RuntimeError("our DICOMDIR lacks records")
        output = folder / "DICOMDIR"
        output.unlink(missing_ok=True)
        started = time.perf_counter()
        result = subprocess.run(["dcmmkdir", "-q", "+r", "+id", str(folder), "+D", str(output),
                                 "IMAGES"], capture_output=True, text=True, cwd=folder)
        theirs.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise RuntimeError(f"dcmmkdir failed: {result.stderr[-500:]}")
    shutil.rmtree(folder)
    return DicomdirTimes(median(ours), median(layout), median(encode), median(theirs),
                         studies[0].pk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--orthanc-seconds", type=float, default=20,
                        help="cut Orthanc's (deflated) /media download after this many "
                             "seconds and take its rate over them; 0 waits for all of it")
    parser.add_argument("--dicomdir-images", type=int, default=10_000)
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="PostgreSQL server (postgres://user@host:port/) to create the "
                             "run's database on; SQLite otherwise")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    for tool in ("curl", "dcmmkdir", "unzip"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required")

    def say(text: str) -> None:
        print(text, flush=True)

    say(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    work = Path(tempfile.mkdtemp(prefix="bench-zip-"))
    database_url = database_name = None
    if args.postgres:
        database_url, database_name = create_postgres_database(args.postgres)
    orthanc = copy_to = None
    try:
        env = setup_django(work, database_url=database_url)
        small = generate_and_ingest(work, slices=20, say=say, seed=SMALL_CT_SEED)
        study = generate_and_ingest(work, slices=args.slices, say=say)
        from django.conf import settings

        archive_dir = Path(settings.STORAGES["archive"]["OPTIONS"]["location"]) / str(
            study.facility_id)

        say("A fresh worker downloads the ZIP of the 20-slice CT…")
        small_served = serve(env, work, share_study(small.study_id), times=1)

        copies: list[float] = []
        copy_to = copy_target(work, study.bytes)
        warm(study.files)

        def copy_once() -> None:
            copies.append(copy_tree(archive_dir, copy_to))

        check = work / "check.zip"
        say(f"A fresh worker downloads the ZIP of the {args.slices}-slice CT: a check, then "
            f"{args.rounds} rounds beside cp -r…")
        served = serve(env, work, share_study(study.study_id), times=args.rounds + 1,
                       between=copy_once, check=check)
        check_zip(check, images=len(study.files))
        zip_bytes = check.stat().st_size
        check.unlink()
        ours = served.downloads[1:]
        copies = copies[1:]

        say("Loading the study into Orthanc…")
        orthanc_config, orthanc = start_orthanc(work)
        orthanc_study = orthanc_upload(orthanc_config, study.files)
        orthanc_run = curl(f"http://127.0.0.1:{orthanc_config.http_port}/studies/"
                           f"{orthanc_study}/media", max_seconds=args.orthanc_seconds)

        dicomdir = dicomdir_rounds(work, args.dicomdir_images, args.rounds, say)
        say(f"A fresh worker downloads the ZIP of the {args.dicomdir_images} small images…")
        many_served = serve(env, work, share_study(dicomdir.study_id), times=args.rounds)
    finally:
        if orthanc is not None:
            from dicomgw.demopacs import stop_process

            stop_process(orthanc)
        if database_name:
            drop_postgres_database(args.postgres, database_name)
        if copy_to is not None and copy_to.parent != work:
            shutil.rmtree(copy_to.parent, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ours_mb_s = median([d.mb_s for d in ours])
    cp_mb_s = median([study.bytes / MB / s for s in copies])
    ttfb = median([d.ttfb_ms for d in ours])
    many_ttfb = median([d.ttfb_ms for d in many_served.downloads])
    rows = [
        ("ours: ZIP over HTTP (gunicorn, curl)", f"{ours_mb_s:8.0f}",
         ", ".join(f"{d.mb_s:.0f}" for d in ours)),
        (f"cp -r of the archived files (to {copy_to.parent.parent})", f"{cp_mb_s:8.0f}",
         ", ".join(f"{study.bytes / MB / s:.0f}" for s in copies)),
        (f"Orthanc /studies/<id>/media ({orthanc_run.seconds:.0f} s)",
         f"{orthanc_run.mb_s:8.1f}", f"first byte after {orthanc_run.ttfb_ms:.0f} ms"),
    ]
    print()
    print(f"Study: {len(study.files)} files, {study.bytes / MB:.0f} MB; ZIP {zip_bytes / MB:.0f} MB"
          f" (MB = 10^6 bytes)")
    print(f"{'contender':48} {'MB/s':>8}  rounds")
    for name, value, each in rows:
        print(f"{name:48} {value}  {each}")
    print(f"ours / cp -r: {ours_mb_s / cp_mb_s:.2f}x")
    print()
    print(f"{'ours, a fresh worker each':32} {'images':>7} {'MB':>7} {'first byte ms':>14} "
          f"{'RSS ready MB':>13} {'peak RSS MB':>12}")
    for name, images, size, case in (
            ("20-slice CT", len(small.files), small.bytes, small_served),
            (f"{args.slices}-slice CT", len(study.files), study.bytes, served),
            (f"{args.dicomdir_images} small images", args.dicomdir_images, None, many_served)):
        firsts = ", ".join(f"{d.ttfb_ms:.1f}" for d in case.downloads)
        megabytes = f"{size / MB:7.0f}" if size else f"{case.downloads[0].bytes / MB:7.0f}"
        print(f"{name:32} {images:>7} {megabytes} {firsts:>14} {case.rss_ready_mb:13.0f} "
              f"{case.peak_mb:12.0f}")
    print("(first byte: curl's time to the status line and headers of POST /view/download; "
          "RSS ready: the worker after the recipient opened the share; peak: VmHWM of the "
          "worker over its whole life)")
    print()
    per_image = dicomdir.ours / args.dicomdir_images * 1e6
    print(f"DICOMDIR of {args.dicomdir_images} images: ours {dicomdir.ours:.3f} s "
          f"({per_image:.1f} µs per image: index query and plan, then layout "
          f"{dicomdir.layout:.3f} s, encoding {dicomdir.encode:.3f} s), dcmmkdir "
          f"{dicomdir.dcmmkdir:.3f} s ({dicomdir.dcmmkdir / dicomdir.ours:.0f}x ours)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        "bench": "zip", "unit": "MB/s", "ours": round(ours_mb_s, 1), "peer": round(cp_mb_s, 1),
        "peer_name": "cp -r", "ratio": round(ours_mb_s / cp_mb_s, 3),
        "ttfb_ms": round(ttfb, 1), "ttfb_10k_ms": round(many_ttfb, 1),
        "peak_rss_mb": round(max(small_served.peak_mb, served.peak_mb, many_served.peak_mb), 1),
        "peak_rss_small_mb": round(small_served.peak_mb, 1),
        "peak_rss_large_mb": round(served.peak_mb, 1),
        "peak_rss_10k_mb": round(many_served.peak_mb, 1),
        "orthanc_media_mb_s": round(orthanc_run.mb_s, 2),
        "dicomdir_10k_s": round(dicomdir.ours, 3), "dcmmkdir_10k_s": round(dicomdir.dcmmkdir, 3),
    }))


if __name__ == "__main__":
    main()
