"""Making a share, following its transfer from the PACS, re-issuing and revoking it."""

import datetime

import pytest
from django.utils import timezone

import sharing.services as services
from dicomgw.models import RetrieveJob
from pockethealth.codes import code_hash, code_matches
from pockethealth.models import AuditEvent
from sharing.models import Share, ShareStudy
from sharing.services import (
    PacsStudy,
    PatientIdentity,
    Recipient,
    SharingError,
    share_create,
    share_page_reissue,
    share_refresh,
    share_revoke,
    share_transfer_retry,
)

from .conftest import ADA_DOB, fax_recipient, make_patient, make_study

HANDED = Recipient(method=Share.Method.PATIENT)


def events(share, action):
    return AuditEvent.objects.filter(object_type="sharing.share", object_id=str(share.pk),
                                     action=action)


def test_sharing_archived_exams_is_ready_at_once_and_stores_only_a_hash(
        facility, clerk, patient, studies):
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=HANDED, created_by=clerk)
    share = made.share
    assert share.status == Share.Status.READY
    assert share.patient == patient
    assert share.patient_birth_date == ADA_DOB
    assert share.code_hash == code_hash(made.code)
    assert share.code_last3 == made.code[-3:]
    assert made.code not in str(Share.objects.filter(pk=share.pk).values().get())
    assert share.expires_at - share.created_at == datetime.timedelta(days=30)
    assert not share.extended
    assert share.access_page.name.startswith(f"access-pages/{facility.pk}/")
    assert share.access_page.read().startswith(b"%PDF")
    assert set(share.share_studies.values_list("study", flat=True)) == {s.pk for s in studies}
    event = events(share, "share.create").get()
    assert event.actor_user == clerk and event.patient_ref == str(patient.pk)
    assert event.detail == {"studies": 3, "retrieves": 0, "method": "patient"}


def test_a_code_that_collides_with_an_existing_share_is_drawn_again(
        facility, clerk, patient, studies, monkeypatch):
    first = share_create(facility=facility, patient_or_identity=patient, studies=studies[:1],
                         recipient=HANDED, created_by=clerk)
    drawn = iter([first.code, first.code, "K3Q2PBKF1"])
    monkeypatch.setattr(services, "code_generate", lambda: next(drawn))

    second = share_create(facility=facility, patient_or_identity=patient,
                          studies=studies[1:2], recipient=HANDED, created_by=clerk)

    assert second.code == "K3Q2PBKF1"
    assert second.share.code_hash == code_hash("K3Q2PBKF1") != first.share.code_hash


def test_a_revoked_shares_code_is_never_given_to_a_new_share(facility, clerk, patient,
                                                             studies, monkeypatch):
    old = share_create(facility=facility, patient_or_identity=patient, studies=studies[:1],
                       recipient=HANDED, created_by=clerk)
    share_revoke(share=old.share, by=clerk)
    drawn = iter([old.code, "ZZZZZZZZZ"])
    monkeypatch.setattr(services, "code_generate", lambda: next(drawn))
    new = share_create(facility=facility, patient_or_identity=patient, studies=studies[:1],
                       recipient=HANDED, created_by=clerk)
    assert new.code == "ZZZZZZZZZ"


def test_a_code_that_races_another_insert_is_drawn_again(facility, clerk, patient, studies,
                                                         monkeypatch):
    """The unique index catches a collision the existence check could not see."""
    first = share_create(facility=facility, patient_or_identity=patient, studies=studies[:1],
                         recipient=HANDED, created_by=clerk)
    drawn = iter([first.code, "RACE00001"])
    monkeypatch.setattr(services, "code_generate", lambda: next(drawn))
    real_filter = Share.objects.filter

    def blind_filter(*args, **kwargs):
        if "code_hash" in kwargs:
            return real_filter(pk=-1)
        return real_filter(*args, **kwargs)

    monkeypatch.setattr(Share.objects, "filter", blind_filter)
    second = share_create(facility=facility, patient_or_identity=patient,
                          studies=studies[1:2], recipient=HANDED, created_by=clerk)
    assert second.code == "RACE00001"


