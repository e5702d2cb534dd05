"""The requester's side of received records: which studies a request brought into the
archive, how the clerk reconciles them with their own record of the patient, and their
import into the facility's PACS by C-STORE.

The archive keeps every file exactly as it arrived. The reconciled identity is written
only into the copies sent to the PACS: each archived file is read, its Patient ID,
Patient's Name and (when given) Accession Number replaced, the outside Patient ID kept in
Other Patient IDs Sequence (PS3.3 C.7.1.1) with its issuer, and the result spooled and
sent in the file's own transfer syntax. Pixel Data is copied as stored, never decoded.
``RequestStudy.changes`` records each element that changes, with its old and new value.

An import lives on a ``RequestImport`` row that a Celery task fills and the request's
page polls. Runs claim the row with the conditional UPDATE of the PACS link's jobs
(``dicomgw.retrieve``), retry association failures a bounded number of times with
backoff, and a run that died is found by ``request_jobs_recover_stale``."""

import contextlib
import datetime
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from dicomgw.models import Instance, PacsNode, Study
from dicomgw.retrieve import StoreRun, stale_jobs_requeue
from dicomgw.services import quiet_pydicom_reading
from pockethealth.models import AuditEvent, StaffUser
from pockethealth.services import audit_record

from .models import (
    RecordRequest,
    RequestFulfilment,
    RequestImport,
    RequestImportResult,
    RequestStudy,
    Upload,
    UploadedFile,
)
from .services import RetrievalError

if TYPE_CHECKING:  # pydicom and pynetdicom load only in the processes that send
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

# Progress is written to the row at most this often (the page polls every second).
PROGRESS_INTERVAL = 0.5
# Elements larger than this stay on disc while a copy is written (pixel data).
DEFER_SIZE = 1024 * 1024
UTF8 = "ISO_IR 192"
# Value lengths (PS3.5 6.2): LO for Patient ID, SH for Accession Number, and PN's 64
# characters per component group.
PATIENT_ID_MAX = 64
ACCESSION_MAX = 16
NAME_GROUP_MAX = 64


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or timezone.now()


# --- Received studies ------------------------------------------------------------------


def request_studies_collect(*, record_request: RecordRequest) -> list[RequestStudy]:
    """Make a ``RequestStudy`` of every archived study that the request's confirmed
    uploads brought (through ``UploadedFile.instance``). Calling it again adds only the
    studies not yet listed. Returns the request's studies."""
    instances = UploadedFile.objects.filter(
        upload__request=record_request, upload__status=Upload.Status.CONFIRMED,
        instance__isnull=False,
    ).values("instance_id")
    studies = Study.objects.filter(
        facility=record_request.facility, series__instances__in=instances).distinct()
    for study in studies:
        request_study_add(record_request=record_request, study=study)
    return list(record_request.request_studies.select_related("study__patient"))


def request_study_add(*, record_request: RecordRequest, study: Study) -> RequestStudy:
    """The request's row for ``study`` (an archived study of the requesting facility),
    made when missing."""
    if study.facility_id != record_request.facility_id:
        raise RetrievalError("a request lists only studies of its own facility's archive")
    request_study, _created = RequestStudy.objects.get_or_create(
        request=record_request, study_instance_uid=study.study_instance_uid,
        defaults={"study": study, "study_date": study.study_date,
                  "description": study.description, "modalities": study.modalities})
    return request_study


def studies_held_by_requests(*, now: datetime.datetime, cutoff: datetime.datetime
                             ) -> QuerySet:
    """Studies that requests brought, kept from the archive purge (ARCHIVE_HOLDERS): as
    long as the request is open, which may be years, and for the retention period after
    it ended; also those of uploads still arriving, and the answering facility's
    studies while an answer is being copied from them."""
    ended_recently = (Q(request__imported_at__gt=cutoff) | Q(request__cancelled_at__gt=cutoff)
                      | Q(request__declined_at__gt=cutoff))
    listed = RequestStudy.objects.filter(
        Q(request__status__in=RecordRequest.OPEN_STATUSES) | ended_recently).values("study_id")
    uploaded = UploadedFile.objects.filter(
        upload__request__status__in=RecordRequest.OPEN_STATUSES, instance__isnull=False,
    ).values("instance__series__study_id")
    answering = RequestFulfilment.objects.filter(
        status__in=RequestFulfilment.LIVE_STATUSES, studies__source__isnull=False,
    ).values("studies__source_id")
    return Study.objects.filter(
        Q(pk__in=listed) | Q(pk__in=uploaded) | Q(pk__in=answering)).values("pk")


