"""/view and the Share Inbox under load: many recipients at once against gunicorn, beside
a static file served by the same server in the same run.

A throwaway installation (a PostgreSQL database created and dropped for the run, files
in a temporary folder, the shared cache on Redis) holds one share of six exams. gunicorn
serves it with WORKERS sync workers and persistent database connections, as in
production. wrk (Debian's ``wrk``; a small Python client when it is missing) then holds
CONNECTIONS connections open on:

- ``GET /view``: the code and date of birth form (CSRF token, no database);
- ``GET /view/inbox`` with a recipient's session: the session, the share, its exams and
  their transfer state read, the page rendered, an audit event written, every time;
- the peer, ``GET /static/css/app.css``: a static file that WhiteNoise serves from inside
  the same gunicorn workers, the floor of what any page of this server costs.

    .venv/bin/python bench/view.py [--connections 200] [--seconds 15] [--workers 4]
                                   [--threads 1] [--rounds 1]
                                   [--postgres postgres://user@host:5432/]

The last line printed is one JSON object: the inbox's requests per second ("ours")
beside the static file's ("peer"), and the inbox's 99th percentile latency."""

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

PEER_PATH = "/static/css/app.css"
PEER_NAME = "gunicorn+WhiteNoise static file (/static/css/app.css)"
BIRTH_DATE = "1981/08/29"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- A throwaway installation ---------------------------------------------------------


def create_postgres_database(server_url: str) -> tuple[str, str]:
    import psycopg2

    name = f"ph_bench_view_{uuid.uuid4().hex[:8]}"
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


def setup_django(work: Path, *, database_url: str, cache_url: str) -> dict:
    env = {**os.environ,
           "PH_VAR_DIR": str(work / "var"),
           "DATABASE_URL": database_url,
           "DATABASE_CONN_MAX_AGE": "60",
           "CACHE_URL": cache_url,
           "CELERY_BROKER_URL": "filesystem://",
           "DEBUG": "false",
           "LOG_LEVEL": "WARNING",
           "DJANGO_SETTINGS_MODULE": "pockethealth.settings"}
    for name in ("STORAGE_ROOT", "SPOOL_DIR", "SITE_URL"):
        env.pop(name, None)
        os.environ.pop(name, None)
    os.environ.update(env)
    import django

    django.setup()
    return env


def make_share() -> str:
    """A facility, its clerk and a share of six archived exams; returns the code."""
    import datetime

    from dicomgw.models import Patient, Series, Study
    from dicomgw.services import name_search_key, patient_identity_key
    from pockethealth.models import Facility, StaffUser
    from sharing.models import Share
    from sharing.services import Recipient, share_create

    facility = Facility.objects.create(name="Benchmark General Hospital", short_name="bench",
                                       time_zone="America/Toronto")
    clerk = StaffUser.objects.create_user(username="bench-clerk", password=uuid.uuid4().hex,
                                          facility=facility)
    name, birth = "LOVELACE^ADA", datetime.date(1981, 8, 29)
    patient = Patient.objects.create(
        facility=facility, patient_id="B-1", name=name, name_search=name_search_key(name),
        birth_date=birth, sex="F", identity_key=patient_identity_key(
            patient_id="B-1", issuer="", name=name, birth_date=birth))
    exams = [("CT", "CT CHEST ABDOMEN PELVIS W CONTRAST", 3, 640),
             ("MR", "MRI BRAIN WO CONTRAST", 5, 212), ("CR", "XR CHEST 2 VIEWS", 1, 2),
             ("US", "US ABDOMEN COMPLETE", 1, 48), ("MG", "MAMMO SCREENING BILATERAL", 1, 4),
             ("CT", "CT HEAD WITHOUT CONTRAST", 2, 180)]
    studies = []
    for number, (modality, description, series, images) in enumerate(exams):
        study = Study.objects.create(
            facility=facility, patient=patient,
            study_instance_uid=f"1.2.826.0.1.3680043.10.999.{number}",
            study_date=datetime.date(2024, 12, 1) - datetime.timedelta(days=97 * number),
            description=description, modalities=modality, num_series=series,
            num_instances=images)
        for s in range(series):
            Series.objects.create(
                study=study, series_instance_uid=f"{study.study_instance_uid}.{s}",
                modality=modality, series_number=s + 1, num_instances=images // series)
        studies.append(study)
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=Recipient(method=Share.Method.PRINT), created_by=clerk)
    return made.code


