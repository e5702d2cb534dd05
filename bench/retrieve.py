"""Retrieve benchmark: C-MOVE of a 500-slice 512x512 16-bit CT (about 260 MB) from
Orthanc into our storage SCP (``manage.py runscp``), against dcmtk's ``movescu`` moving
the same study from the same Orthanc into its own receiver, in the same run.

Everything runs on 127.0.0.1 in a throwaway folder: a fresh database (SQLite, or a
PostgreSQL database created and dropped for the run with ``--postgres``), an Orthanc
holding the generated studies, our SCP as a child process. Every peer runs at its best:
``TCP_NODELAY=1`` for Orthanc and dcmtk (Debian's builds leave Nagle's algorithm on),
the largest PDU both receivers allow (128 KiB), movescu writing bit-preserved.

Ours is timed from the C-MOVE request to its final response (every image spooled and
acknowledged); when the archive index holds them all is reported apart. movescu is timed
whole, and also from when it accepts Orthanc's sub-association (it polls for that once a
second; see ``move_dcmtk``). The peak memory
of our receiver process (VmHWM) is taken for a small study and for the large one, each
in a fresh process: it should not grow with the study.

    .venv/bin/python bench/retrieve.py [--rounds 5] [--slices 500] [--processes N]
                                       [--split K] [--postgres postgres://user@host:5432/]

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

PACS_AE = "BENCHPACS"
SCP_AE = "EXCHANGE"
MOVESCU_AE = "MOVESCU"
MAX_PDU = 131072
CT_SEED = 5000
SMALL_SEED = 1000
INDEX_TIMEOUT = 900


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


@dataclass
class CtStudy:
    """A generated CT: its UIDs and files."""

    study_uid: str
    series_uid: str
    sop_uids: list[str]
    files: list[Path]
    bytes: int = 0


@dataclass
class Round:
    seconds: float
    index_seconds: float | None = None
    # movescu: from accepting the sub-association to the end.
    transfer_seconds: float | None = None


@dataclass
class Results:
    ours: list[Round] = field(default_factory=list)
    peer: list[Round] = field(default_factory=list)


def generate_ct(out_dir: Path, *, slices: int, seed: int) -> CtStudy:
    from pydicom import dcmread

    from dicomgw.demo import DEMO_STUDIES, iter_ct_study

    ct = next(study for study in DEMO_STUDIES if study.modality == "CT")
    files = list(iter_ct_study(out_dir, ct, seed=seed, anchor=date(2025, 1, 15), slices=slices))
    first = dcmread(files[0], stop_before_pixels=True)
    sop_uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return CtStudy(study_uid=str(first.StudyInstanceUID),
                 series_uid=str(first.SeriesInstanceUID), sop_uids=sop_uids, files=files,
                 bytes=sum(f.stat().st_size for f in files))


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(inode)
    return found


def holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


class Runscp:
    """``manage.py runscp`` as a child process. Its receivers are whichever processes of
    it hold a listening socket on the port (itself, or the children it starts)."""

    def __init__(self, env: dict, port: int, processes: int, log_path: Path):
        self.log = open(log_path, "ab")  # closed in stop()
        argv = [sys.executable, str(BASE_DIR / "manage.py"), "runscp", "--port", str(port)]
        if processes > 1:
            argv += ["--processes", str(processes)]
        self.port = port
        self.process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(self.receiver_pids()) < processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"runscp did not start (see {log_path})")
            time.sleep(0.2)

    def receiver_pids(self) -> list[int]:
        inodes = listening_inodes(self.port)
        tree = [self.process.pid, *children_of(self.process.pid)]
        return [pid for pid in tree if holds_socket(pid, inodes)]

    def peak_rss_mb(self) -> tuple[float, float | None]:
        """Peak RSS of the receivers (the largest), and of the indexing process when
        that is another one."""
        receivers = self.receiver_pids()
        indexer = None if self.process.pid in receivers else vm_hwm_mb(self.process.pid)
        return max(vm_hwm_mb(pid) for pid in receivers), indexer

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def archived(facility, study: CtStudy) -> int:
    from dicomgw.models import Instance

    return Instance.objects.filter(facility=facility,
                                   series__study__study_instance_uid=study.study_uid).count()


def wait_indexed(facility, study: CtStudy, started: float) -> float:
    deadline = time.monotonic() + INDEX_TIMEOUT
    while archived(facility, study) < len(study.files):
        if time.monotonic() > deadline:
            raise RuntimeError("the archive did not index the study in time")
        time.sleep(0.05)
    return time.perf_counter() - started


def clear_archive(facility) -> None:
    """Forget what the last round archived, so each round stores the study anew. Plain
    DELETEs on the archive's own tables: nothing else refers to them in this run."""
    from django.conf import settings
    from django.db import connection

    from dicomgw.models import Instance, Patient, Series, Study

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Instance._meta.db_table} WHERE facility_id = %s",
                       [facility.pk])
        cursor.execute(f"DELETE FROM {Series._meta.db_table} WHERE study_id IN "
                       f"(SELECT id FROM {Study._meta.db_table} WHERE facility_id = %s)",
                       [facility.pk])
        cursor.execute(f"DELETE FROM {Study._meta.db_table} WHERE facility_id = %s",
                       [facility.pk])
        cursor.execute(f"DELETE FROM {Patient._meta.db_table} WHERE facility_id = %s",
                       [facility.pk])
    shutil.rmtree(settings.STORAGES["archive"]["OPTIONS"]["location"], ignore_errors=True)