# --- Reconcile -------------------------------------------------------------------------


def _check_importable(record_request: RecordRequest) -> None:
    """Studies are reconciled and imported while the request has them and is still
    open: not once it is imported, cancelled or declined."""
    S = RecordRequest.Status
    if record_request.status == S.IMPORTED:
        raise RetrievalError(_("This request has been imported already; it is closed."))
    if record_request.status in (S.CANCELLED, S.DECLINED):
        raise RetrievalError(_("This request is %(status)s; its studies can no longer be "
                               "imported.") % {
                                   "status": record_request.get_status_display().lower()})


def identity_changes(study: Study, *, patient_id: str, patient_name: str,
                     accession_number: str) -> list[dict]:
    """What the copies sent to the PACS will say differently from the study as received:
    one ``{tag, keyword, old, new}`` per element. A changed Patient ID drops the outside
    Issuer of Patient ID (it does not issue the local MRN) and keeps the outside ID in
    Other Patient IDs Sequence (PS3.3 C.7.1.1). An empty accession keeps the received
    one."""
    patient = study.patient
    changes = []

    def change(tag: str, keyword: str, old: str, new: str) -> None:
        if old != new:
            changes.append({"tag": tag, "keyword": keyword, "old": old, "new": new})

    change("(0010,0020)", "PatientID", patient.patient_id, patient_id)
    change("(0010,0010)", "PatientName", patient.name, patient_name)
    if accession_number:
        change("(0008,0050)", "AccessionNumber", study.accession_number, accession_number)
    if patient.patient_id != patient_id:
        change("(0010,0021)", "IssuerOfPatientID", patient.issuer_of_patient_id, "")
        if patient.patient_id:
            kept = patient.patient_id
            if patient.issuer_of_patient_id:
                kept = f"{kept} ({patient.issuer_of_patient_id})"
            change("(0010,1002)", "OtherPatientIDsSequence", "", kept)
    return changes


def check_identity(*, patient_id: str, patient_name: str, accession_number: str) -> None:
    """Raise ``RetrievalError`` when a value cannot go into its DICOM element."""
    if not patient_id:
        raise RetrievalError(_("Enter the patient's MRN in your facility."))
    if not patient_name.strip("^= "):
        raise RetrievalError(_("Enter the patient's name as your facility records it."))
    for value, length, label in ((patient_id, PATIENT_ID_MAX, _("The MRN")),
                                 (accession_number, ACCESSION_MAX, _("The accession number"))):
        if len(value) > length:
            raise RetrievalError(_("%(field)s may have at most %(count)s characters.") % {
                "field": label, "count": length})
    if any(len(group) > NAME_GROUP_MAX for group in patient_name.split("=")):
        raise RetrievalError(_("The name may have at most %(count)s characters.") % {
            "count": NAME_GROUP_MAX})
    for value in (patient_id, patient_name, accession_number):
        # A backslash separates values (PS3.5 6.4); control characters are not text.
        if "\\" in value or any(ord(c) < 32 for c in value):
            raise RetrievalError(_("Backslashes and control characters cannot be used."))