@dataclass
class InProcess:
    inbox_queries: int
    cpu_ms: dict  # target -> CPU milliseconds per request


def in_process(code: str, paths: dict, n: int = 300) -> InProcess:
    """What one request of each target costs this process's CPU (through Django's test
    client, its handler warmed up), and the database queries behind an inbox page:
    figures that a busy machine does not blur as it blurs requests per second."""
    from django.db import connection
    from django.test import Client

    anonymous, recipient = Client(), Client()
    response = recipient.post("/view", {"code": code, "birth_date": BIRTH_DATE})
    assert response.status_code == 303, response.status_code
    queries = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        assert recipient.get("/view/inbox").status_code == 200
    cpu = {}
    for key, (path, with_session) in paths.items():
        client = recipient if with_session else anonymous
        for _ in range(20):
            client.get(path)
        started = time.process_time()
        for _ in range(n):
            client.get(path)
        cpu[key] = (time.process_time() - started) / n * 1000
    return InProcess(len(queries), cpu)


# --- The server -------------------------------------------------------------------------


class Gunicorn:
    def __init__(self, env: dict, port: int, workers: int, threads: int, log: Path):
        self.port = port
        self.log = open(log, "w")
        # Threads mean gunicorn's gthread workers, which keep connections alive.
        kind = ["-k", "gthread", "--threads", str(threads)] if threads > 1 else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "pockethealth.wsgi", "-w", str(workers), *kind,
             "-b", f"127.0.0.1:{port}", "--backlog", "4096", "--timeout", "120"],
            cwd=BASE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/view")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("gunicorn did not answer")

    def request(self, method: str, path: str, *, body: str | None = None,
                headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def cookies_from(headers) -> dict:
    found = {}
    for name, value in headers:
        if name.lower() == "set-cookie":
            key, _sep, rest = value.partition("=")
            found[key.strip()] = rest.split(";")[0]
    return found


def recipient_cookie(server: Gunicorn, code: str) -> str:
    """Open the share as a recipient would: the form, then code and date of birth."""
    status, headers, body = server.request("GET", "/view")
    cookies = cookies_from(headers)
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()
    cookie = f"csrftoken={cookies['csrftoken']}"
    status, headers, _body = server.request(
        "POST", "/view", body=urlencode({"csrfmiddlewaretoken": token, "code": code,
                                         "birth_date": BIRTH_DATE}),
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303, status
    cookie += f"; view_session={cookies_from(headers)['view_session']}"
    status, _headers, body = server.request("GET", "/view/inbox", headers={"Cookie": cookie})
    assert status == 200 and b"LOVELACE, ADA" in body, status
    return cookie


# --- Load ---------------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers and socket errors


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, *, connections: int, seconds: int, cookie: str | None, name: str) -> Load:
    threads = max(1, min(connections, os.cpu_count() or 1))
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
               "--latency", "--timeout", "30s"]
    if cookie:
        command += ["-H", f"Cookie: {cookie}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                          out):
        errors += sum(int(g) for g in match.groups())
    return Load(name, rps, p50, p99, requests, errors)


async def _client(port: int, request: bytes, stop_at: float, latencies: list[float],
                  errors: list[int]) -> None:
    reader = writer = None
    while time.monotonic() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 2"):
                errors.append(1)
            if re.search(rb"(?i)connection:\s*close", head):
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, AttributeError):
            errors.append(1)
            writer = None