def test_endless_collisions_end_in_an_error_not_a_loop(facility, clerk, patient, studies,
                                                       monkeypatch):
    first = share_create(facility=facility, patient_or_identity=patient, studies=studies[:1],
                         recipient=HANDED, created_by=clerk)
    monkeypatch.setattr(services, "code_generate", lambda: first.code)
    with pytest.raises(SharingError):
        share_create(facility=facility, patient_or_identity=patient, studies=studies[1:],
                     recipient=HANDED, created_by=clerk)
    assert Share.objects.count() == 1


def test_a_patient_without_a_birth_date_cannot_be_shared(facility, clerk):
    patient = make_patient(facility, birth_date=None)
    study = make_study(patient, "CT", "HEAD", datetime.date(2020, 1, 1))
    with pytest.raises(SharingError, match="date of birth"):
        share_create(facility=facility, patient_or_identity=patient, studies=[study],
                     recipient=HANDED, created_by=clerk)
    assert not Share.objects.exists()


def test_nothing_ticked_is_refused(facility, clerk, patient):
    with pytest.raises(SharingError, match="at least one exam"):
        share_create(facility=facility, patient_or_identity=patient, studies=[],
                     recipient=HANDED, created_by=clerk)


def test_another_facilitys_exams_cannot_be_shared(facility, other_facility, clerk, studies):
    stranger = make_patient(other_facility)
    theirs = make_study(stranger, "CT", "HEAD", datetime.date(2020, 1, 1))
    with pytest.raises(SharingError):
        share_create(facility=facility, patient_or_identity=stranger, studies=[theirs],
                     recipient=HANDED, created_by=clerk)
    with pytest.raises(SharingError):
        share_create(facility=facility, patient_or_identity=studies[0].patient,
                     studies=[studies[0], theirs], recipient=HANDED, created_by=clerk)


def test_faxing_needs_a_gateway_and_a_number(facility, clerk, patient, studies):
    with pytest.raises(SharingError, match="not set up"):
        share_create(facility=facility, patient_or_identity=patient, studies=studies,
                     recipient=fax_recipient(), created_by=clerk)


def test_faxing_needs_a_plausible_number(facility, clerk, patient, studies, fax_gateway):
    with pytest.raises(SharingError, match="fax number"):
        share_create(facility=facility, patient_or_identity=patient, studies=studies,
                     recipient=fax_recipient(fax_number="555"), created_by=clerk)


def test_a_faxed_share_queues_a_delivery_to_the_gateway(facility, clerk, patient, studies,
                                                        fax_gateway):
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=fax_recipient(), created_by=clerk)
    delivery = made.share.deliveries.get()
    assert made.share.recipient_fax == "15615550142"
    assert delivery.address == "15615550142@fax.gateway.test"
    assert delivery.status == "queued"
    assert events(made.share, "share.fax.queue").get().detail == {"delivery": delivery.pk}


# --- From the PACS --------------------------------------------------------------------


def pacs_pick(node, uid, description="CT HEAD", date=datetime.date(2021, 5, 4), images=40):
    return PacsStudy(node=node, study_instance_uid=uid, description=description,
                     study_date=date, modalities=("CT",), num_instances=images)


ADA = PatientIdentity(name="LOVELACE^ADA", patient_id="SMH-1815", birth_date=ADA_DOB)


def test_studies_picked_on_the_pacs_are_retrieved_and_the_share_waits_for_them(
        facility, clerk, node):
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1"),
                                      pacs_pick(node, "1.2.3.2", "MR KNEE")],
                        recipient=HANDED, created_by=clerk)
    share = made.share
    assert share.status == Share.Status.TRANSFERRING
    assert share.patient is None  # nothing of theirs is archived yet
    jobs = RetrieveJob.objects.filter(facility=facility).order_by("study_instance_uid")
    assert [j.study_instance_uid for j in jobs] == ["1.2.3.1", "1.2.3.2"]
    assert all(j.status == "queued" and j.requested_by == clerk for j in jobs)
    assert {s.retrieve_id for s in share.share_studies.all()} == {j.pk for j in jobs}
    # The page was printed before any image arrived, from what the PACS said.
    assert share.access_page
    assert share.share_studies.get(study_instance_uid="1.2.3.2").description == "MR KNEE"


