"""Upload benchmark: a 2,000-file MR/CT folder sent through the upload portal's real HTTP
path (PIN, announcements, the files several to a request as the portal's script sends
them, ingest into the archive index), beside
Orthanc's own ingest of the same files (``POST /instances``), in the same run.

Everything runs on 127.0.0.1 in a throwaway folder: a PostgreSQL database created and
dropped for the run (``--postgres``, else SQLite), the shared cache on Redis, our server
as gunicorn (WORKERS workers of THREADS threads, as deployed) with persistent database
connections (as in production), and an Orthanc with its storage in the same folder. Both
are fed by the same client: CLIENTS threads, each on one kept-alive connection, taking
the next request from a shared queue. Ours is timed from the first announcement to the
last file's answer; Orthanc from its first POST to its last answer. Each round gives ours
a new request of a new facility (an empty archive) and Orthanc a new, empty store;
nothing is deleted until the end (an archive only grows); rounds alternate which goes
first; medians are reported.

    .venv/bin/python bench/upload.py [--rounds 3] [--files 2000] [--clients 4]
                                     [--workers 4] [--threads 8]
                                     [--postgres postgres://user@host:5432/]
                                     [--profile PREFIX] [--keep]

The last line printed is one JSON object with the medians."""

import argparse
import base64
import http.client
import json
import os
import queue
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
sys.path.insert(0, str(BASE_DIR))

from bench.view import (  # noqa: E402
    Gunicorn,
    create_postgres_database,
    drop_postgres_database,
    setup_django,
)

HEAD_BYTES = 256
SEED = 4242


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- The folder --------------------------------------------------------------------------


def generate_folder(out_dir: Path, *, files: int) -> list[Path]:
    """A folder as a clinic's export leaves it: a brain MR in three weightings and an
    abdominal CT, four files in five MR, one in five CT, ``files`` in all."""
    from dicomgw.demo import DEMO_STUDIES, OKAFOR, SeriesSpec, iter_ct_study, iter_mr_study

    mr = next(s for s in DEMO_STUDIES if s.modality == "MR" and s.patient is OKAFOR)
    ct = next(s for s in DEMO_STUDIES if s.modality == "CT")
    ct_slices = files // 5
    mr_slices = -(-(files - ct_slices) // 3)
    sequences = [("T1", SeriesSpec(3, "AX T1 SE", 3)), ("T2", SeriesSpec(4, "AX T2 TSE", 8)),
                 ("FLAIR", SeriesSpec(5, "AX T2 FLAIR", 14))]
    anchor = date(2025, 1, 15)
    paths = list(iter_mr_study(out_dir, mr, sequences, seed=SEED, anchor=anchor,
                               slices=mr_slices, field_tesla=3.0))
    paths = paths[:files - ct_slices]
    paths += list(iter_ct_study(out_dir, ct, seed=SEED, anchor=anchor, slices=ct_slices))
    for extra in sorted(set(p for p in out_dir.rglob("*") if p.is_file()) - set(paths)):
        extra.unlink()
    return paths


# --- Feeding a server -----------------------------------------------------------------


def parallel(items: list | queue.Queue, clients: int, port: int, send) -> float:
    """``send(connection, item)`` for every item (a file's path, or a list of them),
    from ``clients`` threads with one kept-alive connection each; returns the seconds
    from start to the last answer. ``items`` is a list, or a queue filled meanwhile
    and ended by one None per client."""
    if isinstance(items, list):
        filled = queue.Queue()
        for item in [*items, *[None] * clients]:
            filled.put(item)
        items = filled
    failures: list[str] = []

    def worker():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while (item := items.get()) is not None:
                if failures:
                    continue
                try:
                    send(connection, item)
                except Exception as exc:  # reported after the run
                    failures.append(f"{item}: {exc}"[:500])
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} files failed, first: {failures[0]}")
    return elapsed


