"""Install the browser viewer (OHIF) from the npm registry into OHIF_DIR: the pinned
version, checked against its recorded SHA-512, trimmed of what the viewer never loads.
Does nothing when that version is already there, unless ``--force``."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from viewer.ohif import PACKAGE, VERSION, ViewerInstallError, ohif_install, ohif_installed


class Command(BaseCommand):
    help = "Install the pinned OHIF viewer (npm package @ohif/app) into OHIF_DIR."

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true",
                            help="Install again even when this version is there.")
        parser.add_argument("--npm", default="npm", help="The npm command (default: npm).")

    def handle(self, *args, force: bool, npm: str, **options):
        if not force and ohif_installed() is not None:
            self.stdout.write(f"{PACKAGE}@{VERSION} is installed in {settings.OHIF_DIR}")
            return
        self.stdout.write(f"Installing {PACKAGE}@{VERSION} into {settings.OHIF_DIR}")
        try:
            installed = ohif_install(npm=npm)
        except ViewerInstallError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(
            f"{PACKAGE}@{installed.version}: {installed.files} files, "
            f"{installed.bytes / 1_000_000:.1f} MB"))
