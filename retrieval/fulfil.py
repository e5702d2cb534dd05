"""Answering a request from inside the platform. When the facility asked also runs here
(``RecordRequest.target_facility``), its clerks see the request among their incoming
requests and answer it by picking exams from their own archive, or from their PACS
(retrieved into their archive first, by the PACS link's retrieve jobs). A Celery task
then copies the picked studies, file by file and byte for byte, into the requesting
facility's archive through ``ingest_file``; they become the request's studies and the
request is received. No PIN, no upload. They may decline it instead.

The answering side sees the request's patient, date of birth, MRN, details and who asks;
it never sees the PIN, the Request Page or anything uploaded."""

import datetime
import logging
import time
from collections.abc import Sequence

from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from dicomgw.models import IngestSource, Instance, PacsNode, RetrieveJob, Study
from dicomgw.retrieve import ArchiveState, StudyHit, _claim, retrieve_retry, retrieve_start
from dicomgw.services import ingest_file, name_search_key
from pockethealth.models import AuditEvent, Facility, StaffUser
from pockethealth.services import audit_record

from .imports import PROGRESS_INTERVAL, enqueue_on_commit, request_study_add
from .models import FulfilmentStudy, RecordRequest, RequestFulfilment
from .services import RetrievalError
from .upload import DECLINABLE

log = logging.getLogger(__name__)

# While a picked study is still being retrieved from the PACS, the task looks again
# after this many seconds (it never waits on the retrieve's task).
RETRIEVE_POLL_SECONDS = 3
DECLINE_REASON_MAX = 500


def incoming_requests(*, facility: Facility) -> QuerySet:
    """The requests other facilities of the platform addressed to ``facility``, open
    ones first, newest first."""
    return (RecordRequest.objects.filter(target_facility=facility)
            .exclude(facility=facility)
            .select_related("facility", "created_by")
            .order_by("-created_at", "-id"))


def request_incoming_open(*, record_request: RecordRequest, request: HttpRequest,
                          now: datetime.datetime | None = None) -> RecordRequest:
    """A clerk of the asked facility opens the request: recorded, and the first time the
    request counts as opened by the facility, as a first PIN does on the upload side."""
    if RecordRequest.objects.filter(pk=record_request.pk, status=RecordRequest.Status.SENT
                                    ).update(status=RecordRequest.Status.OPENED,
                                             opened_at=now or timezone.now()):
        record_request.refresh_from_db()
    audit_record(request=request, action="request.incoming.view", obj=record_request)
    return record_request


def _check_answerable(record_request: RecordRequest, facility: Facility) -> None:
    if record_request.target_facility_id != facility.pk:
        raise RetrievalError(_("This request is not addressed to your facility."))
    if record_request.status in (RecordRequest.Status.CANCELLED, RecordRequest.Status.IMPORTED,
                                 RecordRequest.Status.DECLINED):
        raise RetrievalError(_("This request is %(status)s; it needs no answer any more.") % {
            "status": record_request.get_status_display().lower()})


