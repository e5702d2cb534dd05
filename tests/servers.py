"""Our web server as a process of its own, on the test database: for tests that stop it,
freeze it, or need the server that is deployed."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from tests.conftest import BASE_DIR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """``manage.py runserver`` on the test database (or, with ``gunicorn`` True, gunicorn
    as deployed: gthread workers), started and stopped at will on one port; its log is
    kept across restarts."""

    def __init__(self, tmp_path: Path, *, gunicorn: bool = False, **env: str):
        self.gunicorn = gunicorn
        db = connection.settings_dict
        self.port = free_port()
        self.log_path = tmp_path / "web.log"
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "STORAGE_ROOT": str(tmp_path / "storage"),
            "SPOOL_DIR": str(settings.SPOOL_DIR),
            "DATABASE_CONN_MAX_AGE": "60",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "a")
        command = (["-m", "gunicorn", "pockethealth.wsgi", "-k", "gthread", "-w", "1",
                    "--threads", "4", "-b", f"127.0.0.1:{self.port}"] if self.gunicorn
                   else ["manage.py", "runserver", "--noreload", f"127.0.0.1:{self.port}"])
        self.process = subprocess.Popen(
            [sys.executable, *command],
            cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the server did not start:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """Gone at once, as when the machine or the network drops: no response for the
        requests in flight."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def freeze(self) -> None:
        """Still connected, never answering: as when a connection dies without closing."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