def move_ours(node, study: CtStudy, split: int) -> float:
    """C-MOVE the study to our SCP; with ``split`` > 1, as that many IMAGE-level C-MOVEs
    of consecutive slices on parallel associations. Returns seconds to the (last) final
    response."""
    from dicomgw import dimse

    def one(uids):
        sub = dimse.move(node, study_uid=study.study_uid, destination_ae=SCP_AE,
                         series_uid=study.series_uid if uids else None,
                         instance_uids=uids)
        if sub.status != 0 or sub.failed or sub.completed != (len(uids) if uids else
                                                              len(study.files)):
            raise RuntimeError(f"C-MOVE into our SCP did not complete: {sub}")

    started = time.perf_counter()
    if split <= 1:
        one(None)
    else:
        size = -(-len(study.sop_uids) // split)
        chunks = [study.sop_uids[i:i + size] for i in range(0, len(study.sop_uids), size)]
        with ThreadPoolExecutor(len(chunks)) as pool:
            list(pool.map(one, chunks))
    return time.perf_counter() - started


def move_dcmtk(study: CtStudy, *, pacs_port: int, receive_port: int,
               out_dir: Path) -> Round:
    """movescu receiving the study itself. Besides its total time, the time from the
    moment it accepted Orthanc's sub-association: dcmtk's C-MOVE loop looks for that
    association only once a second (``selectReadable`` in dcmnet/dimmove.cc), a fixed
    delay of up to 1 s that is movescu's own, not Orthanc's or the network's."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    argv = ["movescu", "-v", "-S", "-aet", MOVESCU_AE, "-aec", PACS_AE, "-aem", MOVESCU_AE,
            "--port", str(receive_port), "-pdu", str(MAX_PDU), "+xa", "+B",
            "-od", str(out_dir), "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study.study_uid}", "127.0.0.1", str(pacs_port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    accepted = None
    tail: list[str] = []
    started = time.perf_counter()
    # In bit-preserving mode movescu 3.6.7 writes into its working folder, not -od.
    with subprocess.Popen(argv, env=env, cwd=out_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if accepted is None and "Sub-Association Received" in line:
                accepted = time.perf_counter()
            tail = [*tail[-9:], line]
        returncode = process.wait(timeout=900)
    finished = time.perf_counter()
    files = list(out_dir.iterdir())
    size = sum(f.stat().st_size for f in files)
    # Whole files only: a file meta header of its own may make each a few bytes longer.
    if returncode != 0 or len(files) != len(study.files) or size < study.bytes:
        raise RuntimeError(f"movescu failed ({returncode}, {len(files)} files, "
                           f"{size} bytes): {''.join(tail)}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return Round(finished - started,
                 transfer_seconds=finished - accepted if accepted else None)


def start_profilers(runscp: Runscp, prefix: str) -> list[subprocess.Popen]:
    """py-spy sampling the receivers and the indexing process, every thread, as
    ``PREFIX-<pid>.txt`` (collapsed stacks)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("--profile needs py-spy (pip install py-spy)")
    pids = {runscp.process.pid, *runscp.receiver_pids()}
    profilers = [subprocess.Popen([spy, "record", "-p", str(pid), "-r", "250", "-f", "raw",
                                   "-o", f"{prefix}-{pid}.txt", "--idle"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in sorted(pids)]
    time.sleep(1)
    return profilers


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(timeout=60)


def setup_django(work: Path, *, scp_port: int, postgres: str | None) -> dict:
    """Environment for a throwaway installation in ``work``; returns it after pointing
    this process at it too."""
    env = {**os.environ,
           "PH_VAR_DIR": str(work / "var"),
           "DICOM_SCP_HOST": "127.0.0.1",
           "DICOM_SCP_PORT": str(scp_port),
           "DICOM_SCP_AE_TITLE": SCP_AE,
           "DICOM_SCP_MAX_PDU": str(MAX_PDU),
           "CELERY_BROKER_URL": "filesystem://",
           "DJANGO_SETTINGS_MODULE": "pockethealth.settings"}
    env.pop("STORAGE_ROOT", None)
    env.pop("SPOOL_DIR", None)
    env["DATABASE_URL"] = postgres or f"sqlite:///{work / 'var' / 'bench.sqlite3'}"
    os.environ.update(env)
    for name in ("STORAGE_ROOT", "SPOOL_DIR"):
        os.environ.pop(name, None)
    import django

    django.setup()
    return env


def create_postgres_database(server_url: str) -> tuple[str, str]:
    """A new database on the server for this run: (its URL, its name)."""
    import psycopg2

    name = f"ph_bench_{uuid.uuid4().hex[:10]}"
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


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--small-slices", type=int, default=50,
                        help="the small study for the memory comparison")
    parser.add_argument("--processes", type=int, default=1,
                        help="runscp --processes (receiver processes)")
    parser.add_argument("--split", type=int, default=1,
                        help="C-MOVE as this many parallel IMAGE-level requests")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("BENCH_POSTGRES"),
                        help="PostgreSQL server (postgres://user@host:port/) to create the "
                             "run's database on; SQLite otherwise")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="record runscp's processes with py-spy during the first "
                             "round, as PREFIX-<pid>.txt (collapsed stacks)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from dicomgw.demopacs import (
        DemoPacsConfig,
        OrthancApi,
        free_port,
        orthanc_installed,
        start_orthanc,
        stop_process,
        wait_for_orthanc,
    )

    for tool in ("movescu",):
        if not shutil.which(tool):
            sys.exit(f"{tool} (dcmtk) is required")
    if not orthanc_installed():
        sys.exit("Orthanc is required")

    work = Path(tempfile.mkdtemp(prefix="bench-retrieve-"))
    pacs_port, http_port, scp_port, movescu_port = (free_port() for _ in range(4))
    database_url = database_name = None
    if args.postgres:
        database_url, database_name = create_postgres_database(args.postgres)
    orthanc = runscp = None
    try:
        env = setup_django(work, scp_port=scp_port, postgres=database_url)
        from django.core.management import call_command

        from dicomgw.models import PacsNode
        from pockethealth.models import Facility

        call_command("migrate", verbosity=0)
        facility = Facility.objects.create(name="Benchmark Hospital", short_name="bench",
                                           time_zone="UTC")
        node = PacsNode.objects.create(facility=facility, name="Orthanc", ae_title=PACS_AE,
                                       host="127.0.0.1", port=pacs_port, max_pdu=MAX_PDU,
                                       may_send=True, dimse_timeout=600, network_timeout=600)

        print(f"Generating a {args.slices}-slice and a {args.small_slices}-slice CT…",
              flush=True)
        big = generate_ct(work / "big", slices=args.slices, seed=CT_SEED)
        small = generate_ct(work / "small", slices=args.small_slices, seed=SMALL_SEED)

        config = DemoPacsConfig(
            root=work / "orthanc", ae_title=PACS_AE, port=pacs_port, http_port=http_port,
            scp_ae_title=SCP_AE, scp_host="127.0.0.1", scp_port=scp_port,
            extra_modalities=(("movescu", MOVESCU_AE, "127.0.0.1", movescu_port),),
        )
        config.root.mkdir()
        orthanc = start_orthanc(config)
        wait_for_orthanc(config, orthanc, stop=threading.Event())
        api = OrthancApi(http_port)
        for path in [*big.files, *small.files]:
            api.request("POST", "/instances", path.read_bytes())
        api.close()
        shutil.rmtree(work / "big")
        shutil.rmtree(work / "small")

        log_path = work / "runscp.log"
        # The memory of a receiver that took only the small study.
        runscp = Runscp(env, scp_port, args.processes, log_path)
        move_ours(node, small, args.split)
        wait_indexed(facility, small, time.perf_counter())
        small_rss = runscp.peak_rss_mb()
        runscp.stop()
        runscp = None
        clear_archive(facility)

        runscp = Runscp(env, scp_port, args.processes, log_path)
        # One untimed round each, so that both start from the same caches.
        print("Warming up…", flush=True)
        move_ours(node, big, args.split)
        wait_indexed(facility, big, time.perf_counter())
        clear_archive(facility)
        move_dcmtk(big, pacs_port=pacs_port, receive_port=movescu_port,
                   out_dir=work / "movescu")
        results = Results()
        for number in range(args.rounds):
            order = ("ours", "peer") if number % 2 == 0 else ("peer", "ours")
            for who in order:
                if who == "ours":
                    profilers = (start_profilers(runscp, args.profile)
                                 if args.profile and number == 0 else [])
                    started = time.perf_counter()
                    seconds = move_ours(node, big, args.split)
                    results.ours.append(Round(seconds, wait_indexed(facility, big, started)))
                    stop_profilers(profilers)
                    clear_archive(facility)
                else:
                    results.peer.append(move_dcmtk(
                        big, pacs_port=pacs_port, receive_port=movescu_port,
                        out_dir=work / "movescu"))
            print(f"round {number + 1}: ours {results.ours[-1].seconds:.2f} s "
                  f"(indexed {results.ours[-1].index_seconds:.2f} s), "
                  f"movescu {results.peer[-1].seconds:.2f} s", flush=True)
        big_rss = runscp.peak_rss_mb()
    finally:
        if runscp is not None:
            runscp.stop()
        if orthanc is not None:
            stop_process(orthanc)
        if database_name:
            drop_postgres_database(args.postgres, database_name)
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    report(args, big, results, small=small, small_rss=small_rss, big_rss=big_rss)