def request_fulfil(*, record_request: RecordRequest, facility: Facility, by: StaffUser,
                   studies: Sequence[Study] = (),
                   pacs_hits: Sequence[tuple[PacsNode, StudyHit]] = (),
                   request: HttpRequest | None = None) -> RequestFulfilment:
    """Answer ``record_request`` with ``studies`` of ``facility``'s archive and studies
    found on its PACS (``pacs_hits``; retrieved first unless the archive holds them
    whole). Queues the copy into the requester's archive and returns its row."""
    _check_answerable(record_request, facility)
    if not studies and not pacs_hits:
        raise RetrievalError(_("Tick at least one exam to send."))
    for study in studies:
        if study.facility_id != facility.pk:
            raise RetrievalError(_("That exam is not in your facility's archive."))
    for node, _hit in pacs_hits:
        if node.facility_id != facility.pk:
            raise RetrievalError(_("Choose one of your facility's PACS."))
    with transaction.atomic():
        fulfilment = RequestFulfilment.objects.create(
            request=record_request, facility=facility, answered_by=by)
        picked: dict[str, FulfilmentStudy] = {}
        for study in studies:
            picked.setdefault(study.study_instance_uid, FulfilmentStudy(
                fulfilment=fulfilment, study_instance_uid=study.study_instance_uid,
                source=study, study_date=study.study_date, description=study.description,
                modalities=study.modalities, images=study.num_instances))
        for node, hit in pacs_hits:
            if hit.study_instance_uid in picked:
                continue
            row = FulfilmentStudy(
                fulfilment=fulfilment, study_instance_uid=hit.study_instance_uid,
                study_date=hit.study_date, description=hit.description[:200],
                modalities="\\".join(hit.modalities)[:200], images=hit.num_instances or 0)
            if hit.archive_state == ArchiveState.COMPLETE:
                row.source = Study.objects.get(pk=hit.archive_study_id, facility=facility)
            else:
                row.retrieve = retrieve_start(node=node, study_instance_uid=hit.study_instance_uid,
                                              requested_by=by, hit=hit)
            picked[hit.study_instance_uid] = row
        FulfilmentStudy.objects.bulk_create(picked.values())
        RequestFulfilment.objects.filter(pk=fulfilment.pk).update(
            total=sum(row.images for row in picked.values()))
        audit_record(action="request.fulfil.start", user=by, request=request,
                     facility=facility, obj=record_request,
                     detail={"fulfilment": fulfilment.pk, "studies": len(picked),
                             "from_pacs": sum(1 for row in picked.values() if row.retrieve)})
        enqueue_on_commit("fulfil_request", fulfilment.pk)
    fulfilment.refresh_from_db()
    return fulfilment


def request_fulfil_retry(*, fulfilment: RequestFulfilment, by: StaffUser,
                         request: HttpRequest | None = None) -> RequestFulfilment:
    """Copy again what a partial or failed answer did not deliver; a retrieve from the
    PACS that failed is run again first."""
    _check_answerable(fulfilment.request, fulfilment.facility)
    with transaction.atomic():
        queued = RequestFulfilment.objects.filter(
            pk=fulfilment.pk,
            status__in=[RequestFulfilment.Status.PARTIAL, RequestFulfilment.Status.FAILED],
        ).update(status=RequestFulfilment.Status.QUEUED, attempts=0, error="",
                 finished_at=None, updated_at=timezone.now())
        if queued:
            for row in fulfilment.studies.exclude(error="").select_related("retrieve"):
                if row.retrieve is not None and row.retrieve.status in (
                        RetrieveJob.Status.PARTIAL, RetrieveJob.Status.FAILED):
                    row.retrieve = retrieve_retry(job=row.retrieve, requested_by=by)
                row.error = ""
                row.save(update_fields=["retrieve", "error"])
            audit_record(action="request.fulfil.retry", user=by, request=request,
                         facility=fulfilment.facility, obj=fulfilment.request,
                         detail={"fulfilment": fulfilment.pk})
            enqueue_on_commit("fulfil_request", fulfilment.pk)
    fulfilment.refresh_from_db()
    return fulfilment


def request_incoming_decline(*, record_request: RecordRequest, facility: Facility,
                             by: StaffUser, reason: str,
                             now: datetime.datetime | None = None,
                             request: HttpRequest | None = None) -> RecordRequest:
    """The asked facility declines the request ("no records for this patient"); the
    requester sees the reason. Only while nothing has been received for it (the upload
    portal's rule)."""
    _check_answerable(record_request, facility)
    reason = " ".join(reason.split())
    if not reason:
        raise RetrievalError(_("Say why you decline, e.g. \"no records for this patient\"."))
    if len(reason) > DECLINE_REASON_MAX:
        raise RetrievalError(_("Keep the reason under %(count)s characters.") % {
            "count": DECLINE_REASON_MAX})
    now = now or timezone.now()
    with transaction.atomic():
        declined = RecordRequest.objects.filter(
            pk=record_request.pk, status__in=DECLINABLE,
        ).update(status=RecordRequest.Status.DECLINED, declined_at=now, decline_reason=reason)
        record_request.refresh_from_db()
        if not declined:
            raise RetrievalError(_("Records have been sent for this request already; it can "
                                   "no longer be declined."))
        audit_record(action="request.decline", user=by, request=request, facility=facility,
                     obj=record_request, detail={"by": "platform"})
    return record_request


