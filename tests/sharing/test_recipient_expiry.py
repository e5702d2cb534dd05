"""The end of access: shares expire on time in the facility's calendar (across daylight
saving changes), the nine-month limit, and the purge of archived studies no share or
transfer holds any more."""

import datetime
import io
import zoneinfo

import numpy as np
import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomgw.models import (
    IngestSource,
    Instance,
    Patient,
    RetrieveJob,
    Study,
    archive_storage,
)
from dicomgw.services import ingest_file
from pockethealth.celery import app
from pockethealth.models import AuditEvent, Facility
from sharing.models import Share, ShareStudy
from sharing.recipient import (
    ShareUnavailable,
    archive_purge,
    months_after,
    share_extend,
    share_max_expiry,
    share_unlock,
    shares_expire,
)
from sharing.services import Recipient, share_create, share_revoke

from .conftest import ADA_DOB, make_patient, make_study
from .test_recipient import open_inbox

TORONTO = zoneinfo.ZoneInfo("America/Toronto")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
HANDED = Recipient(method=Share.Method.PATIENT)


def at(zone, *parts) -> datetime.datetime:
    """A local time, as the UTC moment the clock (``timezone.now()``) would give."""
    return datetime.datetime(*parts, tzinfo=zone).astimezone(datetime.UTC)


# --- Expiry ----------------------------------------------------------------------------


def test_a_share_expires_on_time_across_a_dst_change(facility, clerk, patient, studies):
    # Made a fortnight before Toronto springs forward (2025-03-09).
    made_at = at(TORONTO, 2025, 2, 25, 10, 0)
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=HANDED, created_by=clerk, now=made_at)
    share, code = made.share, made.code
    end = share.expires_at
    # 30 × 24 hours: 11:00 local once the clocks have gone forward, as the Access Page
    # prints it (in the facility's zone) and as the inbox shows it.
    assert end - made_at == datetime.timedelta(days=settings.SHARE_ACCESS_DAYS)
    assert end.astimezone(TORONTO).strftime("%Y/%m/%d %H:%M") == "2025/03/27 11:00"

    just_before = end - datetime.timedelta(seconds=1)
    assert shares_expire(now=just_before) == 0
    assert share_unlock(code=code, birth_date=ADA_DOB, address="192.0.2.1",
                        now=just_before).pk == share.pk
    with pytest.raises(ShareUnavailable) as refused:
        share_unlock(code=code, birth_date=ADA_DOB, address="192.0.2.1", now=end)
    assert refused.value.reason == "expired" and refused.value.support_can_extend

    assert shares_expire(now=end) == 1
    assert shares_expire(now=end + datetime.timedelta(minutes=10)) == 0  # idempotent
    share.refresh_from_db()
    assert share.expired_at == end
    event = AuditEvent.objects.get(action="share.expire")
    assert event.actor_type == "system" and event.object_id == str(share.pk)


def test_the_inbox_shows_the_expiry_in_the_facilitys_zone_across_dst(clerk, monkeypatch):
    import sharing.recipient_views as views

    paris = Facility.objects.create(name="Hôpital Saint-Louis", short_name="saint-louis",
                                    time_zone="Europe/Paris")
    clerk.facility = paris
    clerk.save()
    patient = make_patient(paris)
    study = make_study(patient, "MR", "GENOU", datetime.date(2025, 3, 1))
    made_at = at(PARIS, 2025, 3, 20, 10, 0)  # CET; Paris springs forward on 2025-03-30
    made = share_create(facility=paris, patient_or_identity=patient, studies=[study],
                        recipient=HANDED, created_by=clerk, now=made_at)
    monkeypatch.setattr(views, "_now", lambda: made_at + datetime.timedelta(days=2))
    client = Client()
    open_inbox(client, made.code)
    body = client.get("/view/inbox").content.decode()
    # 30 × 24 h after 10:00 CET is 11:00 CEST on 19 April.
    assert "2025/04/19 <span>11:00</span>" in body and "Europe/Paris" in body
    assert "Keep access until 2025/12/20" in body