def request_study_reconcile(*, request_study: RequestStudy, by: StaffUser,
                            local_patient_id: str, local_patient_name: str,
                            local_accession_number: str = "",
                            now: datetime.datetime | None = None,
                            request: HttpRequest | None = None) -> RequestStudy:
    """Map a received study to the facility's own record of the patient: the MRN, the
    name (DICOM PN form) and optionally the accession number the copies sent to the
    PACS will carry. Records the changes (see ``identity_changes``). Not while an
    import of the study is under way."""
    record_request = request_study.request
    _check_importable(record_request)
    local_patient_id = local_patient_id.strip()
    local_patient_name = local_patient_name.strip()
    local_accession_number = local_accession_number.strip()
    check_identity(patient_id=local_patient_id, patient_name=local_patient_name,
                   accession_number=local_accession_number)
    if request_study.study_id is None:
        raise RetrievalError(_("This study is no longer in the archive."))
    if request_study.imports.filter(status__in=RequestImport.LIVE_STATUSES).exists():
        raise RetrievalError(_("This study is being imported; wait until the import ends."))
    study = Study.objects.select_related("patient").get(pk=request_study.study_id)
    changes = identity_changes(study, patient_id=local_patient_id,
                               patient_name=local_patient_name,
                               accession_number=local_accession_number)
    RequestStudy.objects.filter(pk=request_study.pk).update(
        local_patient_id=local_patient_id, local_patient_name=local_patient_name,
        local_accession_number=local_accession_number, changes=changes,
        reconciled_at=_now(now), reconciled_by=by)
    request_study.refresh_from_db()
    audit_record(action="request.reconcile", user=by, request=request,
                 facility=record_request.facility, obj=record_request,
                 patient_ref=study.patient_id,
                 detail={"request_study": request_study.pk, "study": study.pk,
                         "changed": [c["keyword"] for c in changes]})
    return request_study


def reconcile_initial(request_study: RequestStudy) -> dict:
    """What the reconcile form starts with: the values chosen before, else the patient
    as the request names them (the requester's own MRN and spelling)."""
    if request_study.is_reconciled:
        return {"local_patient_id": request_study.local_patient_id,
                "local_patient_name": request_study.local_patient_name,
                "local_accession_number": request_study.local_accession_number}
    record_request = request_study.request
    return {"local_patient_id": record_request.patient_mrn,
            "local_patient_name": record_request.patient_name,
            "local_accession_number": ""}


# --- Import ----------------------------------------------------------------------------


def _identity(request_study: RequestStudy) -> dict:
    identity = {"PatientID": request_study.local_patient_id,
                "PatientName": request_study.local_patient_name}
    if request_study.local_accession_number:
        identity["AccessionNumber"] = request_study.local_accession_number
    return identity


def request_import_start(*, record_request: RecordRequest, node: PacsNode, by: StaffUser,
                         request: HttpRequest | None = None) -> list[RequestImport]:
    """Queue an import of every received study of the request into ``node`` (a PACS of
    the requesting facility), one job per study. Studies already imported are left
    alone; a study whose import is under way keeps that one. Every study must be
    reconciled first. Returns the live jobs."""
    _check_importable(record_request)
    if record_request.status != RecordRequest.Status.RECEIVED:
        raise RetrievalError(_("Nothing has been received for this request yet."))
    if node.facility_id != record_request.facility_id or not node.is_active:
        raise RetrievalError(_("Choose one of your facility's PACS."))
    request_studies = list(record_request.request_studies.select_related("study"))
    if not request_studies:
        raise RetrievalError(_("Nothing has been received for this request yet."))
    if any(rs.study_id is None for rs in request_studies):
        raise RetrievalError(_("A study of this request is no longer in the archive."))
    waiting = sum(1 for rs in request_studies if not rs.is_reconciled)
    if waiting:
        raise RetrievalError(ngettext(
            "Reconcile every study with your patient record before importing: %(count)s "
            "study is not reconciled yet.",
            "Reconcile every study with your patient record before importing: %(count)s "
            "studies are not reconciled yet.", waiting) % {"count": waiting})
    pending = [rs for rs in request_studies
               if not rs.imports.filter(status=RequestImport.Status.COMPLETE).exists()]
    if not pending:
        _request_close_when_imported(record_request, now=timezone.now())
        raise RetrievalError(_("Every study of this request is imported already."))
    jobs = []
    with transaction.atomic():
        for request_study in pending:
            live = request_study.imports.filter(status__in=RequestImport.LIVE_STATUSES).first()
            if live is None:
                live = _import_create(request_study, node=node, by=by)
            jobs.append(live)
        audit_record(action="request.import.start", user=by, request=request,
                     facility=record_request.facility, obj=record_request,
                     detail={"node": node.pk, "imports": [job.pk for job in jobs]})
    return jobs


def _import_create(request_study: RequestStudy, *, node: PacsNode,
                   by: StaffUser) -> RequestImport:
    total = Instance.objects.filter(series__study_id=request_study.study_id).count()
    try:
        with transaction.atomic():
            job = RequestImport.objects.create(
                request_study=request_study, node=node, requested_by=by,
                identity=_identity(request_study), total=total)
    except IntegrityError:
        # Another click queued this study's import a moment ago.
        return request_study.imports.get(status__in=RequestImport.LIVE_STATUSES)
    enqueue_on_commit("import_study", job.pk)
    return job


