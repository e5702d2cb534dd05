"""The cast of the sharing tests: a patient in the archive with exams, a PACS node, a
share, and a real SMTP server standing in for the fax gateway."""

import datetime
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from dicomgw.models import PacsNode, Patient, Study
from dicomgw.services import name_search_key, patient_identity_key
from sharing.models import Share, SharingSettings
from sharing.services import Recipient, share_create

ADA_DOB = datetime.date(1981, 8, 29)
EXAMS = [
    ("CR", "CHEST 2 VIEW", datetime.date(2020, 3, 29)),
    ("CT", "HEAD WITHOUT CONTRAST", datetime.date(2020, 2, 5)),
    ("MR", "BREAST BILATERAL", datetime.date(2020, 1, 31)),
]


@pytest.fixture(autouse=True)
def _media_beside_the_archive(settings, tmp_path, _isolated_storage):
    """Keep Access Pages where a Celery worker started by ``celery_worker`` (which
    derives its folders from STORAGE_ROOT) finds them too."""
    storages = {name: dict(conf) for name, conf in settings.STORAGES.items()}
    storages["default"]["OPTIONS"] = {**storages["default"]["OPTIONS"],
                                      "location": str(tmp_path / "storage" / "media")}
    settings.STORAGES = storages
    settings.SITE_URL = "https://images.example.org"
    settings.PRODUCT_NAME = "ImageLink"
    settings.SUPPORT_PHONE = "1-800-555-0199"
    settings.SUPPORT_EMAIL = "support@imagelink.example"


def make_patient(facility, name="LOVELACE^ADA", birth_date=ADA_DOB, patient_id="SMH-1815"):
    return Patient.objects.create(
        facility=facility, patient_id=patient_id, name=name,
        name_search=name_search_key(name), birth_date=birth_date, sex="F",
        identity_key=patient_identity_key(patient_id=patient_id, issuer="", name=name,
                                          birth_date=birth_date),
    )


def make_study(patient, modality, description, study_date, *, images=12, uid=None):
    return Study.objects.create(
        facility=patient.facility, patient=patient,
        study_instance_uid=uid or f"1.2.826.0.1.3680043.10.1.{patient.pk}.{Study.objects.count()}",
        study_date=study_date, description=description, modalities=modality,
        num_series=1, num_instances=images,
    )


@pytest.fixture
def patient(facility) -> Patient:
    return make_patient(facility)


@pytest.fixture
def studies(patient) -> list[Study]:
    return [make_study(patient, *exam) for exam in EXAMS]


@pytest.fixture
def fax_gateway(facility) -> SharingSettings:
    return SharingSettings.objects.create(facility=facility,
                                          fax_gateway_domain="fax.gateway.test",
                                          fax_sender_email="films@st-anthony.test")


def fax_recipient(**changes) -> Recipient:
    values = {"method": Share.Method.FAX, "attn": "Film Library",
              "institution": "Palm Beach MRI Clinic", "fax_number": "+1 (561) 555-0142",
              "subject": "Chart transfer request",
              "note": "As requested, the patient's imaging. Thanks - SMH film library"}
    values.update(changes)
    return Recipient(**values)


@pytest.fixture
def node(facility) -> PacsNode:
    return PacsNode.objects.create(facility=facility, name="Main PACS", ae_title="MAINPACS",
                                   host="127.0.0.1", port=1)


@pytest.fixture
def share_made(facility, clerk, patient, studies):
    """A share of the three archived exams, handed to the patient."""
    return share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=Recipient(method=Share.Method.PATIENT), created_by=clerk)


# --- Reading PDFs --------------------------------------------------------------------------


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "page.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", str(path), "-"], check=True,
                          capture_output=True, text=True).stdout


def pdf_pages(pdf: bytes, tmp_path: Path) -> int:
    path = tmp_path / "count.pdf"
    path.write_bytes(pdf)
    info = subprocess.run(["pdfinfo", str(path)], check=True, capture_output=True,
                          text=True).stdout
    return int(next(line.split()[-1] for line in info.splitlines()
                    if line.startswith("Pages:")))


def pdf_png(pdf: bytes, tmp_path: Path, dpi: int = 200) -> Path:
    path = tmp_path / "render.pdf"
    path.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", str(dpi), "-png", "-f", "1", "-l", "1",
                    "-singlefile", str(path), str(tmp_path / "render")], check=True)
    return tmp_path / "render.png"


def qr_payloads(png: Path) -> list[str]:
    found = subprocess.run(["zbarimg", "--quiet", "--raw", str(png)], capture_output=True,
                           text=True)
    return [line for line in found.stdout.splitlines() if line]


# --- The fax gateway: a real SMTP server on a free port ---------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Mailbox:
    """What the SMTP server received; ``refuse`` makes it answer RCPT with a 550."""

    messages: list = field(default_factory=list)
    refuse: bool = False

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return "550 5.1.1 no such fax number"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((list(envelope.rcpt_tos), envelope.mail_from,
                              envelope.original_content))
        return "250 Message accepted"


@dataclass
class SmtpServer:
    host: str
    port: int
    mailbox: Mailbox


@pytest.fixture
def smtp_server(settings):
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_TIMEOUT = 5
    yield SmtpServer("127.0.0.1", port, mailbox)
    controller.stop()