# --- The copy ------------------------------------------------------------------------


def request_fulfil_run(*, fulfilment_id: int) -> float | None:
    """The body of the answer task: once the picked studies retrieved from the PACS have
    arrived, copy each picked study's instances that the requester's archive lacks,
    list the copies as the request's studies and mark the request received. Returns the
    seconds after which to run again, or None."""
    waiting = FulfilmentStudy.objects.filter(
        fulfilment_id=fulfilment_id, delivered__isnull=True,
        retrieve__status__in=[RetrieveJob.Status.QUEUED, RetrieveJob.Status.RUNNING])
    if waiting.exists():
        # Still queued, and seen to be alive, so that stale recovery leaves it alone.
        RequestFulfilment.objects.filter(
            pk=fulfilment_id, status=RequestFulfilment.Status.QUEUED).update(
            updated_at=timezone.now())
        return RETRIEVE_POLL_SECONDS
    claim = _claim(RequestFulfilment, fulfilment_id)
    if claim is not True:
        log.info("RequestFulfilment %s not claimable (%s)", fulfilment_id, claim)
        return claim or None
    fulfilment = RequestFulfilment.objects.select_related(
        "request__facility", "facility").get(pk=fulfilment_id)
    try:
        _fulfil(fulfilment)
    except Exception:
        log.exception("RequestFulfilment %s stopped by an internal error", fulfilment.pk)
        _fulfil_end(fulfilment, status=RequestFulfilment.Status.FAILED,
                    error=_("An internal error stopped the copy. Press Retry; if it "
                            "happens again, call support."))
        raise
    return None


