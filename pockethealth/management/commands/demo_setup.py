"""Prepare a fresh machine for a first look: a demo facility, its clerk (password and a
second factor), the demo PACS as the facility's PACS node and, when the archive is empty,
the demo studies. Prints how to sign in."""

import base64

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction
from django_otp.plugins.otp_totp.models import TOTPDevice

from dicomgw.models import PacsNode, Study
from pockethealth.models import Facility, StaffUser
from pockethealth.services import static_codes_issue

DEMO_FACILITY = {
    "short_name": "lakeshore",
    "name": "Lakeshore General Hospital",
    "address": "100 Harbour Street, Toronto, ON M5J 1A7",
    "phone": "416-555-0142",
    "fax": "416-555-0143",
    "time_zone": "America/Toronto",
}
WELCOME_FILE = settings.VAR_DIR / "welcome.txt"
DEMO_USERNAME = "clerk"
DEMO_PASSWORD = "demo-clerk-password"
SUPPORT_USERNAME = "support"
DEMO_PACS_NAME = "Demo PACS"


class Command(BaseCommand):
    help = "Create the demo facility, its clerk and demo studies; print how to sign in."

    def add_arguments(self, parser):
        parser.add_argument("--no-studies", action="store_true",
                            help="Do not generate demo studies.")

    def handle(self, *args, no_studies=False, **options):
        with transaction.atomic():
            facility, _ = Facility.objects.get_or_create(
                short_name=DEMO_FACILITY["short_name"], defaults=DEMO_FACILITY
            )
            clerk = self.ensure_user(DEMO_USERNAME, facility=facility,
                                     role=StaffUser.Role.CLERK, first_name="Dana",
                                     last_name="Morgan")
            support = self.ensure_user(SUPPORT_USERNAME, facility=None,
                                       role=StaffUser.Role.SUPPORT, first_name="Platform",
                                       last_name="Support", is_staff=True, is_superuser=True)
            # The demo PACS (``manage.py demopacs``, started by ``serve``) as this
            # facility's PACS: the clerk searches it, and our SCP accepts its C-MOVE
            # associations because the node may send.
            PacsNode.objects.update_or_create(
                facility=facility, name=DEMO_PACS_NAME,
                defaults={"ae_title": settings.DEMO_PACS_AE_TITLE, "host": "127.0.0.1",
                          "port": settings.DEMO_PACS_PORT, "may_send": True,
                          "is_active": True},
            )
            clerk_codes = static_codes_issue(user=clerk, count=5)
            support_codes = static_codes_issue(user=support, count=3)
        if not no_studies and not Study.objects.filter(facility=facility).exists():
            self.stdout.write("Generating demo studies (first run only)…")
            options = {"facility": facility.short_name}
            if settings.TESTDATA_DICOM_DIR.is_dir():
                options["testdata"] = str(settings.TESTDATA_DICOM_DIR)
            call_command("demo_studies", **options)

        totp = TOTPDevice.objects.get(user=clerk, confirmed=True)
        secret = base64.b32encode(totp.bin_key).decode().rstrip("=")
        line = "=" * 72
        welcome = [
            line,
            f"  {settings.PRODUCT_NAME} is starting at {settings.SITE_URL}/",
            f"  Clerk sign-in:  user '{DEMO_USERNAME}'  password '{DEMO_PASSWORD}'",
            f"  Second factor:  one of these backup codes: {' '.join(clerk_codes)}",
            f"                  or an authenticator app with the key {secret}",
            f"  Administration: {settings.SITE_URL}/admin/  user '{SUPPORT_USERNAME}'"
            f"  password '{DEMO_PASSWORD}'  codes: {' '.join(support_codes)}",
            f"  PACS:           '{DEMO_PACS_NAME}' ({settings.DEMO_PACS_AE_TITLE} at "
            f"127.0.0.1:{settings.DEMO_PACS_PORT}) holds the patients' earlier exams;",
            f"                  our DICOM receiver is {settings.DICOM_AE_TITLE} at "
            f"{settings.DICOM_SCP_HOST}:{settings.DICOM_SCP_PORT}",
            "  New backup codes are printed on every start. Ctrl-C stops everything.",
            line,
        ]
        text = "\n".join(welcome)
        self.stdout.write(self.style.SUCCESS(text))
        # `serve` prints it again once its children's start-up chatter is over.
        WELCOME_FILE.write_text(text + "\n")
        WELCOME_FILE.chmod(0o600)

    def ensure_user(self, username, **fields):
        user = StaffUser.objects.filter(username=username).first()
        if user is None:
            user = StaffUser.objects.create_user(username=username, password=DEMO_PASSWORD,
                                                 **fields)
        if not TOTPDevice.objects.filter(user=user, confirmed=True).exists():
            TOTPDevice.objects.create(user=user, name="Authenticator app", confirmed=True)
        return user