def report(args, big: CtStudy, results: Results, *, small: CtStudy,
           small_rss: tuple[float, float | None], big_rss: tuple[float, float | None]) -> None:
    megabytes = big.bytes / 1e6
    images = len(big.files)
    ours = [megabytes / r.seconds for r in results.ours]
    peer = [megabytes / r.seconds for r in results.peer]
    indexed = [megabytes / r.index_seconds for r in results.ours]
    setup = (f"runscp --processes {args.processes}" if args.processes > 1 else "runscp") + (
        f", C-MOVE split in {args.split} parallel requests" if args.split > 1 else
        ", one C-MOVE")
    database = "PostgreSQL" if args.postgres else "SQLite"
    print()
    print(f"C-MOVE of a {images}-image CT ({megabytes:.0f} MB) from Orthanc, "
          f"{len(results.ours)} rounds; ours: {setup}, {database}")
    rows = [
        ("ours: to the final C-MOVE response", [r.seconds for r in results.ours], ours),
        ("ours: until indexed in the archive", [r.index_seconds for r in results.ours],
         indexed),
        ("dcmtk movescu", [r.seconds for r in results.peer], peer),
    ]
    transfer = [megabytes / r.transfer_seconds for r in results.peer if r.transfer_seconds]
    if len(transfer) == len(results.peer):
        rows.append(("movescu, after its 1 s accept poll",
                     [r.transfer_seconds for r in results.peer], transfer))
    cells = [(label, " ".join(f"{s:.2f}" for s in seconds), median(rates))
             for label, seconds, rates in rows]
    width = max(len("rounds (s)"), *(len(rounds) for _, rounds, _ in cells))
    print(f"{'receiver':<34} {'rounds (s)':<{width}} {'images/s':>9} {'MB/s':>8}")
    for label, rounds, rate in cells:
        print(f"{label:<34} {rounds:<{width}} {rate * images / megabytes:>9.1f} {rate:>8.1f}")
    ratio = median(ours) / median(peer)
    print(f"ratio ours/movescu: {ratio:.2f}" + (
        f" (against movescu after its accept poll: {median(ours) / median(transfer):.2f})"
        if len(transfer) == len(results.peer) else ""))
    print(f"our receiver's peak RSS: {small_rss[0]:.0f} MB after a {len(small.files)}-image "
          f"study, {big_rss[0]:.0f} MB after the {images}-image study (fresh processes)")
    if big_rss[1] is not None:
        print(f"runscp's indexing process, peak RSS: {small_rss[1]:.0f} MB and "
              f"{big_rss[1]:.0f} MB")
    print(json.dumps({
        "bench": "retrieve", "unit": "MB/s", "ours": round(median(ours), 1),
        "peer": round(median(peer), 1), "peer_name": "dcmtk movescu",
        "ratio": round(ratio, 2), "peak_rss_mb": round(big_rss[0], 1), "images": images,
    }))


if __name__ == "__main__":
    main()
