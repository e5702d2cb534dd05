"""Run the storage SCP: ``manage.py runscp [--port N] [--processes N]``.

This process indexes what arrives; receiving runs in ``--processes`` child processes
(default 1) that listen on the same port (SO_REUSEPORT: the kernel spreads associations
over them, so several associations use several cores). Indexing parses every file and
writes to the database: in the receiving process it would hold the interpreter lock
the receive path needs, slowing a C-MOVE several-fold, so the two never share one."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from dicomgw.models import ae_title_validator
from dicomgw.scp import IngestPool, StorageSCP, scp_spool_root

# How often the indexing process looks for files written by receiver processes.
WATCH_SECONDS = 0.2
# A receiving process that dies is started again after this pause.
RESTART_SECONDS = 2


class Command(BaseCommand):
    help = "Run the DICOM storage SCP (AE title and port from settings)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=None, help="address to listen on")
        parser.add_argument("--port", type=int, default=None, help="TCP port")
        parser.add_argument("--ae-title", default=None, help="our AE title")
        parser.add_argument("--processes", type=int, default=1,
                            help="receiving processes sharing the port (default 1)")
        parser.add_argument("--ingest-workers", type=int, default=None,
                            help="indexing threads (default DICOM_SCP_INGEST_WORKERS)")
        # Internal: one receiver of a multi-process SCP.
        parser.add_argument("--receiver", action="store_true", help="==SUPPRESS==")

    def handle(self, *args, host, port, ae_title, processes, ingest_workers, receiver,
               **options):
        if ae_title is not None:
            try:
                ae_title_validator(ae_title)
            except Exception as exc:
                raise CommandError(f"--ae-title: {exc}") from None
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

        if receiver:
            scp = StorageSCP(host=host, port=port, ae_title=ae_title, ingest_workers=0,
                             reuse_port=True)
            scp.start()
            self.stdout.write(f"Storage SCP {scp.ae_title} receiving on {scp.host}:{scp.port}")
            self.stdout.flush()
            parent = os.getppid()
            # A receiver whose indexing process died (even by SIGKILL) stops too, rather
            # than keep the port with nobody indexing behind it.
            while not stop.wait(1) and os.getppid() == parent:
                pass
            scp.stop()
            return

        port = settings.DICOM_SCP_PORT if port is None else port
        if port == 0:
            raise CommandError("the SCP needs a fixed --port")
        self._supervise(host=host, port=port, ae_title=ae_title, processes=processes,
                        ingest_workers=ingest_workers, stop=stop)

    def _supervise(self, *, host, port, ae_title, processes, ingest_workers, stop):
        command = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "runscp",
                   "--receiver", "--port", str(port)]
        if host:
            command += ["--host", host]
        if ae_title:
            command += ["--ae-title", ae_title]
        workers = settings.DICOM_SCP_INGEST_WORKERS if ingest_workers is None else ingest_workers
        pool = IngestPool(scp_spool_root(), workers=max(workers, 1))
        waiting = pool.recover()
        if waiting:
            self.stdout.write(f"Indexing {waiting} files left in the spool")
        connections.close_all()
        children = [subprocess.Popen(command) for _ in range(processes)]
        # Receiving comes first: a sender waits on every image, indexing can catch up.
        os.nice(settings.DICOM_SCP_INGEST_NICENESS)
        pool.start(watch_seconds=WATCH_SECONDS)
        self.stdout.write(f"Storage SCP on port {port}: {processes} receiving process(es), "
                          f"{pool.workers} indexing thread(s)")
        self.stdout.flush()
        try:
            while not stop.wait(0.5):
                for index, child in enumerate(children):
                    if child.poll() is not None and not stop.is_set():
                        self.stderr.write(f"receiver {child.pid} exited with {child.returncode};"
                                          " starting another")
                        time.sleep(RESTART_SECONDS)
                        children[index] = subprocess.Popen(command)
        finally:
            for child in children:
                child.terminate()
            for child in children:
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            pool.stop()
