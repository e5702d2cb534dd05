"""The cast of the record retrieval tests: requests made through ``request_create`` (with
their PIN and link token, which exist nowhere else), and the site settings the Request
Page prints."""

import datetime
import io

import pytest

from retrieval.models import RecordRequest
from retrieval.services import OutsideFacility, RequestPatient, request_create
from tests.sharing.conftest import fax_gateway, smtp_server  # noqa: F401 (fixtures)

RYAN_DOB = datetime.date(1986, 12, 29)


@pytest.fixture(autouse=True)
def _retrieval_site(settings, tmp_path, _isolated_storage):
    """Request Pages and signatures where a Celery worker started by ``celery_worker``
    (which derives its folders from STORAGE_ROOT) finds them too, and a known site."""
    storages = {name: dict(conf) for name, conf in settings.STORAGES.items()}
    storages["default"]["OPTIONS"] = {**storages["default"]["OPTIONS"],
                                      "location": str(tmp_path / "storage" / "media")}
    settings.STORAGES = storages
    settings.SITE_URL = "https://images.example.org"
    settings.PRODUCT_NAME = "ImageLink"
    settings.SUPPORT_PHONE = "1-800-555-0199"
    settings.SUPPORT_EMAIL = "support@imagelink.example"


def outside_facility(**changes) -> OutsideFacility:
    values = {"name": "Mercy Hospital St. Louis", "attn": "Film Library",
              "fax": "+1 (314) 555-0142", "phone": "314-555-0100",
              "email": "films@mercy.example"}
    values.update(changes)
    return OutsideFacility(**values)


def request_patient(**changes) -> RequestPatient:
    values = {"name": "ANTHONY^Ryan", "birth_date": RYAN_DOB, "mrn": "SAM-4471"}
    values.update(changes)
    return RequestPatient(**values)


@pytest.fixture
def record_request(facility, clerk):
    """Make a request as ``clerk`` of ``facility``: ``record_request()`` or with changes
    (``target=``, ``patient=``, ``details=``, ``method=``, ``facility=``, ``created_by=``,
    ``now=``...). Returns ``(request, pin, link_token)``."""

    def make(**changes):
        values = {
            "facility": facility, "target": outside_facility(),
            "patient": request_patient(), "details": "Chest X-ray, 2019 to 2021",
            "method": RecordRequest.Method.PRINT, "created_by": clerk,
        }
        values.update(changes)
        return request_create(**values)

    return make


def signature_png(width: int = 600, height: int = 200, *, ink: bool = True) -> bytes:
    """A drawn signature as the signing pad sends it: dark strokes on a transparent PNG
    (or, with ``ink=False``, an empty pad)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    if ink:
        draw = ImageDraw.Draw(image)
        points = [(40 + i * 12, height // 2 + (25 if i % 2 else -25)) for i in range(40)]
        draw.line(points, fill=(11, 22, 32, 255), width=4, joint="curve")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def received_request(record_request):
    """``received_request(paths, **changes)`` -> ``(request, request_studies)``: a request
    (made like ``record_request(**changes)``) whose outside facility uploaded ``paths``
    and confirmed, each file ingested into the requesting facility's archive as the
    upload portal does, and its studies collected."""
    from django.utils import timezone

    from dicomgw.models import IngestSource
    from dicomgw.services import ingest_file
    from retrieval.imports import request_studies_collect
    from retrieval.models import Upload, UploadedFile

    def make(paths, **changes):
        made, _pin, _token = record_request(**changes)
        now = timezone.now()
        upload = Upload.objects.create(request=made, status=Upload.Status.CONFIRMED,
                                       confirmed_at=now, files_expected=len(paths))
        for path in paths:
            outcome = ingest_file(facility=made.facility, path=path, source=IngestSource.UPLOAD)
            UploadedFile.objects.create(
                upload=upload, path=f"{path.parent.name}/{path.name}",
                size=path.stat().st_size, sha256=outcome.sha256, instance=outcome.instance,
                outcome=(UploadedFile.Outcome.STORED if outcome.ok
                         else UploadedFile.Outcome.INVALID), reason=outcome.reason)
        RecordRequest.objects.filter(pk=made.pk).update(
            status=RecordRequest.Status.RECEIVED, received_at=now)
        made.refresh_from_db()
        return made, request_studies_collect(record_request=made)

    return make
