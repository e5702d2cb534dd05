"""Run the demo PACS in the foreground until SIGINT or SIGTERM: Orthanc when it is
installed, otherwise a small query/retrieve SCP of ours, holding generated demo studies
that the archive does not have yet. ``manage.py serve`` starts it for ``make run``."""

import signal
import threading
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from dicomgw.demo import DEFAULT_CT_SLICES
from dicomgw.demopacs import (
    PACS_SEED,
    DemoPacsConfig,
    DemoPacsError,
    free_port,
    orthanc_installed,
    run_orthanc,
    run_qr_scp,
    seed_files,
)


class Command(BaseCommand):
    help = ("Run the demo PACS (Orthanc when installed) with generated demo studies until "
            "stopped.")

    def add_arguments(self, parser):
        parser.add_argument("--ae-title", default=settings.DEMO_PACS_AE_TITLE,
                            help="AE title of the demo PACS (default: %(default)s).")
        parser.add_argument("--port", type=int, default=settings.DEMO_PACS_PORT,
                            help="DICOM port (default: %(default)s).")
        parser.add_argument("--http-port", type=int, default=0,
                            help="Orthanc's HTTP port on 127.0.0.1 (default: a free port).")
        parser.add_argument("--scp-port", type=int, default=settings.DICOM_SCP_PORT,
                            help="Port of our storage SCP, the C-MOVE destination "
                                 "(default: %(default)s).")
        parser.add_argument("--dir", default=str(settings.VAR_DIR / "demopacs"),
                            help="Folder for the demo files and Orthanc's storage "
                                 "(default: %(default)s).")
        parser.add_argument("--engine", choices=["auto", "orthanc", "pynetdicom"],
                            default="auto",
                            help="auto: Orthanc when installed, else our own Q/R SCP.")
        parser.add_argument("--ct-slices", type=int, default=DEFAULT_CT_SLICES,
                            help="Slices of the demo CT (default: %(default)s).")

    def handle(self, *args, ae_title, port, http_port, scp_port, dir, engine, ct_slices,
               **options):
        if engine == "auto":
            engine = "orthanc" if orthanc_installed() else "pynetdicom"
        elif engine == "orthanc" and not orthanc_installed():
            raise CommandError("Orthanc is not installed (apt-get install orthanc).")
        root = Path(dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        config = DemoPacsConfig(
            root=root, ae_title=ae_title, port=port, http_port=http_port or free_port(),
            scp_ae_title=settings.DICOM_AE_TITLE, scp_host="127.0.0.1", scp_port=scp_port,
            seed=PACS_SEED, ct_slices=ct_slices,
        )

        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())

        def say(message: str) -> None:
            self.stdout.write(message)
            self.stdout.flush()

        try:
            files = seed_files(config, today=timezone.localdate(), stop=stop, say=say)
            run = run_orthanc if engine == "orthanc" else run_qr_scp
            status = run(config, files, stop=stop, say=say)
        except DemoPacsError as exc:
            if stop.is_set():
                status = 0
            else:
                raise CommandError(f"Demo PACS: {exc}") from exc
        if status:
            raise CommandError(f"Demo PACS stopped with status {status}.")
        say("Demo PACS stopped.")
