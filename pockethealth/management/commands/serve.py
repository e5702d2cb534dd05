"""Start the web server, the Celery worker, our storage SCP and the demo PACS as
separate processes under one command; Ctrl-C stops them all."""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import get_commands
from django.core.management.base import BaseCommand

# Children whose end does not stop the rest: the product works without its demo PACS.
OPTIONAL = {"demopacs"}


class Command(BaseCommand):
    help = ("Run the web server, the Celery worker, the storage SCP and the demo PACS "
            "together (Ctrl-C stops all).")

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--concurrency", type=int, default=2)
        parser.add_argument("--no-demo-pacs", action="store_true",
                            help="Do not start the demo PACS.")

    def handle(self, *args, host, port, concurrency, no_demo_pacs=False, **options):
        manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
        commands = {
            "web": [*manage, "runserver", "--noreload", f"{host}:{port}"],
            # -B runs the periodic jobs (share expiry, purge, stale-job recovery) in the
            # worker: one process less on a single machine.
            "worker": [sys.executable, "-m", "celery", "-A", "pockethealth", "worker", "-B",
                       "-s", str(settings.VAR_DIR / "celerybeat-schedule"),
                       "-l", "INFO", f"--concurrency={concurrency}",
                       "--without-heartbeat", "--without-gossip", "--without-mingle"],
        }
        available = get_commands()
        if "runscp" in available:
            commands["scp"] = [*manage, "runscp"]
        if "demopacs" in available and not no_demo_pacs:
            commands["demopacs"] = [*manage, "demopacs"]
        children = {}
        for name, argv in commands.items():
            children[name] = subprocess.Popen(argv, cwd=settings.BASE_DIR, start_new_session=True)
            self.stdout.write(f"started {name} (pid {children[name].pid})")

        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exit_code = 0
        parent = os.getppid()
        welcome_at = time.monotonic() + 8
        try:
            while not stopping:
                if welcome_at and time.monotonic() > welcome_at:
                    welcome_at = None
                    welcome = settings.VAR_DIR / "welcome.txt"
                    if welcome.exists():
                        self.stdout.write(welcome.read_text())
                if os.getppid() != parent:
                    # Whatever started us (make, a terminal) is gone: stop with it.
                    stopping = True
                for name, proc in list(children.items()):
                    if proc.poll() is None:
                        continue
                    if name in OPTIONAL:
                        self.stderr.write(f"{name} exited with status {proc.returncode}; "
                                          "carrying on without it")
                        del children[name]
                        continue
                    self.stderr.write(f"{name} exited with status {proc.returncode}; stopping")
                    exit_code = proc.returncode or 1
                    stopping = True
                time.sleep(0.5)
        finally:
            # Each child leads its own process group: signal the whole group, so what a
            # child started (Celery's pool, Orthanc) goes too, even if the child is gone.
            for proc in children.values():
                signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + 15
            for proc in children.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
                    proc.wait()
            self.stdout.write("stopped")
        sys.exit(exit_code)


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