class _Progress:
    def __init__(self, fulfilment: RequestFulfilment):
        self.fulfilment = fulfilment
        self.last_write = 0.0

    def write(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = time.monotonic()
        rows = list(self.fulfilment.studies.values_list("images", "copied"))
        RequestFulfilment.objects.filter(pk=self.fulfilment.pk).update(
            total=sum(images for images, _copied in rows),
            copied=sum(copied for _images, copied in rows), updated_at=timezone.now())


def _fulfil(fulfilment: RequestFulfilment) -> None:
    requester = fulfilment.request.facility
    progress = _Progress(fulfilment)
    for row in fulfilment.studies.select_related("source", "retrieve__study"):
        source = row.source or (row.retrieve.study if row.retrieve else None)
        if row.retrieve is not None and row.retrieve.status != RetrieveJob.Status.COMPLETE:
            # Half a study is not sent: the retry runs the retrieve again first.
            source = None
        if source is None:
            reason = (row.retrieve.error if row.retrieve else "") or _(
                "The exam is not in your archive.")
            FulfilmentStudy.objects.filter(pk=row.pk).update(error=reason[:500])
            continue
        _copy_study(row, source=source, requester=requester, progress=progress)
    progress.write(force=True)
    rows = list(fulfilment.studies.all())
    delivered = [row for row in rows if row.delivered_id and not row.error]
    for row in delivered:
        request_study_add(record_request=fulfilment.request, study=row.delivered)
    if delivered:
        _request_received(fulfilment)
    if len(delivered) == len(rows):
        _fulfil_end(fulfilment, status=RequestFulfilment.Status.COMPLETE)
        return
    failed = len(rows) - len(delivered)
    reason = ngettext("%(count)s exam could not be sent.", "%(count)s exams could not be sent.",
                      failed) % {"count": failed}
    status = RequestFulfilment.Status.PARTIAL if delivered else RequestFulfilment.Status.FAILED
    _fulfil_end(fulfilment, status=status, error=reason)


def _copy_study(row: FulfilmentStudy, *, source: Study, requester: Facility,
                progress: _Progress) -> None:
    """Ingest every instance of ``source`` that the requester's archive lacks; the
    stored bytes are the source's bytes (ingest keeps them as they are)."""
    everything = Instance.objects.filter(facility_id=source.facility_id, series__study=source)
    held = Instance.objects.filter(
        facility=requester, series__study__study_instance_uid=source.study_instance_uid)
    missing = everything.exclude(sop_instance_uid__in=held.values("sop_instance_uid"))
    FulfilmentStudy.objects.filter(pk=row.pk).update(
        source=source, images=everything.count(), copied=held.count(), error="")
    problems = []
    for instance in missing.order_by("pk").iterator():
        with instance.file.open("rb") as fh:
            outcome = ingest_file(facility=requester, fileobj=fh, source=IngestSource.IMPORT)
        if not outcome.ok:
            problems.append(outcome.reason)
        FulfilmentStudy.objects.filter(pk=row.pk).update(copied=held.count())
        progress.write()
    delivered = Study.objects.filter(facility=requester,
                                     study_instance_uid=source.study_instance_uid).first()
    copied = held.count()
    error = ""
    if copied < everything.count():
        error = ngettext("%(count)s image could not be copied.",
                         "%(count)s images could not be copied.",
                         everything.count() - copied) % {"count": everything.count() - copied}
        if problems:
            error = f"{error} {problems[0]}"
    FulfilmentStudy.objects.filter(pk=row.pk).update(delivered=delivered, copied=copied,
                                                      error=error[:500])


def _request_received(fulfilment: RequestFulfilment) -> None:
    record_request = fulfilment.request
    now = timezone.now()
    if RecordRequest.objects.filter(
            pk=record_request.pk,
            status__in=[RecordRequest.Status.SENT, RecordRequest.Status.OPENED,
                        RecordRequest.Status.UPLOADING],
    ).update(status=RecordRequest.Status.RECEIVED, received_at=now):
        audit_record(action="request.receive", actor_type=AuditEvent.ActorType.SYSTEM,
                     facility=record_request.facility, obj=record_request,
                     detail={"fulfilment": fulfilment.pk,
                             "from_facility": fulfilment.facility_id})


def _fulfil_end(fulfilment: RequestFulfilment, *, status: str, error: str = "") -> None:
    now = timezone.now()
    ended = RequestFulfilment.objects.filter(
        pk=fulfilment.pk, status=RequestFulfilment.Status.RUNNING,
    ).update(status=status, error=error[:500], finished_at=now, updated_at=now)
    fulfilment.refresh_from_db()
    if not ended:
        log.warning("RequestFulfilment %s was no longer this run's; outcome %s not recorded",
                    fulfilment.pk, status)
        return
    audit_record(action="request.fulfil.finish", actor_type=AuditEvent.ActorType.SYSTEM,
                 facility=fulfilment.facility, obj=fulfilment.request,
                 outcome=(AuditEvent.Outcome.SUCCESS
                          if status == RequestFulfilment.Status.COMPLETE
                          else AuditEvent.Outcome.FAILURE),
                 detail={"fulfilment": fulfilment.pk, "status": status,
                         "images": fulfilment.total, "copied": fulfilment.copied})


def fulfilments_of(*, record_request: RecordRequest, facility: Facility) -> QuerySet:
    return (RequestFulfilment.objects.filter(request=record_request, facility=facility)
            .prefetch_related("studies").select_related("answered_by"))


def archive_candidates(*, record_request: RecordRequest, facility: Facility) -> QuerySet:
    """Studies of ``facility``'s archive that may be the requested patient's: same date
    of birth, and the MRN or every word of the family name matching."""
    family = record_request.patient_name.split("=")[0].split("^")[0]
    by_name = Q()
    for word in name_search_key(family).split():
        by_name &= Q(patient__name_search__contains=word)
    match = by_name if family.strip() else Q(pk__in=[])
    if record_request.patient_mrn:
        match |= Q(patient__patient_id__iexact=record_request.patient_mrn)
    return (Study.objects.filter(facility=facility,
                                 patient__birth_date=record_request.patient_birth_date)
            .filter(match).select_related("patient")
            .order_by("-study_date", "-study_time", "-id"))