def request_import_retry(*, request_import: RequestImport, by: StaffUser,
                         request: HttpRequest | None = None) -> RequestImport:
    """Send again what a finished, partial or failed import could not deliver, under the
    identity it started with; images the PACS accepted are not sent twice."""
    record_request = request_import.request_study.request
    _check_importable(record_request)
    try:
        with transaction.atomic():
            queued = RequestImport.objects.filter(
                pk=request_import.pk,
                status__in=[RequestImport.Status.PARTIAL, RequestImport.Status.FAILED],
            ).update(status=RequestImport.Status.QUEUED, attempts=0, error="",
                     finished_at=None, updated_at=timezone.now())
            if queued:
                audit_record(action="request.import.retry", user=by, request=request,
                             facility=record_request.facility, obj=record_request,
                             detail={"import": request_import.pk,
                                     "node": request_import.node_id})
                enqueue_on_commit("import_study", request_import.pk)
    except IntegrityError:
        raise RetrievalError(_("This study is being imported already.")) from None
    request_import.refresh_from_db()
    return request_import


def enqueue_on_commit(task_name: str, job_id: int) -> None:
    """Send the task ``task_name`` of ``retrieval.tasks`` for ``job_id`` once the current
    transaction commits (the worker must find the row)."""
    from . import tasks

    getattr(tasks, task_name).delay_on_commit(job_id)


class ImportRun(StoreRun):
    """A run of an import: the copies sent carry the identity the import started with,
    and the study's import, once complete, may close the request."""

    model = RequestImport
    result_model = RequestImportResult
    job_field = "request_import"
    related = ("node", "request_study__study", "request_study__request__facility")

    def study_instances(self) -> QuerySet[Instance]:
        study = self.job.request_study.study
        return Instance.objects.filter(facility_id=study.facility_id, series__study=study)

    @property
    def prepare(self):
        return partial(rewritten_copy, identity=self.job.identity)

    def end(self, *, status: str, error: str = "") -> None:
        _import_end(self.job, status=status, error=error)

    def internal_error(self) -> str:
        return _("An internal error stopped the import. Press Retry; if it "
                 "happens again, call support.")


def request_import_run(*, import_id: int) -> float | None:
    """The body of the import task: C-STORE every instance of the study that has no
    delivered result yet, each as a rewritten copy, recording a result per instance
    (PS3.4 B.2.3). Returns the seconds after which to run again, or None."""
    return ImportRun.run(import_id)


def _import_end(job: RequestImport, *, status: str, error: str = "") -> None:
    now = timezone.now()
    # The job's end and, with its last study, the request's end commit together: whoever
    # sees the import finished sees the request imported.
    with transaction.atomic():
        _import_end_recorded(job, status=status, error=error, now=now)


def _import_end_recorded(job: RequestImport, *, status: str, error: str,
                         now: datetime.datetime) -> None:
    ended = RequestImport.objects.filter(pk=job.pk, status=RequestImport.Status.RUNNING).update(
        status=status, error=error[:500], finished_at=now, updated_at=now)
    job.refresh_from_db()
    if not ended:
        log.warning("RequestImport %s was no longer this run's; outcome %s not recorded",
                    job.pk, status)
        return
    record_request = job.request_study.request
    audit_record(action="request.import.finish", actor_type=AuditEvent.ActorType.SYSTEM,
                 facility=record_request.facility, obj=record_request,
                 patient_ref=job.request_study.study.patient_id,
                 outcome=(AuditEvent.Outcome.SUCCESS if status == RequestImport.Status.COMPLETE
                          else AuditEvent.Outcome.FAILURE),
                 detail={"import": job.pk, "node": job.node_id, "status": status,
                         "images": job.total, "sent": job.sent, "failed": job.failed,
                         "attempts": job.attempts})
    if status == RequestImport.Status.COMPLETE:
        _request_close_when_imported(record_request, now=now)


