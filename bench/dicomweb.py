"""The viewer's DICOMweb reads of a generated 500-slice 512×512 16-bit CT: the series
metadata (first read, then from the cache) and every frame, through our endpoints
(gunicorn, a recipient's session) against Orthanc's DICOMweb plugin serving the same
files, in the same run.

A throwaway installation (a PostgreSQL database created and dropped for the run, files
in a temporary folder, the cache on Redis) archives the CT and shares it; Orthanc, with
Debian's ``orthanc-dicomweb`` plugin, stores the same files. Then, for each server:

- the series metadata, first read (our cache emptied; Orthanc's first request after
  its start) and again (the median of ROUNDS);
- all frames, requested one per request as OHIF does (after the series metadata, as
  OHIF reads it), over CONNECTIONS keep-alive connections (a browser's six by
  default): frames per second, MB/s, and the servers' CPU time per frame (our gunicorn
  workers and their PostgreSQL backends; Orthanc's process).

    .venv/bin/python bench/dicomweb.py [--slices 500] [--connections 6] [--rounds 5]
                                       [--workers 2] [--postgres URL] [--cache URL]
                                       [--profile PREFIX]

The last line printed is one JSON object: frames per second, ours beside Orthanc's."""

import argparse
import functools
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

from bench.upload import (  # noqa: E402
    our_processes,
    start_profilers,
    stop_profilers,
    timed_cpu,
)
from bench.view import (  # noqa: E402
    Gunicorn,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    setup_django,
)

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
OHIF_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
# Orthanc's plugin (1.7) does not know the "*" transfer syntax; native frames need none.
ORTHANC_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream"
PEER_NAME = "Orthanc 1.10 + DICOMweb plugin"
CT_SEED = 7000


def generate_ct(folder: Path, slices: int) -> list[Path]:
    from dicomgw.demo import DEMO_STUDIES, iter_ct_study

    ct = next(study for study in DEMO_STUDIES if study.modality == "CT")
    return list(iter_ct_study(folder, ct, seed=CT_SEED, anchor=date(2025, 1, 15),
                              slices=slices))


# --- Orthanc with its DICOMweb plugin ----------------------------------------------------


