"""Downloads from the Share Inbox: the ticked exams as a ZIP streamed at once, or a disc
image built in the background, both through dicomgw.media, both audited, neither
reachable from another share's session."""

import hashlib
import io
import zipfile

import pytest
from django.test import Client

from dicomgw import media
from dicomgw.models import Instance, MediaJob, archive_storage
from pockethealth.models import AuditEvent
from sharing.models import Share
from sharing.services import Recipient, share_create

from .test_recipient import open_inbox
from .test_recipient_expiry import archived_study


@pytest.fixture
def shared(facility, clerk):
    """A share of two archived studies with real (small) DICOM files."""
    first = archived_study(facility, "21", images=3)
    second = archived_study(facility, "22", images=2)
    made = share_create(facility=facility, patient_or_identity=first.patient,
                        studies=[first, second], recipient=Recipient(method=Share.Method.PRINT),
                        created_by=clerk)
    return made, [first, second]


def sha256_of(name: str) -> str:
    with archive_storage().open(name, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_download_zip_streams_the_ticked_exams_byte_for_byte(shared):
    made, studies = shared
    client = Client()
    open_inbox(client, made.code)
    exams = list(made.share.share_studies.values_list("pk", flat=True))
    response = client.post("/view/download", {"format": "zip", "exam": exams})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Disposition"] == 'attachment; filename="IMAGES_LOVELACE.zip"'
    assert response["Cache-Control"] == "no-store"
    body = b"".join(response.streaming_content)
    assert len(body) == int(response["Content-Length"])
    archive = zipfile.ZipFile(io.BytesIO(body))
    names = archive.namelist()
    assert "IMAGES_LOVELACE/DICOMDIR" in names
    images = [n for n in names if "/IMAGES/DICOMS/IM" in n]
    stored = Instance.objects.filter(series__study__in=studies)
    assert len(images) == stored.count() == 5
    digests = {hashlib.sha256(archive.read(n)).hexdigest() for n in images}
    assert digests == set(stored.values_list("sha256", flat=True))
    assert digests == {sha256_of(i.file.name) for i in stored}
    event = AuditEvent.objects.get(action="share.download")
    assert event.actor_type == "share_session" and event.actor_ref == str(made.share.pk)
    assert event.detail == {"format": "zip", "studies": 2, "viewer": False}


def test_download_zip_of_one_ticked_exam_holds_only_that_exam(shared):
    made, studies = shared
    client = Client()
    open_inbox(client, made.code)
    one = made.share.share_studies.get(study=studies[1])
    response = client.post("/view/download", {"format": "zip", "exam": [one.pk]})
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert len([n for n in archive.namelist() if "/IMAGES/DICOMS/IM" in n]) == 2


def test_nothing_ticked_comes_back_to_the_inbox_with_a_word(shared):
    made, _studies = shared
    client = Client()
    open_inbox(client, made.code)
    response = client.post("/view/download", {"format": "zip"})
    assert response.status_code == 303 and response["Location"] == "/view/inbox"
    assert "Tick the exams to download." in client.get("/view/inbox").content.decode()
    assert not AuditEvent.objects.filter(action="share.download").exists()


def test_download_disk_image_is_built_followed_and_served_with_ranges(shared):
    made, _studies = shared
    client = Client()
    open_inbox(client, made.code)
    exams = list(made.share.share_studies.values_list("pk", flat=True))
    response = client.post("/view/download", {"format": "iso", "exam": exams,
                                              "include_viewer": "on"})
    assert response.status_code == 303 and response["Location"] == "/view/inbox"
    job = MediaJob.objects.get()
    assert job.owner_ref == f"share:{made.share.pk}" and job.expires_at <= made.share.expires_at
    body = client.get("/view/inbox").content.decode()
    assert f'hx-get="/view/downloads/{job.pk}"' in body
    assert client.get(f"/view/downloads/{job.pk}/file").status_code == 404  # not ready yet

    media.iso_build(job_id=job.pk)
    status = client.get(f"/view/downloads/{job.pk}").content.decode()
    assert f'href="/view/downloads/{job.pk}/file"' in status
    response = client.get(f"/view/downloads/{job.pk}/file")
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="ISO_LOVELACE.iso"'
    assert response["Cache-Control"] == "no-store"
    image = b"".join(response.streaming_content)
    assert image[16 * 2048 + 1:16 * 2048 + 6] == b"CD001"
    part = client.get(f"/view/downloads/{job.pk}/file", HTTP_RANGE="bytes=0-1023")
    assert part.status_code == 206 and len(b"".join(part.streaming_content)) == 1024
    actions = list(AuditEvent.objects.filter(action__startswith="share.download")
                   .values_list("action", flat=True).order_by("id"))
    assert actions == ["share.download.prepare", "share.download"]


def test_the_offline_viewer_is_offered_and_added_once_one_is_installed(shared, settings,
                                                                        tmp_path):
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text("<!doctype html><title>Viewer</title>")
    settings.MEDIA_VIEWER_DIR = str(viewer)
    made, _studies = shared
    client = Client()
    open_inbox(client, made.code)
    assert "Include the DICOM viewer" in client.get("/view/inbox").content.decode()
    exams = list(made.share.share_studies.values_list("pk", flat=True))
    response = client.post("/view/download", {"format": "zip", "exam": exams,
                                              "include_viewer": "on"})
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert "IMAGES_LOVELACE/INDEX.HTM" in names
    assert "IMAGES_LOVELACE/IHE_PDI/index.html" in names
    assert AuditEvent.objects.get(action="share.download").detail["viewer"] is True