def _request_close_when_imported(record_request: RecordRequest, *,
                                 now: datetime.datetime) -> None:
    """The request ends, imported, once every study it brought has a complete import."""
    pending = RequestStudy.objects.filter(request=record_request).exclude(
        imports__status=RequestImport.Status.COMPLETE)
    if pending.exists():
        return
    if RecordRequest.objects.filter(
            pk=record_request.pk, status=RecordRequest.Status.RECEIVED).update(
            status=RecordRequest.Status.IMPORTED, imported_at=now):
        audit_record(action="request.imported", actor_type=AuditEvent.ActorType.SYSTEM,
                     facility=record_request.facility, obj=record_request,
                     detail={"studies": record_request.request_studies.count()})


# --- The copy sent ---------------------------------------------------------------------


@contextlib.contextmanager
def rewritten_copy(instance: Instance, path: Path, *, identity: dict) -> Iterator[Path]:
    """A spooled copy of the archived file at ``path`` carrying ``identity`` (see
    ``apply_identity``), in the same transfer syntax; removed on the way out. Raises
    ValueError when the file cannot be rewritten."""
    spool = Path(settings.SPOOL_DIR) / "import"
    spool.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool, prefix="import-", suffix=".dcm")
    os.close(fd)
    from pydicom import dcmread

    quiet_pydicom_reading()
    try:
        try:
            ds = dcmread(path, defer_size=DEFER_SIZE)
            apply_identity(ds, identity)
            ds.save_as(name)
        except OSError:
            raise
        except Exception as exc:  # a stored file pydicom cannot write back
            log.warning("import copy not written: instance=%s error=%s", instance.pk,
                        type(exc).__name__)
            raise ValueError("the archived file could not be rewritten") from None
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def apply_identity(ds: "Dataset", identity: dict) -> None:
    """Write the reconciled values into ``ds``. The outside Patient ID (with its issuer)
    is added to Other Patient IDs Sequence unless already there (PS3.3 C.7.1.1), and the
    outside Issuer of Patient ID removed. A value the data set's Specific Character Set
    cannot encode makes the whole data set UTF-8 (ISO_IR 192, PS3.3 C.12.1.1.2)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if not all(_encodable(ds, value) for value in identity.values()):
        ds.decode()
        ds.SpecificCharacterSet = UTF8
    original_id = str(ds.get("PatientID", "") or "")
    original_issuer = str(ds.get("IssuerOfPatientID", "") or "")
    if original_id != identity["PatientID"]:
        if original_id:
            others = list(ds.get("OtherPatientIDsSequence") or [])
            if not any(str(item.get("PatientID", "")) == original_id for item in others):
                item = Dataset()
                item.PatientID = original_id
                if original_issuer:
                    item.IssuerOfPatientID = original_issuer
                item.TypeOfPatientID = "TEXT"
                others.append(item)
            ds.OtherPatientIDsSequence = Sequence(others)
        for keyword in ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence"):
            if keyword in ds:
                delattr(ds, keyword)
    for keyword, value in identity.items():
        setattr(ds, keyword, value)


def _encodable(ds: "Dataset", value: str) -> bool:
    from pydicom.charset import convert_encodings, encode_string

    if value.isascii():
        return True
    charset = ds.get("SpecificCharacterSet")
    if not charset:
        return False  # the default repertoire is ASCII (PS3.5 6.1.2.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_string(value, convert_encodings(charset))
    return not caught


# --- Stale jobs ------------------------------------------------------------------------


def request_jobs_recover_stale(*, older_than: datetime.timedelta | None = None
                               ) -> list[tuple[str, int]]:
    """Imports and answers whose worker is gone, queued again (``stale_jobs_requeue``):
    ("import" | "fulfil", id) pairs for the caller to send the tasks of."""
    return stale_jobs_requeue((("import", RequestImport), ("fulfil", RequestFulfilment)),
                              older_than=older_than, given_up=_stale_given_up_audit)


def _stale_given_up_audit(kind: str, job: RequestImport | RequestFulfilment) -> None:
    record_request = job.request_study.request if kind == "import" else job.request
    audit_record(action=f"request.{kind}.finish", actor_type=AuditEvent.ActorType.SYSTEM,
                 facility=job.facility if kind == "fulfil" else record_request.facility,
                 obj=record_request, outcome=AuditEvent.Outcome.FAILURE,
                 detail={kind: job.pk, "status": "failed", "reason": "stale",
                         "attempts": job.attempts})