class Orthanc:
    def __init__(self, work: Path):
        self.root = work / "orthanc"
        self.root.mkdir()
        self.port = free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "Plugins": [DICOMWEB_PLUGIN],
            "HttpPort": self.port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpCompressionEnabled": False,
            "KeepAlive": True, "HttpThreadsCount": 50,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.root / "orthanc.log", "wb")
        self.process = subprocess.Popen(
            [ORTHANC, str(self.root / "orthanc.json")], cwd=self.root, stdout=self.log,
            stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/system")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def upload(self, files: list[Path]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            for path in files:
                conn.request("POST", "/instances", body=path.read_bytes(),
                             headers={"Content-Type": "application/dicom"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
        finally:
            conn.close()

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


# --- HTTP ------------------------------------------------------------------------------------


def get(port: int, path: str, headers: dict | None = None,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def timed_get(port: int, path: str, headers: dict) -> tuple[float, bytes]:
    started = time.perf_counter()
    status, body = get(port, path, headers)
    elapsed = time.perf_counter() - started
    assert status == 200, (status, body[:300])
    return elapsed, body


def frames_run(port: int, paths: list[str], headers: dict, connections: int
               ) -> tuple[float, int]:
    """Every path once, over ``connections`` keep-alive connections: (seconds, bytes)."""
    chunks = [paths[i::connections] for i in range(connections)]
    received = [0] * connections

    def work(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for path in chunks[index]:
                status, body = get(port, path, headers, conn)
                assert status == 200, (status, body[:200])
                received[index] += len(body)
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(work, range(connections)))
    return time.perf_counter() - started, sum(received)


# --- Ours ------------------------------------------------------------------------------------


def archive_and_share(files: list[Path]) -> tuple[str, str, list[str], str]:
    """Ingest the CT, share it, open the share as a recipient; returns the study and
    series UIDs, the SOP Instance UIDs in order, and the session cookie."""
    import datetime

    from django.conf import settings
    from django.test import Client

    from dicomgw.models import IngestSource, Instance, Study
    from dicomgw.services import ingest_files
    from pockethealth.models import Facility, StaffUser
    from sharing.models import Share
    from sharing.services import Recipient, share_create

    facility = Facility.objects.create(name="Benchmark General Hospital", short_name="bench",
                                       time_zone="America/Toronto")
    clerk = StaffUser.objects.create_user(username="bench-clerk", password="x" * 20,
                                          facility=facility)
    report = ingest_files(facility=facility, paths=files, source=IngestSource.IMPORT)
    assert all(outcome.ok for outcome in report), "ingest failed"
    study = Study.objects.get()
    made = share_create(facility=facility, patient_or_identity=study.patient, studies=[study],
                        recipient=Recipient(method=Share.Method.PRINT), created_by=clerk)
    client = Client()
    birth = study.patient.birth_date or datetime.date(1970, 1, 1)
    response = client.post("/view", {"code": made.code, "birth_date": birth.isoformat()})
    assert response.status_code == 303, response.status_code
    name = settings.RECIPIENT_SESSION_COOKIE_NAME
    series = study.series.get()
    sops = list(Instance.objects.filter(series=series).order_by("instance_number")
                .values_list("sop_instance_uid", flat=True))
    return (study.study_instance_uid, series.series_instance_uid, sops,
            f"{name}={client.cookies[name].value}")


def forget_metadata() -> None:
    from django.core.cache import cache

    from dicomgw.models import Instance
    from viewer.services import _metadata_key

    cache.delete_many([_metadata_key(i) for i in Instance.objects.all()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--postgres", metavar="URL",
                        default=os.environ.get("BENCH_POSTGRES",
                                               "postgres://postgres@127.0.0.1:5432/"))
    parser.add_argument("--cache", metavar="URL",
                        default=os.environ.get("BENCH_CACHE_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--profile", metavar="PREFIX",
                        help="py-spy stacks of our workers during the first frames round, "
                             "one raw file per worker: PREFIX-<pid>.txt")
    args = parser.parse_args()
    if not (os.access(ORTHANC, os.X_OK) and Path(DICOMWEB_PLUGIN).exists()):
        sys.exit("Orthanc and its DICOMweb plugin are required (apt-get install orthanc "
                 "orthanc-dicomweb)")

    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    database_url, database_name = create_postgres_database(args.postgres)
    server = orthanc = None
    results: dict[str, dict] = {}
    try:
        env = setup_django(work, database_url=database_url, cache_url=args.cache)
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", verbosity=0)
        print(f"Generating a {args.slices}-slice CT…", flush=True)
        files = generate_ct(work / "ct", args.slices)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        study_uid, series_uid, sops, cookie = archive_and_share(files)
        connections.close_all()
        orthanc = Orthanc(work)
        orthanc.upload(files)
        server = Gunicorn(env, free_port(), args.workers, args.threads, work / "gunicorn.log")

        series_path = f"/studies/{study_uid}/series/{series_uid}"
        # Every worker thread past its first request (imports, connections), as Orthanc
        # is past its uploads.
        frames_run(server.port, ["/view/dicomweb/studies"] * args.workers * args.threads * 2,
                   {"Cookie": cookie}, args.workers * args.threads)
        targets = {
            "ours": (server.port, "/view/dicomweb", {"Cookie": cookie}, OHIF_FRAMES_ACCEPT),
            "peer": (orthanc.port, "/dicom-web", {}, ORTHANC_FRAMES_ACCEPT),
        }
        for key, (port, root, headers, frames_accept) in targets.items():
            if key == "ours":
                forget_metadata()
            first, body = timed_get(port, f"{root}{series_path}/metadata",
                                    {**headers, "Accept": "application/dicom+json"})
            assert len(json.loads(body)) == len(sops)
            again = statistics.median(
                timed_get(port, f"{root}{series_path}/metadata",
                          {**headers, "Accept": "application/dicom+json"})[0]
                for _ in range(args.rounds))
            paths = [f"{root}{series_path}/instances/{sop}/frames/1" for sop in sops]
            frame_headers = {**headers, "Accept": frames_accept}
            frames_run(port, paths[:20], frame_headers, args.connections)  # warm-up
            processes = ((lambda: our_processes(server)) if key == "ours"
                         else (lambda: {"orthanc": [orthanc.process.pid]}))
            runs = []
            for number in range(args.rounds):
                profilers = (start_profilers(server, args.profile)
                             if args.profile and key == "ours" and number == 0 else [])
                runs.append(timed_cpu(processes, functools.partial(
                    frames_run, port, paths, frame_headers, args.connections)))
                stop_profilers(profilers)
            seconds = statistics.median(s for (s, _bytes), _cpu in runs)
            results[key] = {"metadata_first_s": first, "metadata_again_s": again,
                            "frames_per_s": len(paths) / seconds,
                            "mb_per_s": runs[0][0][1] / seconds / 1e6,
                            "cpu_ms_per_frame": statistics.median(
                                1000 * sum(cpu.values()) / len(paths) for _run, cpu in runs)}
            print(f"{key}: metadata {first:.2f} s, then {again * 1000:.0f} ms; frames "
                  f"{results[key]['frames_per_s']:.0f}/s", flush=True)
    finally:
        if server is not None:
            server.stop()
        if orthanc is not None:
            orthanc.stop()
        drop_postgres_database(args.postgres, database_name)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{args.slices}-slice CT ({megabytes:.0f} MB); gunicorn -w {args.workers} "
          f"(gthread x{args.threads}), PostgreSQL, Redis cache; {args.connections} "
          f"connections; medians of {args.rounds}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'server':<34} {'metadata 1st s':>14} {'again ms':>9} {'frames/s':>9} "
          f"{'MB/s':>7} {'CPU ms/frame':>13}")
    for key, name in (("ours", "ours (/view/dicomweb)"), ("peer", PEER_NAME)):
        r = results[key]
        print(f"{name:<34} {r['metadata_first_s']:>14.2f} {r['metadata_again_s'] * 1000:>9.0f} "
              f"{r['frames_per_s']:>9.0f} {r['mb_per_s']:>7.1f} {r['cpu_ms_per_frame']:>13.2f}")
    ours, peer = results["ours"]["frames_per_s"], results["peer"]["frames_per_s"]
    print(json.dumps({
        "bench": "dicomweb", "unit": "frames/s", "ours": round(ours, 1),
        "peer": round(peer, 1), "peer_name": PEER_NAME, "ratio": round(ours / peer, 3),
        "metadata_first_s": {k: round(v["metadata_first_s"], 3) for k, v in results.items()},
        "metadata_again_ms": {k: round(v["metadata_again_s"] * 1000, 1)
                              for k, v in results.items()},
        "cpu_ms_per_frame": {k: round(v["cpu_ms_per_frame"], 2) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
