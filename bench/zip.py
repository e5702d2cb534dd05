"""ZIP download benchmark: a generated ~1 GB CT (2,000 slices of 512x512x16 bits)
ingested into a throwaway archive, downloaded as ``IMAGES_<Lastname>.zip`` over HTTP from
our own code under gunicorn, beside ``cp -r`` of the same archived files and Orthanc's
``/studies/<id>/media`` of the same study, in the same run. Also the DICOMDIR of 10,000
images: ours (from the archive index) beside dcmtk's ``dcmmkdir`` (from the files).

Everything runs on 127.0.0.1 in a throwaway folder: a fresh database (SQLite, or a
PostgreSQL database created and dropped for the run with ``--postgres``), one gunicorn
sync worker serving ``dicomgw.media.zip_response``, an Orthanc holding the study. The
page cache is warm for every contender (the files are read once before timing); the
rounds alternate which goes first; medians are reported. curl downloads to /dev/null
and gives time to first byte and throughput; ``cp -r`` copies into /dev/shm when it has
room, so that neither side waits on the disc's write-back.

    .venv/bin/python bench/zip.py [--rounds 3] [--slices 2000] [--orthanc-rounds 1]
                                  [--dicomdir-images 10000] [--postgres URL] [--keep]

The last line printed is one JSON object with the medians."""

import argparse
import json
import os
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

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

CT_SEED = 6000
MB = 1_000_000


# --- The server under test: gunicorn imports this file as the module "zip" ------------

def _zip_view(request, study_id: int):
    from dicomgw.media import family_name, zip_response
    from dicomgw.models import Study

    studies = Study.objects.filter(pk=study_id).select_related("patient")
    return zip_response(studies=studies, patient_last_name=family_name(studies[0].patient.name),
                        include_viewer=False)


def _urlpatterns():
    from django.urls import path

    return [path("zip/<int:study_id>/", _zip_view)]


_handler = None


def application(environ, start_response):
    """WSGI entry for gunicorn: the project's settings with this module's one URL."""
    global _handler, urlpatterns
    if _handler is None:
        import django
        from django.conf import settings
        from django.core.handlers.wsgi import WSGIHandler

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pockethealth.settings")
        django.setup()
        urlpatterns = _urlpatterns()
        settings.ROOT_URLCONF = __name__
        _handler = WSGIHandler()
    return _handler(environ, start_response)


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
           "DATABASE_URL": database_url or f"sqlite:///{work / 'var' / 'bench.sqlite3'}"}
    for name in ("STORAGE_ROOT", "SPOOL_DIR", "CACHE_URL"):
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