def test_a_study_already_whole_in_the_archive_is_not_retrieved_again(
        facility, clerk, node, patient):
    archived = make_study(patient, "CT", "HEAD", datetime.date(2021, 5, 4), images=40,
                          uid="1.2.3.9")
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.9", images=40)],
                        recipient=HANDED, created_by=clerk)
    assert not RetrieveJob.objects.exists()
    assert made.share.status == Share.Status.READY
    assert made.share.share_studies.get().study == archived


def test_a_study_partly_in_the_archive_is_retrieved(facility, clerk, node, patient):
    make_study(patient, "CT", "HEAD", datetime.date(2021, 5, 4), images=10, uid="1.2.3.9")
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.9", images=40)],
                        recipient=HANDED, created_by=clerk)
    assert RetrieveJob.objects.get().study_instance_uid == "1.2.3.9"
    assert made.share.status == Share.Status.TRANSFERRING


def test_a_running_retrieve_of_the_same_study_is_joined_not_repeated(facility, clerk, node):
    first = share_create(facility=facility, patient_or_identity=ADA,
                         pacs_studies=[pacs_pick(node, "1.2.3.1")], recipient=HANDED,
                         created_by=clerk)
    second = share_create(facility=facility, patient_or_identity=ADA,
                          pacs_studies=[pacs_pick(node, "1.2.3.1")], recipient=HANDED,
                          created_by=clerk)
    assert RetrieveJob.objects.count() == 1
    assert (first.share.share_studies.get().retrieve_id
            == second.share.share_studies.get().retrieve_id)


def finish(job, status, patient, *, archived=40, missing=(), error=""):
    study = make_study(patient, "CT", job.description or "HEAD", job.study_date,
                       images=archived, uid=job.study_instance_uid) if archived else None
    RetrieveJob.objects.filter(pk=job.pk).update(
        status=status, study=study, expected=40, archived=archived, missing=list(missing),
        error=error, finished_at=timezone.now())


def test_the_share_is_ready_when_every_retrieve_completes_and_that_is_audited_once(
        facility, clerk, node):
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1"), pacs_pick(node, "1.2.3.2")],
                        recipient=HANDED, created_by=clerk)
    share = made.share
    patient = make_patient(facility)
    jobs = list(RetrieveJob.objects.order_by("pk"))
    finish(jobs[0], RetrieveJob.Status.COMPLETE, patient)
    assert share_refresh(share=share).status == Share.Status.TRANSFERRING
    finish(jobs[1], RetrieveJob.Status.COMPLETE, patient)

    share = share_refresh(share=share)
    share = share_refresh(share=share)

    assert share.status == Share.Status.READY
    assert share.patient == patient
    assert all(s.study_id for s in share.share_studies.all())
    event = events(share, "share.transfer.finish").get()
    assert event.outcome == "success" and event.actor_type == "system"
    assert event.detail["status"] == "ready"


def test_the_follow_task_records_the_outcome_when_nobody_watches(facility, clerk, node):
    from sharing.tasks import follow_transfer

    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1")], recipient=HANDED,
                        created_by=clerk)
    finish(RetrieveJob.objects.get(), RetrieveJob.Status.COMPLETE, make_patient(facility))
    follow_transfer.apply(args=[made.share.pk])
    assert Share.objects.get().status == Share.Status.READY
    assert events(made.share, "share.transfer.finish").count() == 1


