"""Helpers of the PACS-link tests: studies of their own for the peers (made with the demo
generator, under test patients so that a search counts only its own), a wait loop, and
Celery workers started with the shortened waits of ``pacs_worker_settings``."""

import os
import signal
import subprocess
import sys
import time
import zlib
from datetime import date
from pathlib import Path

from dicomgw.demo import DemoPatient, DemoStudy, SeriesSpec, iter_ct_study, iter_mr_study

BASE_DIR = Path(__file__).resolve().parents[2]
WORKER_SETTINGS = "tests.dicomgw.pacs_worker_settings"
ANCHOR = date(2025, 6, 1)


def make_patient(family: str, given: str, patient_id: str,
                 birth_date: date = date(1970, 5, 17), sex: str = "F") -> DemoPatient:
    return DemoPatient(f"{family}^{given}", patient_id, "TEST", birth_date, sex)


def make_study(key: str, patient: DemoPatient, *, modality: str = "CT", days_ago: int = 10,
               description: str = "", accession: str = "") -> DemoStudy:
    return DemoStudy(key, patient, modality, description or f"{modality} TEST {key}",
                     days_ago, "101500", accession or f"A{zlib.crc32(key.encode()) % 10**8:08d}",
                     key[:16], "Doe^Jane^^Dr", "Test Hospital", "TEST-1", "ISO_IR 192")


def ct_files(out_dir: Path, study: DemoStudy, *, slices: int, seed: int = 7) -> list[Path]:
    """One axial series of ``slices`` 512×512 CT images."""
    return list(iter_ct_study(out_dir, study, seed=seed, anchor=ANCHOR, slices=slices))


def mr_files(out_dir: Path, study: DemoStudy, *, slices: int, seed: int = 7) -> list[Path]:
    """Three MR series (T1, T2, FLAIR) of ``slices`` images each."""
    sequences = [("T1", SeriesSpec(3, "AX T1", 3)), ("T2", SeriesSpec(4, "AX T2", 8)),
                 ("FLAIR", SeriesSpec(5, "AX FLAIR", 14))]
    return list(iter_mr_study(out_dir, study, sequences, seed=seed, anchor=ANCHOR,
                              slices=slices, field_tesla=3.0))


def study_date_of(study: DemoStudy) -> date:
    from datetime import timedelta

    return ANCHOR - timedelta(days=study.days_ago)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    """``predicate()``'s first truthy value, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def worker_env(tmp_path: Path) -> dict:
    """The environment of a worker that reads the test database and this test's
    storage, with the shortened waits."""
    from django.conf import settings
    from django.db import connection

    db = connection.settings_dict
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": WORKER_SETTINGS,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "STORAGE_ROOT": str(tmp_path / "storage"),
        "SPOOL_DIR": str(settings.SPOOL_DIR),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }


def start_worker(tmp_path: Path, name: str) -> subprocess.Popen:
    """A Celery worker process (solo pool) in a session of its own; returns once it is
    ready. Its log is ``tmp_path / f"{name}.log"``."""
    log_path = tmp_path / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by the child's exit
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pockethealth", "worker", "--pool=solo",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO",
         "-n", f"{name}-{os.getpid()}@%h"],
        cwd=BASE_DIR, env=worker_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    ready = wait_for(lambda: proc.poll() is not None or "ready." in log_path.read_text(),
                     timeout=60, interval=0.2)
    assert ready and proc.poll() is None, log_path.read_text()
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group, as a crash or an OOM kill would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