def test_nine_months_keeps_the_wall_clock_time_whatever_dst_did():
    assert months_after(at(TORONTO, 2025, 1, 15, 10, 0), 9, TORONTO) == at(
        TORONTO, 2025, 10, 15, 10, 0)
    assert months_after(at(TORONTO, 2025, 1, 15, 10, 0), 9, TORONTO).astimezone(
        TORONTO).utcoffset() == datetime.timedelta(hours=-4)
    assert months_after(at(TORONTO, 2025, 5, 31, 9, 30), 9, TORONTO) == at(
        TORONTO, 2026, 2, 28, 9, 30)
    assert months_after(at(PARIS, 2025, 6, 30, 23, 30), 9, PARIS) == at(
        PARIS, 2026, 3, 30, 23, 30)


def test_extend_across_dst_ends_nine_months_after_creation_at_the_same_local_time(
        facility, clerk, patient, studies):
    made_at = at(TORONTO, 2025, 1, 15, 10, 0)
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=HANDED, created_by=clerk, now=made_at)
    share = share_extend(share=made.share, address="192.0.2.1",
                         now=made_at + datetime.timedelta(days=29, hours=23))
    assert share.expires_at == share_max_expiry(share) == at(TORONTO, 2025, 10, 15, 10, 0)
    # The hard end is the hard end: past it, the right pair is told to ask the sender.
    with pytest.raises(ShareUnavailable) as refused:
        share_unlock(code=made.code, birth_date=ADA_DOB, address="192.0.2.1",
                     now=share.expires_at)
    assert not refused.value.support_can_extend


# --- Purge -----------------------------------------------------------------------------