def python_load(port: int, path: str, *, connections: int, seconds: int, cookie: str | None,
                name: str) -> Load:
    """The same measurement without wrk: keep-alive connections from asyncio."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: keep-alive"]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    errors: list[int] = []

    async def run():
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, request, stop_at, latencies, errors)
                               for _ in range(connections)))

    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pick(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return Load(name, len(latencies) / elapsed, pick(0.5), pick(0.99), len(latencies),
                len(errors))


def measure(server: Gunicorn, path: str, *, connections: int, seconds: int,
            cookie: str | None, name: str) -> Load:
    if shutil.which("wrk"):
        url = f"http://127.0.0.1:{server.port}{path}"
        wrk(url, connections=connections, seconds=3, cookie=cookie, name=name)  # warm-up
        return wrk(url, connections=connections, seconds=seconds, cookie=cookie, name=name)
    python_load(server.port, path, connections=connections, seconds=3, cookie=cookie, name=name)
    return python_load(server.port, path, connections=connections, seconds=seconds,
                       cookie=cookie, name=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per worker (gthread workers) when more than 1")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each target this many times, alternating; medians")
    parser.add_argument("--postgres", metavar="URL",
                        default=os.environ.get("BENCH_POSTGRES",
                                               "postgres://postgres@127.0.0.1:5432/"))
    parser.add_argument("--cache", metavar="URL",
                        default=os.environ.get("BENCH_CACHE_URL", "redis://127.0.0.1:6379/6"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-view-"))
    database_url, database_name = create_postgres_database(args.postgres)
    server = None
    try:
        env = setup_django(work, database_url=database_url, cache_url=args.cache)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        code = make_share()
        costs = in_process(code, {"form": ("/view", False), "inbox": ("/view/inbox", True),
                                  "peer": (PEER_PATH, False)})
        from django.db import connections

        connections.close_all()
        server = Gunicorn(env, free_port(), args.workers, args.threads,
                          work / "gunicorn.log")
        cookie = recipient_cookie(server, code)
        results: dict[str, list[Load]] = {"form": [], "inbox": [], "peer": []}
        targets = {"form": ("/view", None, "GET /view (the form)"),
                   "inbox": ("/view/inbox", cookie, "GET /view/inbox (a recipient session)"),
                   "peer": (PEER_PATH, None, PEER_NAME)}
        for number in range(args.rounds):
            order = list(targets) if number % 2 == 0 else list(reversed(targets))
            for key in order:
                path, with_cookie, name = targets[key]
                results[key].append(measure(server, path, connections=args.connections,
                                            seconds=args.seconds, cookie=with_cookie,
                                            name=name))
                print(f"round {number + 1}: {name}: {results[key][-1].rps:.0f} req/s",
                      flush=True)
    finally:
        if server is not None:
            server.stop()
        drop_postgres_database(args.postgres, database_name)
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str, attr: str) -> float:
        return statistics.median(getattr(load, attr) for load in results[key])

    tool = "wrk" if shutil.which("wrk") else "asyncio client"
    print()
    kind = f"gthread x{args.threads}" if args.threads > 1 else "sync"
    print(f"{args.connections} concurrent connections, {args.seconds} s per run, "
          f"{args.rounds} run(s) each; gunicorn -w {args.workers} ({kind}), PostgreSQL, "
          f"Redis cache; {tool}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'target':<56} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'CPU ms':>7}")
    for key in ("form", "inbox", "peer"):
        last = results[key][-1]
        print(f"{last.name:<56} {med(key, 'rps'):>7.0f} {med(key, 'p50_ms'):>8.1f} "
              f"{med(key, 'p99_ms'):>8.1f} {sum(r.errors for r in results[key]):>6} "
              f"{costs.cpu_ms[key]:>7.2f}")
    print("CPU ms: the CPU time of one request in this process (Django's test client, "
          "mean of 300)")
    print(f"database queries per inbox page: {costs.inbox_queries}")
    ours, peer = med("inbox", "rps"), med("peer", "rps")
    print(json.dumps({"bench": "view", "unit": "req/s", "ours": round(ours, 1),
                      "peer": round(peer, 1), "peer_name": PEER_NAME,
                      "ratio": round(ours / peer, 3) if peer else None,
                      "p99_ms": round(med("inbox", "p99_ms"), 1)}))


if __name__ == "__main__":
    main()