class Uploader:
    """The portal's script, in Python: the PIN, Ready to Upload, announcements, PUTs."""

    def __init__(self, port: int, facility: str, pin: str, root: Path):
        self.port, self.base, self.root = port, f"/upload/{facility}", root
        self.cookies: dict[str, str] = {}
        status, _headers, body = self.call("GET", self.base)
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1)
        self.csrf = self.cookies["csrftoken"]
        status, _headers, _body = self.call(
            "POST", self.base, urlencode({"pin": pin, "csrfmiddlewaretoken": token.decode()}),
            {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 303:
            raise RuntimeError(f"the PIN was refused ({status})")
        if self.call("POST", f"{self.base}/start", "", self.headers())[0] != 303:
            raise RuntimeError("the upload did not start")

    def headers(self, **extra) -> dict:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {"Cookie": cookie, "X-CSRFToken": self.csrf, "Accept": "application/json",
                **extra}

    def call(self, method, path, body=None, headers=None, connection=None):
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port,
                                                              timeout=120)
        try:
            headers = {**(headers or {})}
            if own and "Cookie" not in headers and self.cookies:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            for name, value in response.getheaders():
                if name.lower() == "set-cookie":
                    key, _, rest = value.partition("=")
                    self.cookies[key] = rest.split(";", 1)[0]
            return response.status, response.getheaders(), data
        finally:
            if own:
                connection.close()

    def relative(self, path: Path) -> str:
        return f"{self.root.name}/{path.relative_to(self.root).as_posix()}"

    def announce(self, chunk: list[Path], paths: list[Path]) -> None:
        """Announce ``chunk``, some of the files of the folder ``paths``."""
        files = []
        for path in chunk:
            with open(path, "rb") as fh:
                head = fh.read(HEAD_BYTES)
            files.append({"path": self.relative(path), "size": path.stat().st_size,
                          "head": base64.b64encode(head).decode()})
        body = json.dumps({"files": files, "total_files": len(paths),
                           "total_bytes": sum(p.stat().st_size for p in paths)})
        status, _h, data = self.call("POST", f"{self.base}/announce", body,
                                     self.headers(**{"Content-Type": "application/json"}))
        answer = json.loads(data)
        if status != 200 or any(f["outcome"] != "pending" for f in answer["files"]):
            raise RuntimeError(f"announcement refused: {status} {data[:300]!r}")

    def send(self, connection, batch: list[Path]) -> None:
        """Files several to a request, as the portal's script sends them."""
        manifest = json.dumps({"files": [{"path": self.relative(p), "size": p.stat().st_size}
                                         for p in batch]}).encode()
        body = manifest + b"".join(p.read_bytes() for p in batch)
        headers = self.headers(**{"Content-Type": "application/octet-stream",
                                  "X-Upload-Manifest-Length": str(len(manifest))})
        status, _h, data = self.call("POST", f"{self.base}/batch", body, headers,
                                     connection=connection)
        if status != 200 or any(f.get("outcome") != "stored"
                                for f in json.loads(data)["files"]):
            raise RuntimeError(f"{status} {data[:300]!r}")


def batches(paths: list[Path]) -> list[list[Path]]:
    """The paths grouped as the portal's script groups them (``nextBatch`` in
    static/retrieval/upload.js): up to UPLOAD_BATCH_FILES files and UPLOAD_BATCH_BYTES
    bytes to a request, a larger file alone."""
    from django.conf import settings

    grouped, current, size = [], [], 0
    for path in paths:
        file_size = path.stat().st_size
        if current and (len(current) == settings.UPLOAD_BATCH_FILES
                        or size + file_size > settings.UPLOAD_BATCH_BYTES):
            grouped.append(current)
            current, size = [], 0
        current.append(path)
        size += file_size
    return [*grouped, current] if current else grouped


def upload_ours(port: int, paths: list[Path], root: Path, clients: int) -> float:
    facility, pin = make_request()
    uploader = Uploader(port, facility, pin, root)
    # As the portal's script does: the files of each announcement are sent while the
    # next one is made.
    to_send: queue.Queue = queue.Queue()
    refused: list[Exception] = []

    def announce_all():
        from retrieval.upload import ANNOUNCE_BATCH

        try:
            for start in range(0, len(paths), ANNOUNCE_BATCH):
                chunk = paths[start:start + ANNOUNCE_BATCH]
                uploader.announce(chunk, paths)
                for batch in batches(chunk):
                    to_send.put(batch)
        except Exception as exc:  # raised after the run
            refused.append(exc)
        finally:
            for _ in range(clients):
                to_send.put(None)

    started = time.perf_counter()
    announcer = threading.Thread(target=announce_all)
    announcer.start()
    parallel(to_send, clients, port, uploader.send)
    announcer.join()
    elapsed = time.perf_counter() - started
    if refused:
        raise refused[0]
    if archived(facility) != len(paths):
        raise RuntimeError(f"the archive holds {archived(facility)} of {len(paths)} files")
    return elapsed


def upload_orthanc(port: int, paths: list[Path], clients: int) -> float:
    def post(connection, path):
        connection.request("POST", "/instances", body=path.read_bytes(),
                           headers={"Content-Type": "application/dicom"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200 or json.loads(data)["Status"] != "Success":
            raise RuntimeError(f"{response.status} {data[:300]!r}")

    return parallel(paths, clients, port, post)


def orthanc_fresh(work: Path, name: str) -> tuple[subprocess.Popen, int]:
    """An Orthanc on an empty store of its own (a new folder, a new index): each round
    ingests into an archive that only grows, as ours does, with no files deleted just
    before (see the README on this machine's file system). Returns it and its HTTP
    port."""
    from dicomgw.demopacs import DemoPacsConfig, free_port, start_orthanc, wait_for_orthanc

    config = DemoPacsConfig(root=work / f"orthanc-{name}", ae_title="BENCHPACS",
                            port=free_port(), http_port=free_port(), scp_ae_title="NOBODY",
                            scp_host="127.0.0.1", scp_port=free_port())
    config.root.mkdir()
    process = start_orthanc(config)
    wait_for_orthanc(config, process, stop=threading.Event())
    return process, config.http_port


# --- CPU used by each side ----------------------------------------------------------
# On a shared machine the seconds depend on what else runs; the processor time each side
# spends per file does not, or much less.

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def our_processes(server: Gunicorn) -> dict[str, list[int]]:
    """gunicorn's workers, and the PostgreSQL backends serving them."""
    from django.db import connection

    found = {"web": children(server.proc.pid), "database": []}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                           "current_database() AND pid <> pg_backend_pid()")
            found["database"] = [row[0] for row in cursor.fetchall()]
    return found


def timed_cpu(processes, run) -> tuple[float, dict[str, float]]:
    """Run ``run()``; its result, and the CPU seconds each group of ``processes()`` used
    meanwhile."""
    before = {pid: cpu_seconds(pid) for pids in processes().values() for pid in pids}
    result = run()
    used = {group: sum(cpu_seconds(pid) - before.get(pid, 0.0) for pid in pids)
            for group, pids in processes().items()}
    return result, used


# --- Our side's rows ----------------------------------------------------------------


def make_request() -> tuple[str, str]:
    """A new facility (so a new, empty archive) and a request of it; its short name and
    PIN."""
    import datetime

    from pockethealth.models import Facility, StaffUser
    from retrieval.services import OutsideFacility, RequestPatient, request_create

    tag = uuid.uuid4().hex[:8]
    facility = Facility.objects.create(name=f"Benchmark Hospital {tag}",
                                       short_name=f"bench-{tag}", time_zone="UTC")
    clerk = StaffUser.objects.create_user(username=f"bench-{tag}", password=uuid.uuid4().hex,
                                          facility=facility)
    made = request_create(
        facility=facility, target=OutsideFacility(name="Outside Imaging Clinic"),
        patient=RequestPatient(name="OKAFOR^Daniel", birth_date=datetime.date(1978, 11, 2)),
        details="MR brain and CT abdomen", created_by=clerk)
    return facility.short_name, made.pin


def archived(short_name: str) -> int:
    from dicomgw.models import Instance

    return Instance.objects.filter(facility__short_name=short_name).count()


@dataclass
class Round:
    ours: float
    peer: float
    ours_cpu: dict[str, float]
    peer_cpu: dict[str, float]


def start_profilers(server: Gunicorn, prefix: str) -> list[subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("--profile needs py-spy (pip install py-spy)")
    workers = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return [subprocess.Popen([spy, "record", "-p", pid, "-r", "250", "-f", "raw", "--gil",
                              "-o", f"{prefix}-{pid}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in workers.split()]


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4,
                        help="parallel connections, for both servers")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=8,
                        help="threads per worker, as deployed (1: sync workers)")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="PostgreSQL server (postgres://user@host:port/) to create the "
                             "run's database on; SQLite otherwise")
    parser.add_argument("--cache", default=os.environ.get("BENCH_CACHE_URL",
                                                          "redis://127.0.0.1:6379/7"))
    parser.add_argument("--profile", metavar="PREFIX",
                        help="record gunicorn's workers with py-spy during the first round")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]

    from dicomgw.demopacs import free_port, orthanc_installed, stop_process

    if not orthanc_installed():
        sys.exit("Orthanc is required")
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    web_port = free_port()
    database_url, database_name = (create_postgres_database(args.postgres) if args.postgres
                                   else (f"sqlite:///{work / 'bench.sqlite3'}", None))
    orthanc = server = None
    results: list[Round] = []
    try:
        env = setup_django(work, database_url=database_url, cache_url=args.cache)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        print(f"Generating a {args.files}-file MR/CT folder…", flush=True)
        root = work / "EXPORT"
        paths = generate_folder(root, files=args.files)
        total = sum(p.stat().st_size for p in paths)

        orthanc, http_port = orthanc_fresh(work, "warm-up")
        server = Gunicorn(env, web_port, args.workers, args.threads, work / "gunicorn.log")

        print("Warming up…", flush=True)
        # Enough connections (each stays with the worker that accepted it) that every
        # worker has read files, and imported pydicom, before the first round.
        warm_up = paths[:min(len(paths), 200 * args.workers)]
        upload_ours(web_port, warm_up, root, max(args.clients, 4 * args.workers))
        upload_orthanc(http_port, warm_up, args.clients)
        for number in range(args.rounds):
            stop_process(orthanc)
            orthanc, http_port = orthanc_fresh(work, f"round-{number + 1}")
            order = ("ours", "peer") if number % 2 == 0 else ("peer", "ours")
            seconds, cpu = {}, {}
            for who in order:
                if who == "ours":
                    profilers = (start_profilers(server, args.profile)
                                 if args.profile and number == 0 else [])
                    seconds["ours"], cpu["ours"] = timed_cpu(
                        lambda peer=orthanc: {**our_processes(server), "other": [peer.pid]},
                        lambda: upload_ours(web_port, paths, root, args.clients))
                    stop_profilers(profilers)
                else:
                    seconds["peer"], cpu["peer"] = timed_cpu(
                        lambda peer=orthanc: {"orthanc": [peer.pid],
                                 "other": [pid for pids in our_processes(server).values()
                                           for pid in pids]},
                        lambda port=http_port: upload_orthanc(port, paths, args.clients))
            results.append(Round(seconds["ours"], seconds["peer"], cpu["ours"], cpu["peer"]))
            # "other": what the side not being measured spent meanwhile (it should be
            # idle).
            print(f"round {number + 1}: ours {seconds['ours']:.2f} s "
                  f"({sum(cpu['ours'].values()) - cpu['ours']['other']:.1f} s of CPU; "
                  f"Orthanc meanwhile {cpu['ours']['other']:.2f} s), Orthanc "
                  f"{seconds['peer']:.2f} s ({cpu['peer']['orthanc']:.1f} s of CPU; "
                  f"ours meanwhile {cpu['peer']['other']:.2f} s)", flush=True)
    finally:
        if server is not None:
            server.stop()
        if orthanc is not None:
            stop_process(orthanc)
        if database_name:
            drop_postgres_database(args.postgres, database_name)
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(args, len(paths), total, results)


def report(args, files: int, total: int, results: list[Round]) -> None:
    megabytes = total / 1e6
    ours = [files / r.ours for r in results]
    peer = [files / r.peer for r in results]
    database = "PostgreSQL" if args.postgres else "SQLite"
    print()
    print(f"Upload of a {files}-file MR/CT folder ({megabytes:.0f} MB), {args.clients} "
          f"parallel connections, {len(results)} rounds")
    rows = [(f"ours: gunicorn -w {args.workers} --threads {args.threads}, {database}",
             [r.ours for r in results], ours),
            ("Orthanc POST /instances", [r.peer for r in results], peer)]
    width = max(len(" ".join(f"{s:.2f}" for s in seconds)) for _, seconds, _ in rows)
    print(f"{'receiver':<40} {'rounds (s)':<{width}} {'files/s':>8} {'MB/s':>7}")
    for label, seconds, rates in rows:
        rounds = " ".join(f"{s:.2f}" for s in seconds)
        rate = median(rates)
        print(f"{label:<40} {rounds:<{width}} {rate:>8.0f} {rate * megabytes / files:>7.1f}")
    ratio = median(ours) / median(peer)
    def per_file(group: str) -> float:
        """Median CPU milliseconds per file of one group of processes."""
        return median([1000 * (r.ours_cpu | r.peer_cpu)[group] / files for r in results])

    ours_cpu, peer_cpu = per_file("web") + per_file("database"), per_file("orthanc")
    print(f"ratio ours/Orthanc: {ratio:.2f}")
    print(f"server CPU per file: ours {ours_cpu:.1f} ms (gunicorn workers "
          f"{per_file('web'):.1f}, database {per_file('database'):.1f}), Orthanc "
          f"{peer_cpu:.1f} ms; load average before the run {args.load:.1f} on "
          f"{os.cpu_count()} cores")
    print(json.dumps({
        "bench": "upload", "unit": "files/s", "ours": round(median(ours), 1),
        "peer": round(median(peer), 1), "peer_name": "Orthanc POST /instances",
        "ratio": round(ratio, 2), "mb_s_ours": round(median(ours) * megabytes / files, 1),
        "mb_s_peer": round(median(peer) * megabytes / files, 1), "files": files,
        "cpu_ms_per_file_ours": round(ours_cpu, 1), "cpu_ms_per_file_peer": round(peer_cpu, 1),
    }))


if __name__ == "__main__":
    main()