def tiny_ct(study_uid: str, *, name="LOVELACE^ADA", patient_id="SMH-1815") -> bytes:
    """A valid, small DICOM CT image of the given study."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, study_uid + ".1"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, "19810829"
    ds.Modality, ds.StudyDate, ds.StudyDescription = "CT", "20240102", "CT HEAD"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.arange(64, dtype=np.int16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def archived_study(facility, key: str, images: int = 2, **who) -> Study:
    uid = f"1.2.826.0.1.3680043.10.543.{key}"
    for _ in range(images):
        outcome = ingest_file(facility=facility, fileobj=io.BytesIO(tiny_ct(uid, **who)),
                              source=IngestSource.IMPORT)
        assert outcome.ok, outcome.reason
    return Study.objects.get(study_instance_uid=uid)


def files_of(study: Study) -> list[str]:
    return list(Instance.objects.filter(series__study=study).values_list("file", flat=True))


def age(study: Study, days: int, now) -> None:
    then = now - datetime.timedelta(days=days)
    Study.objects.filter(pk=study.pk).update(created_at=then, updated_at=then)


def test_purge_keeps_studies_still_held_and_deletes_the_others_with_their_files(
        facility, clerk, node, django_capture_on_commit_callbacks):
    now = timezone.now()
    retention = settings.ARCHIVE_RETENTION_DAYS
    live = archived_study(facility, "1")           # in a share still open
    revoked_lately = archived_study(facility, "2")  # its share was revoked last week
    expired_long_ago = archived_study(facility, "3")  # its share ended 40 days ago
    never_shared_old = archived_study(facility, "4", name="BABBAGE^CHARLES",
                                      patient_id="SMH-1791")
    arrived_lately = archived_study(facility, "5")  # nobody holds it, but it is fresh
    being_sent = archived_study(facility, "6")      # still arriving from the PACS
    for study in (live, revoked_lately, expired_long_ago, never_shared_old, arrived_lately,
                  being_sent):
        age(study, retention + 60 if study is not arrived_lately else 2, now)
    patient = live.patient

    def share_of(study, made_days_ago):
        made = now - datetime.timedelta(days=made_days_ago)
        return share_create(facility=facility, patient_or_identity=patient, studies=[study],
                            recipient=HANDED, created_by=clerk, now=made).share

    share_of(live, 5)
    revoked = share_of(revoked_lately, 20)
    share_revoke(share=revoked, by=clerk, now=now - datetime.timedelta(days=7))
    old_share = share_of(expired_long_ago, 70)
    RetrieveJob.objects.create(facility=facility, node=node, status="running",
                               study_instance_uid=being_sent.study_instance_uid,
                               study=being_sent)
    for study in (live, revoked_lately, expired_long_ago, never_shared_old, arrived_lately,
                  being_sent):
        age(study, retention + 60 if study is not arrived_lately else 2, now)

    storage = archive_storage()
    doomed = files_of(expired_long_ago) + files_of(never_shared_old)
    kept = {s.pk: files_of(s) for s in (live, revoked_lately, arrived_lately, being_sent)}
    assert all(storage.exists(name) for name in doomed)

    with django_capture_on_commit_callbacks(execute=True):
        report = archive_purge(now=now)

    assert report.studies == 2 and report.instances == 4
    assert set(Study.objects.values_list("pk", flat=True)) == set(kept)
    assert not any(storage.exists(name) for name in doomed)
    for names in kept.values():
        assert names and all(storage.exists(name) for name in names)
    # The old share keeps what it showed; the patient nobody refers to any more is gone.
    item = ShareStudy.objects.get(share=old_share)
    assert item.study_id is None and item.description == "CT HEAD"
    assert not Patient.objects.filter(patient_id="SMH-1791").exists()
    assert Patient.objects.filter(pk=patient.pk).exists()
    purged = AuditEvent.objects.filter(action="archive.purge")
    assert purged.count() == 2
    for event in purged:
        assert event.actor_type == "system" and event.detail["instances"] == 2
        assert "LOVELACE" not in str(event.detail) and "BABBAGE" not in str(event.detail)

    assert archive_purge(now=now).studies == 0  # nothing left to do


def test_a_study_shared_again_while_the_purge_runs_is_kept(facility, clerk, monkeypatch):
    import sharing.recipient as recipient

    now = timezone.now()
    study = archived_study(facility, "7")
    age(study, settings.ARCHIVE_RETENTION_DAYS + 1, now)
    original = recipient._purge_study

    def share_first(study_id, **kwargs):
        # A clerk shares the study between the purge's choice and its deletion.
        share_create(facility=facility, patient_or_identity=study.patient, studies=[study],
                     recipient=HANDED, created_by=clerk, now=now)
        age(study, settings.ARCHIVE_RETENTION_DAYS + 1, now)
        return original(study_id, **kwargs)

    monkeypatch.setattr(recipient, "_purge_study", share_first)
    assert archive_purge(now=now).studies == 0
    assert Study.objects.filter(pk=study.pk).exists()


def test_the_periodic_job_is_scheduled_and_does_both(facility, clerk, patient, studies,
                                                    django_capture_on_commit_callbacks):
    app.loader.import_default_modules()
    entry = settings.CELERY_BEAT_SCHEDULE["sharing-expire-and-purge"]
    assert entry["task"] in app.tasks
    share = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                         recipient=HANDED, created_by=clerk,
                         now=timezone.now() - datetime.timedelta(days=31)).share
    old = archived_study(facility, "8", name="BABBAGE^CHARLES", patient_id="SMH-1791")
    age(old, settings.ARCHIVE_RETENTION_DAYS + 1, timezone.now())
    files = files_of(old)
    with django_capture_on_commit_callbacks(execute=True):
        app.tasks[entry["task"]].apply()
    share.refresh_from_db()
    assert not any(archive_storage().exists(name) for name in files)
    assert share.expired_at is not None
    assert not Study.objects.filter(pk=old.pk).exists()