def generate_and_ingest(work: Path, *, slices: int, say) -> LoadedStudy:
    """A CT of ``slices`` slices from the demo generator, ingested file by file."""
    from dicomgw.demo import DEMO_STUDIES, iter_ct_study
    from dicomgw.models import IngestSource, Instance
    from dicomgw.services import ingest_file
    from pockethealth.models import Facility

    facility = Facility.objects.create(name="Benchmark Hospital", short_name="bench",
                                       time_zone="UTC")
    ct = next(study for study in DEMO_STUDIES if study.modality == "CT")
    say(f"Generating and ingesting a {slices}-slice CT…")
    started = time.monotonic()
    study_id = None
    for path in iter_ct_study(work / "gen", ct, seed=CT_SEED, anchor=date(2025, 1, 15),
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


# --- Contenders ------------------------------------------------------------------------


@dataclass
class Download:
    seconds: float
    ttfb_ms: float
    bytes: int

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds


def curl(url: str) -> Download:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w",
         "%{http_code} %{time_starttransfer} %{time_total} %{size_download}", url],
        capture_output=True, text=True, timeout=3600)
    code, ttfb, total, size = result.stdout.split()
    if result.returncode != 0 or code != "200":
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
    def __init__(self, env: dict, port: int, log_path: Path):
        self.log = open(log_path, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--worker-class", "sync", "--timeout", "1800", "--pythonpath", str(BENCH_DIR),
             "--chdir", str(BASE_DIR), "zip:application"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = port
        deadline = time.monotonic() + 60
        while not self.worker_pids():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not start (see {log_path})")
            time.sleep(0.2)

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


def dicomdir_rounds(work: Path, count: int, rounds: int,
                    say) -> tuple[float, float, float, int]:
    """(ours from the index: plan + DICOMDIR, ours DICOMDIR alone, dcmmkdir) medians, and
    the id of the study of ``count`` images."""
    from dicomgw.media import dicomdir_bytes, media_plan
    from dicomgw.models import IngestSource, Study
    from dicomgw.services import ingest_file
    from pockethealth.models import Facility

    folder = work / "many"
    say(f"Writing and ingesting {count} small images for the DICOMDIR comparison…")
    paths = write_small_images(folder, count)
    facility = Facility.objects.create(name="Many", short_name="many", time_zone="UTC")
    for path in paths:
        if not ingest_file(facility=facility, path=path, source=IngestSource.DEMO).ok:
            raise RuntimeError("ingest of a small image failed")
    studies = list(Study.objects.filter(facility=facility))
    ours_total, ours_build, theirs = [], [], []
    for _round in range(rounds):
        started = time.perf_counter()
        plan = media_plan(studies=studies)
        planned = time.perf_counter()
        data = dicomdir_bytes(plan)
        ours_total.append(time.perf_counter() - started)
        ours_build.append(time.perf_counter() - planned)
        if data.count(b"IMAGE ") < count:
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
    return median(ours_total), median(ours_build), median(theirs), studies[0].pk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--orthanc-rounds", type=int, default=1,
                        help="Orthanc compresses its /media ZIP: a round takes minutes")
    parser.add_argument("--dicomdir-images", type=int, default=10_000)
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="PostgreSQL server (postgres://user@host:port/) to create the "
                             "run's database on; SQLite otherwise")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    for tool in ("curl", "dcmmkdir"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required")

    def say(text: str) -> None:
        print(text, flush=True)

    say(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    work = Path(tempfile.mkdtemp(prefix="bench-zip-"))
    database_url = database_name = None
    if args.postgres:
        database_url, database_name = create_postgres_database(args.postgres)
    server = orthanc = copy_to = None
    try:
        env = setup_django(work, database_url=database_url)
        study = generate_and_ingest(work, slices=args.slices, say=say)
        from django.conf import settings

        archive_dir = Path(settings.STORAGES["archive"]["OPTIONS"]["location"]) / str(
            study.facility_id)

        port = free_port()
        server = Gunicorn(env, port, work / "gunicorn.log")
        [worker] = server.worker_pids()
        url = f"http://127.0.0.1:{port}/zip/{study.study_id}/"
        say(f"Checking the ZIP ({worker=})…")
        check = work / "check.zip"
        subprocess.run(["curl", "-sS", "-o", str(check), url], check=True)
        tested = subprocess.run(["unzip", "-tq", str(check)], capture_output=True, text=True)
        if tested.returncode != 0:
            raise RuntimeError(f"the ZIP does not test clean: {tested.stdout[-500:]}")
        zip_bytes = check.stat().st_size
        check.unlink()
        rss_before = vm_rss_mb(worker)
        reset_peak(worker)

        say("Loading the study into Orthanc…")
        orthanc_config, orthanc = start_orthanc(work)
        orthanc_study = orthanc_upload(orthanc_config, study.files)
        media_url = f"http://127.0.0.1:{orthanc_config.http_port}/studies/{orthanc_study}/media"

        ours: list[Download] = []
        copies: list[float] = []
        copy_to = copy_target(work, study.bytes)
        warm(study.files)
        for round_number in range(args.rounds):
            say(f"Round {round_number + 1}/{args.rounds}")
            contenders = ["ours", "cp"] if round_number % 2 == 0 else ["cp", "ours"]
            for contender in contenders:
                if contender == "ours":
                    ours.append(curl(url))
                else:
                    copies.append(copy_tree(archive_dir, copy_to))
        orthanc_runs = [curl(media_url) for _ in range(args.orthanc_rounds)]

        dicomdir_ours, dicomdir_build, dicomdir_dcmtk, many_study = dicomdir_rounds(
            work, args.dicomdir_images, args.rounds, say)
        many_url = f"http://127.0.0.1:{port}/zip/{many_study}/"
        many = [curl(many_url) for _ in range(args.rounds)]
        peak_rss = vm_hwm_mb(worker)
    finally:
        if server is not None:
            server.stop()
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
    orthanc_mb_s = median([d.mb_s for d in orthanc_runs])
    ttfb = median([d.ttfb_ms for d in ours])
    rows = [
        ("ours: ZIP over HTTP (gunicorn, curl)", f"{ours_mb_s:8.0f}",
         ", ".join(f"{d.mb_s:.0f}" for d in ours)),
        (f"cp -r of the archived files (to {copy_to.parent.parent})", f"{cp_mb_s:8.0f}",
         ", ".join(f"{study.bytes / MB / s:.0f}" for s in copies)),
        ("Orthanc /studies/<id>/media", f"{orthanc_mb_s:8.1f}",
         ", ".join(f"{d.mb_s:.1f}" for d in orthanc_runs)),
    ]
    print()
    print(f"Study: {len(study.files)} files, {study.bytes / MB:.0f} MB; ZIP {zip_bytes / MB:.0f} MB"
          f" (MB = 10^6 bytes)")
    print(f"{'contender':40} {'MB/s':>8}  rounds")
    for name, value, each in rows:
        print(f"{name:40} {value}  {each}")
    print(f"ours / cp -r: {ours_mb_s / cp_mb_s:.2f}x; time to first byte (median): {ttfb:.1f} ms"
          f" ({', '.join(f'{d.ttfb_ms:.1f}' for d in ours)})")
    many_ttfb = median([d.ttfb_ms for d in many])
    print(f"time to first byte of the ZIP of the {args.dicomdir_images} small images: "
          f"{many_ttfb:.1f} ms ({', '.join(f'{d.ttfb_ms:.1f}' for d in many)})")
    print(f"server worker RSS: {rss_before:.0f} MB after its first download, peak "
          f"{peak_rss:.0f} MB over every download (the process as a whole: Django and every "
          f"app)")
    print(f"DICOMDIR of {args.dicomdir_images} images: ours {dicomdir_ours:.3f} s (index query "
          f"and records; records alone {dicomdir_build:.3f} s), dcmmkdir {dicomdir_dcmtk:.3f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(json.dumps({
        "bench": "zip", "unit": "MB/s", "ours": round(ours_mb_s, 1), "peer": round(cp_mb_s, 1),
        "peer_name": "cp -r", "ratio": round(ours_mb_s / cp_mb_s, 3),
        "ttfb_ms": round(ttfb, 1), "ttfb_10k_ms": round(many_ttfb, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "orthanc_media_mb_s": round(orthanc_mb_s, 2),
        "dicomdir_10k_s": round(dicomdir_ours, 3), "dcmmkdir_10k_s": round(dicomdir_dcmtk, 3),
    }))


if __name__ == "__main__":
    main()