def test_a_partial_transfer_says_what_is_missing_and_a_retry_fetches_it_again(
        facility, clerk, node):
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1"), pacs_pick(node, "1.2.3.2")],
                        recipient=HANDED, created_by=clerk)
    patient = make_patient(facility)
    jobs = list(RetrieveJob.objects.order_by("pk"))
    finish(jobs[0], RetrieveJob.Status.COMPLETE, patient)
    finish(jobs[1], RetrieveJob.Status.PARTIAL, patient, archived=37,
           missing=["1.9.1", "1.9.2", "1.9.3"], error="3 images did not arrive from the PACS.")

    share = share_refresh(share=made.share)
    assert share.status == Share.Status.PARTIAL
    progress = services.share_transfer_progress(share)
    partial = next(s for s in progress.studies if s.state == "partial")
    assert partial.missing == 3 and "did not arrive" in partial.error
    assert progress.retryable
    assert events(share, "share.transfer.finish").get().outcome == "failure"

    share = share_transfer_retry(share=share, requested_by=clerk)
    assert share.status == Share.Status.TRANSFERRING
    assert RetrieveJob.objects.get(pk=jobs[1].pk).status == "queued"
    assert events(share, "share.transfer.retry").get().detail == {"studies": 1}


def test_a_failed_transfer_says_why(facility, clerk, node):
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1")], recipient=HANDED,
                        created_by=clerk)
    job = RetrieveJob.objects.get()
    RetrieveJob.objects.filter(pk=job.pk).update(
        status="failed", error="The PACS refused the association (unknown AE title).")
    share = share_refresh(share=made.share)
    assert share.status == Share.Status.FAILED
    row = services.share_transfer_progress(share).studies[0]
    assert row.state == "failed" and "unknown AE title" in row.error


def test_a_newer_retrieve_of_the_study_is_followed(facility, clerk, node, patient):
    """A retry started from the PACS pages (a new job) counts for the share too."""
    made = share_create(facility=facility, patient_or_identity=ADA,
                        pacs_studies=[pacs_pick(node, "1.2.3.1")], recipient=HANDED,
                        created_by=clerk)
    old = RetrieveJob.objects.get()
    RetrieveJob.objects.filter(pk=old.pk).update(status="failed", error="timeout")
    newer = RetrieveJob.objects.create(facility=facility, node=node,
                                       study_instance_uid="1.2.3.1", status="queued")
    finish(newer, RetrieveJob.Status.COMPLETE, patient)
    share = share_refresh(share=made.share)
    assert share.status == Share.Status.READY
    assert ShareStudy.objects.get(share=share).retrieve_id == newer.pk


# --- Re-issue and revoke -------------------------------------------------------------


def test_reissuing_the_page_draws_a_new_code_and_the_old_one_stops_working(
        facility, clerk, patient, studies):
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=HANDED, created_by=clerk)
    share = made.share
    old_page = share.access_page.name
    storage = share.access_page.storage

    new_code = share_page_reissue(share=share, by=clerk)

    share.refresh_from_db()
    assert new_code != made.code
    assert code_matches(new_code, share.code_hash)
    assert not code_matches(made.code, share.code_hash)
    assert share.access_page.name != old_page and not storage.exists(old_page)
    assert events(share, "share.page.reissue").count() == 1


def test_revoking_ends_access_at_once_deletes_the_page_and_is_audited(
        facility, clerk, patient, studies, fax_gateway, django_capture_on_commit_callbacks):
    made = share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=fax_recipient(), created_by=clerk)
    share = made.share
    page_name = share.access_page.name
    storage = share.access_page.storage

    with django_capture_on_commit_callbacks(execute=True):
        share = share_revoke(share=share, by=clerk)

    assert share.status == Share.Status.REVOKED
    assert share.is_revoked and not share.is_open()
    assert share.revoked_by == clerk
    assert not share.access_page and not storage.exists(page_name)
    assert share.deliveries.get().status == "failed"  # the queued fax never goes out
    assert events(share, "share.revoke").get().detail == {"faxes_cancelled": 1}
    # Twice changes nothing, and a revoked share stays revoked whatever its transfer does.
    share_revoke(share=share, by=clerk)
    assert events(share, "share.revoke").count() == 1
    assert share_refresh(share=share).status == Share.Status.REVOKED
    with pytest.raises(SharingError):
        share_page_reissue(share=share, by=clerk)
