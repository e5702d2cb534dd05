"""Search a PACS, retrieve studies from it into the archive, push archived studies to it.

The work of a retrieve or a push lives on a row (``RetrieveJob``, ``PushJob``) that a
Celery task fills and a page polls. A run claims its row with a conditional UPDATE, so a
duplicated or redelivered task message does nothing, and a run killed half-way leaves
the row RUNNING with an ``updated_at`` that stops moving; ``jobs_recover_stale`` puts
such rows back in the queue. A re-run asks the PACS only for what the archive lacks.

The DIMSE client (``dimse``: pynetdicom, pydicom) is imported by the functions that talk
to a PACS, not with this module, which every web process loads for its names."""

from __future__ import annotations

import datetime
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from pockethealth.models import AuditEvent, Facility, StaffUser
from pockethealth.services import audit_record

from .models import (
    Instance,
    PacsNode,
    PushJob,
    PushResult,
    RetrieveJob,
    StoreJob,
    StoreResult,
    Study,
    TaskJob,
)
from .services import DicomGatewayError

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from pathlib import Path

    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

# Association problems that may pass: worth another try after a pause. A rejected
# association (unknown AE title) or a refusal in a DIMSE status will not go away alone.
TRANSIENT_KINDS = frozenset({"refused", "timeout", "aborted", "network"})


def _setting(name: str, default):
    return getattr(settings, name, default)


def _actor(user: StaffUser | None) -> str | None:
    """The audit actor type: the user's, or the system's for work nobody asked for."""
    return None if user else AuditEvent.ActorType.SYSTEM


def search_timeout() -> int:
    """Seconds a PACS search may take before it is cut short."""
    return _setting("PACS_SEARCH_TIMEOUT", 20)


def search_limit() -> int:
    """The most studies a search lists."""
    return _setting("PACS_SEARCH_LIMIT", 200)


def max_attempts() -> int:
    """Runs of one job before an association failure is final."""
    return _setting("PACS_JOB_MAX_ATTEMPTS", 4)


def retry_delay(attempt: int) -> float:
    """Exponential backoff after the ``attempt``-th failed run: base, 2×base, 4×base…"""
    base = _setting("PACS_RETRY_BACKOFF_SECONDS", 30)
    return min(base * 2 ** max(attempt - 1, 0), _setting("PACS_RETRY_BACKOFF_MAX_SECONDS", 600))


def stale_after() -> datetime.timedelta:
    """A RUNNING job whose row has not moved for this long has lost its worker. Runs write
    at least every ``PROGRESS_INTERVAL`` while they work, and a DIMSE wait is bounded by
    the node's timeouts, so this only needs to exceed the longest of those."""
    return datetime.timedelta(seconds=_setting("PACS_JOB_STALE_SECONDS", 300))


def archive_settle_seconds() -> float:
    """After a C-MOVE, how long the archive may go without a new image before the images
    still missing are taken as not coming."""
    return _setting("PACS_ARCHIVE_SETTLE_SECONDS", 30)


# Progress is written to the row at most this often (the status page polls every second).
PROGRESS_INTERVAL = 0.5


# --- Search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchCriteria:
    """What a clerk searches a PACS by; empty values do not restrict."""

    patient_name: str = ""
    patient_id: str = ""
    birth_date: datetime.date | None = None
    accession_number: str = ""
    date_from: datetime.date | None = None
    date_to: datetime.date | None = None
    modality: str = ""


class ArchiveState:
    ABSENT = ""
    PARTIAL = "partial"
    COMPLETE = "complete"


@dataclass(frozen=True)
class StudyHit:
    """One study as a PACS describes it, and how much of it our archive holds."""

    study_instance_uid: str
    study_date: datetime.date | None
    study_time: str
    patient_name: str  # DICOM PN form, decoded through the response's character set
    patient_id: str
    birth_date: datetime.date | None
    sex: str
    accession_number: str
    description: str
    modalities: tuple[str, ...]
    num_series: int | None
    num_instances: int | None
    archived_instances: int = 0
    archive_study_id: int | None = None

    @property
    def archive_state(self) -> str:
        if self.archive_study_id is None or not self.archived_instances:
            return ArchiveState.ABSENT
        if self.num_instances is not None and self.archived_instances < self.num_instances:
            return ArchiveState.PARTIAL
        return ArchiveState.COMPLETE

    def as_session(self) -> dict:
        """JSON-ready, for the session (which keeps the last results between the search
        and the retrieve request)."""
        data = dict(self.__dict__)
        for key in ("study_date", "birth_date"):
            data[key] = data[key].isoformat() if data[key] else None
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_session(cls, data: dict) -> StudyHit:
        data = dict(data)
        for key in ("study_date", "birth_date"):
            data[key] = datetime.date.fromisoformat(data[key]) if data[key] else None
        data["modalities"] = tuple(data["modalities"])
        return cls(**data)

    def label(self) -> dict:
        """The fields a RetrieveJob keeps to be recognised before its images arrive."""
        return {
            "patient_name": self.patient_name[:320], "patient_id": self.patient_id[:64],
            "study_date": self.study_date, "description": self.description[:200],
            "modalities": "\\".join(self.modalities)[:200],
        }


class SearchHits(list):
    """The hits of a search; ``truncated`` when the PACS had more than the limit."""

    truncated = False


def patient_name_query(text: str) -> str:
    """A clerk's name as a PN matching key (PS3.4 C.2.2.2.4): "Smith, J" becomes
    "Smith^J*"; a name without a wildcard of its own matches as a prefix."""
    text = " ".join(text.split())
    if "," in text:
        family, _sep, given = text.partition(",")
        text = f"{family.strip()}^{given.strip()}"
    if text and "*" not in text and "?" not in text:
        text += "*"
    return text


def _da(value: datetime.date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def study_query(criteria: SearchCriteria) -> dict[str, str | None]:
    """The STUDY-level C-FIND identifier (PS3.4 C.6.2.1) for ``criteria``: matching keys
    with values, return keys empty (None)."""
    date_range = ""
    if criteria.date_from or criteria.date_to:
        # A DA range "from-to", open on either side (PS3.4 C.2.2.2.5).
        date_range = f"{_da(criteria.date_from)}-{_da(criteria.date_to)}"
        if criteria.date_from == criteria.date_to:
            date_range = _da(criteria.date_from)
    return {
        "StudyInstanceUID": None,
        "StudyDate": date_range or None,
        "StudyTime": None,
        "PatientName": patient_name_query(criteria.patient_name) or None,
        "PatientID": criteria.patient_id.strip() or None,
        "PatientBirthDate": _da(criteria.birth_date) or None,
        "PatientSex": None,
        "AccessionNumber": criteria.accession_number.strip() or None,
        "StudyDescription": None,
        "ModalitiesInStudy": criteria.modality or None,
        "NumberOfStudyRelatedSeries": None,
        "NumberOfStudyRelatedInstances": None,
    }


def pacs_search(*, node: PacsNode, criteria: SearchCriteria) -> SearchHits:
    """Studies on ``node`` that match ``criteria``, newest first, each with how much of it
    the archive of the node's facility already holds. Raises ``DicomGatewayError`` with a
    sentence for the clerk when the PACS cannot be asked or does not answer in time."""
    from . import dimse
    from .dimse import DimseError

    timeout = search_timeout()
    limit = search_limit()
    started = time.monotonic()
    try:
        found = dimse.find(node, level="STUDY", query=study_query(criteria),
                           timeout=timeout, limit=limit + 1)
    except DimseError as exc:
        # The search's own time limit, not one of the node's timeouts (which have their
        # own message: the association, not the search, is what stalled).
        if exc.kind == "timeout" and time.monotonic() - started >= timeout:
            raise DicomGatewayError(
                _("The PACS did not answer within %(seconds)s s; narrow the search.")
                % {"seconds": timeout}
            ) from exc
        raise DicomGatewayError(str(exc)) from exc
    hits = SearchHits(_hit(ds) for ds in found if _text(ds.get("StudyInstanceUID")))
    truncated = len(hits) > limit
    hits = SearchHits(_with_archive_state(node.facility, hits[:limit]))
    hits.truncated = truncated
    hits.sort(key=lambda h: (h.study_date or datetime.date.min, h.study_time), reverse=True)
    return hits


def _hit(ds: Dataset) -> StudyHit:
    from pydicom.multival import MultiValue

    modalities = ds.get("ModalitiesInStudy")
    if isinstance(modalities, MultiValue | list | tuple):
        modality_list = tuple(_text(m) for m in modalities if _text(m))
    else:
        modality_list = tuple(m for m in _text(modalities).split("\\") if m)
    return StudyHit(
        study_instance_uid=_text(ds.get("StudyInstanceUID")),
        study_date=_date(ds.get("StudyDate")),
        study_time=_text(ds.get("StudyTime")),
        patient_name=_person_name(ds.get("PatientName")),
        patient_id=_text(ds.get("PatientID")),
        birth_date=_date(ds.get("PatientBirthDate")),
        sex=_text(ds.get("PatientSex")),
        accession_number=_text(ds.get("AccessionNumber")),
        description=_text(ds.get("StudyDescription")),
        modalities=modality_list,
        num_series=_count(ds.get("NumberOfStudyRelatedSeries")),
        num_instances=_count(ds.get("NumberOfStudyRelatedInstances")),
    )


def _with_archive_state(facility: Facility, hits: list[StudyHit]) -> list[StudyHit]:
    held = {
        uid: (pk, count) for uid, pk, count in Study.objects.filter(
            facility=facility, study_instance_uid__in=[h.study_instance_uid for h in hits],
        ).values_list("study_instance_uid", "pk", "num_instances")
    }
    result = []
    for hit in hits:
        pk, count = held.get(hit.study_instance_uid, (None, 0))
        result.append(StudyHit(**{**hit.__dict__, "archive_study_id": pk,
                                  "archived_instances": count}))
    return result


def _text(value) -> str:
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return str(value).replace("\0", "").strip()


def _person_name(value) -> str:
    groups = [group.rstrip("^ ") for group in _text(value).split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _date(value) -> datetime.date | None:
    digits = _text(value).replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def _count(value) -> int | None:
    try:
        return int(_text(value))
    except ValueError:
        return None


# --- Verify ---------------------------------------------------------------------------


def node_verify(*, node: PacsNode, user: StaffUser | None = None) -> tuple[bool, str]:
    """C-ECHO the node (PS3.7 9.1.5) and remember when and with what result."""
    from . import dimse
    from .dimse import DimseError

    started = time.monotonic()
    try:
        dimse.echo(node)
    except DimseError as exc:
        ok, message = False, str(exc)
    else:
        elapsed = round((time.monotonic() - started) * 1000)
        ok, message = True, _("The PACS answered the verification (C-ECHO) in %(ms)s ms.") % {
            "ms": elapsed}
    PacsNode.objects.filter(pk=node.pk).update(
        last_verified_at=timezone.now(), last_verify_result=message[:300])
    node.refresh_from_db(fields=["last_verified_at", "last_verify_result"])
    audit_record(action="pacs.verify", user=user, facility=node.facility, obj=node,
                 actor_type=_actor(user),
                 outcome=AuditEvent.Outcome.SUCCESS if ok else AuditEvent.Outcome.FAILURE)
    return ok, message


# --- Claiming, finishing and recovering jobs -----------------------------------------


def _claim(model: type[TaskJob], job_id: int) -> bool | float:
    """Take the job for this run: a queued job, or a running one whose worker is gone.
    One conditional UPDATE, so two workers never both win. Returns True when claimed;
    when another run holds the job, the seconds after which it would count as stale
    (a redelivered message comes back then, in case that run has died); else False."""
    now = timezone.now()
    claimable = Q(status=model.Status.QUEUED) | Q(status=model.Status.RUNNING,
                                                  updated_at__lt=now - stale_after())
    if model.objects.filter(claimable, pk=job_id).update(
        status=model.Status.RUNNING, attempts=F("attempts") + 1, started_at=now,
        finished_at=None, updated_at=now,
    ):
        return True
    held = model.objects.filter(pk=job_id, status=model.Status.RUNNING).values_list(
        "updated_at", flat=True).first()
    if held is None:
        return False
    return max((held + stale_after() - now).total_seconds(), 0) + 1


def _retry_later(job: TaskJob, reason: str) -> float | None:
    """After an association failure: back to the queue with a delay while attempts last.
    Returns the delay, or None when the attempts are used up (the caller ends the job)."""
    if job.attempts >= max_attempts():
        return None
    model = type(job)
    delay = retry_delay(job.attempts)
    model.objects.filter(pk=job.pk, status=model.Status.RUNNING).update(
        status=model.Status.QUEUED, error=reason[:500], updated_at=timezone.now())
    log.info("%s %s: association failure, retry %s in %ss", model.__name__, job.pk,
             job.attempts, delay)
    return delay


def _finish(job: RetrieveJob | PushJob, *, status: str, error: str = "", **fields) -> None:
    model = type(job)
    now = timezone.now()
    finished = model.objects.filter(pk=job.pk, status=model.Status.RUNNING).update(
        status=status, error=error[:500], finished_at=now, updated_at=now, **fields)
    job.refresh_from_db()
    if not finished:
        # Taken from this run (recovered as stale while it stalled): the other run ends it.
        log.warning("%s %s was no longer this run's; outcome %s not recorded",
                    model.__name__, job.pk, status)
        return
    patient_ref = None
    study = job.study
    if study is not None:
        patient_ref = study.patient_id
    kind = "retrieve" if model is RetrieveJob else "push"
    if model is RetrieveJob:
        detail = {"node": job.node_id, "status": status, "expected": job.expected,
                  "archived": job.archived, "missing": len(job.missing), "failed": job.failed,
                  "attempts": job.attempts}
    else:
        detail = {"node": job.node_id, "status": status, "images": job.total,
                  "sent": job.sent, "failed": job.failed, "attempts": job.attempts}
    audit_record(action=f"pacs.{kind}.finish", actor_type=AuditEvent.ActorType.SYSTEM,
                 facility=job.facility, obj=job, patient_ref=patient_ref,
                 outcome=(AuditEvent.Outcome.SUCCESS if status == model.Status.COMPLETE
                          else AuditEvent.Outcome.FAILURE),
                 detail=detail)
    log.info("%s %s finished: %s", model.__name__, job.pk, status)


def jobs_recover_stale(*, older_than: datetime.timedelta | None = None) -> list[tuple[str, int]]:
    """Retrieves and pushes whose worker is gone, queued again (``stale_jobs_requeue``):
    ("retrieve" | "push", id) pairs for the caller to send the tasks of."""
    return stale_jobs_requeue((("retrieve", RetrieveJob), ("push", PushJob)),
                              older_than=older_than, given_up=_stale_given_up_audit)


def _stale_given_up_audit(kind: str, job) -> None:
    audit_record(action=f"pacs.{kind}.finish", actor_type=AuditEvent.ActorType.SYSTEM,
                 facility=job.facility, obj=job, outcome=AuditEvent.Outcome.FAILURE,
                 detail={"node": job.node_id, "status": "failed", "reason": "stale",
                         "attempts": job.attempts})


def stale_jobs_requeue(kinds: Iterable[tuple[str, type[models.Model]]], *,
                       older_than: datetime.timedelta | None = None,
                       given_up: Callable[[str, models.Model], None]) -> list[tuple[str, int]]:
    """Find jobs of ``kinds`` ((kind, model) pairs: a model with ``status``,
    ``updated_at``, ``attempts``, ``finished_at`` and ``error``) whose worker is gone, and
    queue them again (the caller sends the tasks).

    A RUNNING row that has not moved for ``older_than`` lost its worker (killed, or the
    machine restarted); a QUEUED row that old lost its task message (the broker was
    down when it was sent). Both go back to QUEUED with a fresh ``updated_at`` and are
    returned as (kind, id). A job that has used up its attempts is FAILED instead, and
    ``given_up(kind, job)`` records it. The run's own claim decides who works on a job,
    so queueing one twice does no harm."""
    running_cutoff = timezone.now() - (older_than or stale_after())
    # A queued job may be waiting out its backoff: give it that long on top.
    queued_cutoff = running_cutoff - datetime.timedelta(
        seconds=_setting("PACS_RETRY_BACKOFF_MAX_SECONDS", 600))
    recovered = []
    for kind, model in kinds:
        stale = model.objects.filter(
            Q(status=model.Status.RUNNING, updated_at__lt=running_cutoff)
            | Q(status=model.Status.QUEUED, updated_at__lt=queued_cutoff))
        for job in stale:
            now = timezone.now()
            still_stale = model.objects.filter(pk=job.pk, status=job.status,
                                               updated_at=job.updated_at)
            if job.status == model.Status.RUNNING and job.attempts >= max_attempts():
                if still_stale.update(
                    status=model.Status.FAILED, finished_at=now, updated_at=now,
                    error=_("The transfer stopped %(count)s times without finishing; it was "
                            "given up. Press Retry to try again.") % {"count": job.attempts},
                ):
                    job.refresh_from_db()
                    given_up(kind, job)
                continue
            if still_stale.update(status=model.Status.QUEUED, updated_at=now):
                log.info("%s %s was %s and stale; queued again", model.__name__, job.pk,
                         job.status)
                recovered.append((kind, job.pk))
    return recovered


def _enqueue_retrieve(job_id: int) -> None:
    from .tasks import retrieve_study

    retrieve_study.delay_on_commit(job_id)


def _enqueue_push(job_id: int) -> None:
    from .tasks import push_study

    push_study.delay_on_commit(job_id)


# --- Retrieve -------------------------------------------------------------------------


def retrieve_start(*, node: PacsNode, study_instance_uid: str, requested_by: StaffUser | None,
                   hit: StudyHit | None = None) -> RetrieveJob:
    """Queue a retrieve of one study from ``node`` into the archive of the node's facility.
    A retrieve of that study already queued or running is returned instead of a second
    one. ``hit`` (from ``pacs_search``) labels the job until its images arrive."""
    facility = node.facility
    live = RetrieveJob.objects.filter(
        facility=facility, study_instance_uid=study_instance_uid,
        status__in=[RetrieveJob.Status.QUEUED, RetrieveJob.Status.RUNNING])
    existing = live.first()
    if existing is not None:
        return existing
    study = Study.objects.filter(facility=facility,
                                 study_instance_uid=study_instance_uid).first()
    try:
        with transaction.atomic():
            job = RetrieveJob.objects.create(
                facility=facility, node=node, requested_by=requested_by,
                study_instance_uid=study_instance_uid, study=study,
                **(hit.label() if hit else {}),
            )
            audit_record(action="pacs.retrieve.start", user=requested_by,
                         actor_type=_actor(requested_by), facility=facility, obj=job,
                         patient_ref=study.patient_id if study else None,
                         detail={"node": node.pk})
            _enqueue_retrieve(job.pk)
    except IntegrityError:
        # Another request created the live retrieve of this study a moment ago.
        return live.get()
    return job


def retrieve_retry(*, job: RetrieveJob, requested_by: StaffUser | None) -> RetrieveJob:
    """Run a finished PARTIAL or FAILED retrieve again, with fresh attempts; the run asks
    the PACS only for what the archive still lacks."""
    try:
        with transaction.atomic():
            queued = RetrieveJob.objects.filter(
                pk=job.pk, status__in=[RetrieveJob.Status.PARTIAL, RetrieveJob.Status.FAILED],
            ).update(status=RetrieveJob.Status.QUEUED, attempts=0, error="",
                     finished_at=None, updated_at=timezone.now())
            if queued:
                audit_record(action="pacs.retrieve.retry", user=requested_by,
                             actor_type=_actor(requested_by), facility=job.facility, obj=job,
                             detail={"node": job.node_id})
                _enqueue_retrieve(job.pk)
    except IntegrityError:
        # The study is being retrieved by another job already: that one is the live one.
        return RetrieveJob.objects.get(
            facility=job.facility, study_instance_uid=job.study_instance_uid,
            status__in=[RetrieveJob.Status.QUEUED, RetrieveJob.Status.RUNNING])
    job.refresh_from_db()
    return job


class _Progress:
    """Writes sub-operation counts to the job row, at most every PROGRESS_INTERVAL, and
    keeps ``updated_at`` moving so the job is never taken for stale while it works."""

    def __init__(self, job: RetrieveJob, *, expected: int):
        self.job = job
        self.expected = expected
        self.done = {"completed": 0, "failed": 0, "warning": 0}  # of earlier moves
        self.current = {"completed": 0, "failed": 0, "warning": 0}
        self.current_remaining: int | None = None
        self.later = 0  # images in the moves still to come
        self.last_write = 0.0

    def start_move(self, size: int, later: int) -> None:
        for key in self.done:
            self.done[key] += self.current[key]
            self.current[key] = 0
        self.current_remaining = size
        self.later = later

    def __call__(self, sub) -> None:
        self.current = {"completed": sub.completed or 0, "failed": sub.failed or 0,
                        "warning": sub.warning or 0}
        if sub.remaining is not None:
            self.current_remaining = sub.remaining
        self.write()

    def end_move(self, sub) -> None:
        """The final response of a move: its counts stand, nothing of it remains (final
        responses may leave the remaining count out, PS3.4 C.4.2.3.1)."""
        self(sub)
        self.current_remaining = 0

    def totals(self) -> dict:
        totals = {key: self.done[key] + self.current[key] for key in self.done}
        totals["remaining"] = (self.current_remaining or 0) + self.later
        return totals

    def write(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now
        # The study's count in the archive, for the page while images arrive; the exact
        # set is checked at the end.
        in_archive = Study.objects.filter(
            facility_id=self.job.facility_id, study_instance_uid=self.job.study_instance_uid,
        ).values_list("num_instances", flat=True).first() or 0
        RetrieveJob.objects.filter(pk=self.job.pk, status=RetrieveJob.Status.RUNNING).update(
            updated_at=timezone.now(), archived=min(in_archive, self.expected),
            **self.totals())


def retrieve_run(*, job_id: int) -> float | None:
    """The body of the retrieve task. Claims the job (a no-op if another run has it or it
    is finished), asks the PACS which instances the study has (C-FIND, IMAGE level),
    moves only those the archive lacks, waits until they are archived, and finishes the
    job COMPLETE or PARTIAL. Returns the seconds after which the task should run again
    (an association failure with attempts left), else None."""
    from .dimse import DimseError

    claim = _claim(RetrieveJob, job_id)
    if claim is not True:
        log.info("RetrieveJob %s not claimable (%s); nothing to do now", job_id, claim)
        return claim or None
    job = RetrieveJob.objects.select_related("node", "facility").get(pk=job_id)
    try:
        return _retrieve(job)
    except DimseError as exc:
        delay = _retry_later(job, str(exc)) if exc.kind in TRANSIENT_KINDS else None
        if delay is None:
            _finish_retrieve(job, failure=str(exc))
        return delay
    except Exception:
        log.exception("RetrieveJob %s stopped by an internal error", job.pk)
        _finish(job, status=RetrieveJob.Status.FAILED,
                error=_("An internal error stopped the retrieve. Press Retry; if it happens "
                        "again, call support."))
        raise


def _retrieve(job: RetrieveJob) -> None:
    from .dimse import DimseError

    node = job.node
    expected = _expected_instances(node, job.study_instance_uid)
    if not expected:
        _finish(job, status=RetrieveJob.Status.FAILED, expected=0, remaining=0,
                error=_("The PACS has no images for this study (it may have been deleted or "
                        "merged into another study)."))
        return None
    archived = _archived_uids(job.facility, expected)
    missing = set(expected) - archived
    RetrieveJob.objects.filter(pk=job.pk).update(
        expected=len(expected), archived=len(archived), remaining=len(missing), completed=0,
        failed=0, warning=0, error="", updated_at=timezone.now())
    log.info("RetrieveJob %s: %s instances on the PACS, %s to fetch", job.pk, len(expected),
             len(missing))
    failure = ""
    if missing:
        progress = _Progress(job, expected=len(expected))
        try:
            _move_missing(job, expected=expected, missing=missing, progress=progress)
        except DimseError as exc:
            if exc.kind in TRANSIENT_KINDS:
                # Keep what the association delivered before it broke; retry the rest.
                progress.write(force=True)
                raise
            failure = str(exc)
        progress.write(force=True)
        _wait_for_archive(job, missing=missing, already=len(archived),
                          delivered=_delivered(progress))
    _finish_retrieve(job, expected=expected, failure=failure)
    return None


def _delivered(progress: _Progress) -> int:
    totals = progress.totals()
    return totals["completed"] + totals["warning"]


def _expected_instances(node: PacsNode, study_uid: str) -> dict[str, str]:
    """{SOP Instance UID: Series Instance UID} of the study on the PACS, by C-FIND at
    IMAGE level: one query for the whole study where the PACS allows it, else series by
    series, as a PACS that insists on hierarchical keys needs (PS3.4 C.4.1.2.2)."""
    from . import dimse
    from .dimse import DimseError

    keys = {"StudyInstanceUID": study_uid}
    if node.query_model == PacsNode.QueryModel.PATIENT_ROOT:
        # Patient Root names the patient above the study (PS3.4 C.4.1.2.2.1).
        studies = dimse.find(node, level="STUDY", query={**keys, "PatientID": None})
        if not studies:
            return {}
        keys = {"PatientID": _text(studies[0].get("PatientID")), **keys}
    try:
        images = dimse.find(node, level="IMAGE", query={
            **keys, "SeriesInstanceUID": None, "SOPInstanceUID": None})
    except DimseError as exc:
        if exc.kind != "failed":
            raise
        images = None
    # No answer, or answers without their series, may be a hierarchical PACS's way of
    # declining the relational query: ask series by series.
    if images and all(_text(i.get("SeriesInstanceUID")) for i in images):
        return _instance_series(images)
    expected: dict[str, str] = {}
    for series in dimse.find(node, level="SERIES", query={**keys, "SeriesInstanceUID": None}):
        series_uid = _text(series.get("SeriesInstanceUID"))
        if series_uid:
            expected.update(_instance_series(dimse.find(node, level="IMAGE", query={
                **keys, "SeriesInstanceUID": series_uid, "SOPInstanceUID": None,
            }), series_uid=series_uid))
    return expected


def _instance_series(images: list[Dataset], series_uid: str = "") -> dict[str, str]:
    found = {}
    for image in images:
        sop_uid = _text(image.get("SOPInstanceUID"))
        if sop_uid:
            found[sop_uid] = series_uid or _text(image.get("SeriesInstanceUID"))
    return found


def _archived_uids(facility: Facility, uids) -> set[str]:
    uids = list(uids)
    found: set[str] = set()
    for start in range(0, len(uids), 1000):
        found.update(Instance.objects.filter(
            facility=facility, sop_instance_uid__in=uids[start:start + 1000],
        ).values_list("sop_instance_uid", flat=True))
    return found


def _move_missing(job: RetrieveJob, *, expected: dict[str, str], missing: set[str],
                  progress: _Progress) -> None:
    """Fetch the ``missing`` instances: the whole study when none is archived; else each
    series of which nothing is archived, and single instances (IMAGE level) where part
    of a series is (PS3.4 C.4.2.2.1). With C-GET the study is asked for whole: the
    archive keeps the instances it has and ignores the copies."""
    from . import dimse

    node = job.node
    if node.supports_c_get:
        progress.start_move(len(missing), later=0)
        sub = dimse.get(node, study_uid=job.study_instance_uid, facility=job.facility,
                        on_progress=progress)
        progress.end_move(sub)
        return
    destination = dimse.move_destination(node)
    if len(missing) == len(expected):
        progress.start_move(len(missing), later=0)
        sub = dimse.move(node, study_uid=job.study_instance_uid, destination_ae=destination,
                         on_progress=progress)
        progress.end_move(sub)
        return
    by_series: dict[str, list[str]] = {}
    for sop_uid, series_uid in expected.items():
        by_series.setdefault(series_uid, []).append(sop_uid)
    plan = []
    for series_uid, sop_uids in by_series.items():
        wanted = sorted(uid for uid in sop_uids if uid in missing)
        if wanted:
            plan.append((series_uid, wanted, len(wanted) == len(sop_uids)))
    left = len(missing)
    for series_uid, wanted, whole_series in plan:
        left -= len(wanted)
        progress.start_move(len(wanted), later=left)
        sub = dimse.move(node, study_uid=job.study_instance_uid, destination_ae=destination,
                         series_uid=series_uid, instance_uids=None if whole_series else wanted,
                         on_progress=progress)
        progress.end_move(sub)


def _wait_for_archive(job: RetrieveJob, *, missing: set[str], already: int,
                      delivered: int) -> None:
    """Wait until the SCP has archived the moved instances (it indexes them after the
    C-STORE sub-operations are answered). Ends when every missing instance is in, when
    as many as the PACS says it delivered are in and a moment has passed without more,
    or when none has come in for ``archive_settle_seconds``."""
    waiting = set(missing)
    settle = archive_settle_seconds()
    arrived = 0
    last_arrival = time.monotonic()
    while waiting:
        now_in = _archived_uids(job.facility, waiting)
        if now_in:
            waiting -= now_in
            arrived += len(now_in)
            last_arrival = time.monotonic()
        RetrieveJob.objects.filter(pk=job.pk, status=RetrieveJob.Status.RUNNING).update(
            archived=already + arrived, updated_at=timezone.now())
        if not waiting:
            break
        idle = time.monotonic() - last_arrival
        if idle >= settle or (arrived >= delivered and idle >= 1.0):
            break
        time.sleep(0.25)


def _finish_retrieve(job: RetrieveJob, *, expected: dict[str, str] | None = None,
                     failure: str = "") -> None:
    """COMPLETE when every expected instance is archived; else PARTIAL with the missing
    SOP Instance UIDs, or FAILED when none arrived (PS3.4 C.4.2.1.4: a C-MOVE's counts
    are the PACS's word; the archive is what counts)."""
    if expected is None:
        _finish(job, status=RetrieveJob.Status.FAILED, error=failure)
        return
    archived = _archived_uids(job.facility, expected)
    missing = sorted(set(expected) - archived)
    study = Study.objects.filter(facility=job.facility,
                                 study_instance_uid=job.study_instance_uid).first()
    RetrieveJob.objects.filter(pk=job.pk).update(study=study)
    job.study = study
    fields = {"archived": len(archived), "missing": missing, "remaining": 0}
    if not missing:
        _finish(job, status=RetrieveJob.Status.COMPLETE, **fields)
        return
    reason = failure or ngettext(
        "%(count)s image did not arrive from the PACS.",
        "%(count)s images did not arrive from the PACS.", len(missing)) % {"count": len(missing)}
    status = RetrieveJob.Status.PARTIAL if archived else RetrieveJob.Status.FAILED
    _finish(job, status=status, error=reason, **fields)


# --- Push -----------------------------------------------------------------------------


def push_start(*, node: PacsNode, study: Study, requested_by: StaffUser | None) -> PushJob:
    """Queue sending every archived instance of ``study`` to ``node`` (C-STORE). A push of
    the same study to the same node already queued or running is returned instead."""
    if study.facility_id != node.facility_id:
        raise DicomGatewayError("a study is pushed only to a node of its own facility")
    live = PushJob.objects.filter(node=node, study=study,
                                  status__in=[PushJob.Status.QUEUED, PushJob.Status.RUNNING])
    existing = live.first()
    if existing is not None:
        return existing
    total = Instance.objects.filter(facility=study.facility, series__study=study).count()
    try:
        with transaction.atomic():
            job = PushJob.objects.create(facility=study.facility, node=node, study=study,
                                         requested_by=requested_by, total=total)
            audit_record(action="pacs.push.start", user=requested_by,
                         actor_type=_actor(requested_by), facility=study.facility, obj=job,
                         patient_ref=study.patient_id, detail={"node": node.pk, "images": total})
            _enqueue_push(job.pk)
    except IntegrityError:
        return live.get()
    return job


def push_retry(*, job: PushJob, requested_by: StaffUser | None) -> PushJob:
    """Send again what a finished push could not deliver; delivered instances are not
    sent twice."""
    try:
        with transaction.atomic():
            queued = PushJob.objects.filter(
                pk=job.pk, status__in=[PushJob.Status.PARTIAL, PushJob.Status.FAILED],
            ).update(status=PushJob.Status.QUEUED, attempts=0, error="", finished_at=None,
                     updated_at=timezone.now())
            if queued:
                audit_record(action="pacs.push.retry", user=requested_by,
                             actor_type=_actor(requested_by), facility=job.facility, obj=job,
                             patient_ref=job.study.patient_id, detail={"node": job.node_id})
                _enqueue_push(job.pk)
    except IntegrityError:
        return PushJob.objects.get(node=job.node, study=job.study,
                                   status__in=[PushJob.Status.QUEUED, PushJob.Status.RUNNING])
    job.refresh_from_db()
    return job


# --- C-STORE runs: a push here, a request's import in retrieval.imports ---------------


DELIVERED = ("success", "warning")


class StoreRun(ABC):
    """One run of a C-STORE job (a ``StoreJob``): send every instance of the study that has
    no delivered result yet, record a result per instance (PS3.4 B.2.3), and end the job
    COMPLETE, PARTIAL or FAILED. A subclass says which job and results, which instances,
    how the file sent is prepared and how the job ends."""

    model: type[StoreJob]
    result_model: type[StoreResult]
    job_field: str  # the result's foreign key to its job
    related: tuple[str, ...] = ("node",)  # what a run reads of the job, fetched with it
    # ``prepare`` of ``dimse.store``: the file to send for an archived one; None sends
    # the archived file.
    prepare: Callable[[Instance, Path], AbstractContextManager[Path]] | None = None

    def __init__(self, job: StoreJob):
        self.job = job
        self.last_write = 0.0

    @classmethod
    def run(cls, job_id: int) -> float | None:
        """Claim the job and send. Returns the seconds after which to run again, or None."""
        from .dimse import DimseError

        name = cls.model.__name__
        claim = _claim(cls.model, job_id)
        if claim is not True:
            log.info("%s %s not claimable (%s); nothing to do now", name, job_id, claim)
            return claim or None
        run = cls(cls.model.objects.select_related(*cls.related).get(pk=job_id))
        try:
            run.send()
        except DimseError as exc:
            run.count()
            if exc.kind not in TRANSIENT_KINDS:
                run.finish(failure=str(exc))
                return None
            delay = _retry_later(run.job, str(exc))
            if delay is None:
                run.give_up(str(exc))
            return delay
        except Exception:
            log.exception("%s %s stopped by an internal error", name, run.job.pk)
            run.end(status=cls.model.Status.FAILED, error=run.internal_error())
            raise
        return None

    @abstractmethod
    def study_instances(self) -> QuerySet[Instance]:
        """Every archived instance of the job's study."""

    @abstractmethod
    def end(self, *, status: str, error: str = "") -> None:
        """Record the job's end (when this run still holds it)."""

    @abstractmethod
    def internal_error(self) -> str:
        """The job's error after an unexpected exception."""

    def results(self) -> QuerySet[StoreResult]:
        return self.result_model.objects.filter(**{self.job_field: self.job})

    def send(self) -> None:
        job = self.job
        everything = self.study_instances()
        delivered = self.results().filter(outcome__in=DELIVERED).values("instance_id")
        instances = list(everything.exclude(pk__in=delivered).select_related("series").order_by(
            "series__series_number", "series_id", "instance_number", "pk"))
        self.model.objects.filter(pk=job.pk).update(
            total=everything.count(), error="", updated_at=timezone.now())
        if instances:
            from . import dimse

            dimse.store(job.node, instances=instances, on_result=self.record,
                        prepare=self.prepare)
        self.count()
        self.finish()

    def record(self, instance: Instance, status: int | None, outcome: str,
               detail: str) -> None:
        """``on_result`` of ``dimse.store``: the instance's result row, and the job's
        counts at most every PROGRESS_INTERVAL."""
        self.result_model.objects.update_or_create(
            **{self.job_field: self.job}, instance=instance,
            defaults={"status": status, "outcome": outcome, "detail": (detail or "")[:300],
                      "sent_at": timezone.now()},
        )
        now = time.monotonic()
        if now - self.last_write >= PROGRESS_INTERVAL:
            self.last_write = now
            self.count()

    def count(self) -> None:
        results = self.results()
        self.model.objects.filter(pk=self.job.pk).update(
            sent=results.filter(outcome__in=DELIVERED).count(),
            warning=results.filter(outcome="warning").count(),
            failed=results.exclude(outcome__in=DELIVERED).count(),
            updated_at=timezone.now(),
        )

    def finish(self, *, failure: str = "") -> None:
        """COMPLETE when every image was delivered; else PARTIAL, or FAILED when none
        was, with ``failure`` or how many images the PACS did not accept."""
        job = self.job
        job.refresh_from_db()
        Status = self.model.Status
        if job.sent >= job.total and not failure:
            self.end(status=Status.COMPLETE)
            return
        unsent = job.total - job.sent
        reason = failure or ngettext(
            "%(count)s image was not accepted by the PACS.",
            "%(count)s images were not accepted by the PACS.", unsent) % {"count": unsent}
        self.end(status=Status.PARTIAL if job.sent else Status.FAILED, error=reason)

    def give_up(self, reason: str) -> None:
        """The end after an association failure on the last attempt."""
        self.finish(failure=reason)


class PushRun(StoreRun):
    """A run of a push: the archived files sent as they are."""

    model = PushJob
    result_model = PushResult
    job_field = "push"
    related = ("node", "facility", "study")

    def study_instances(self) -> QuerySet[Instance]:
        return Instance.objects.filter(facility=self.job.facility, series__study=self.job.study)

    def end(self, *, status: str, error: str = "") -> None:
        _finish(self.job, status=status, error=error)

    def internal_error(self) -> str:
        return _("An internal error stopped the transfer. Press Retry; if it happens "
                 "again, call support.")

    def give_up(self, reason: str) -> None:
        # Like a retrieve, a push whose attempts are used up is FAILED, whatever it sent.
        self.end(status=PushJob.Status.FAILED, error=reason)


def push_run(*, job_id: int) -> float | None:
    """The body of the push task: C-STORE every instance of the study that has no
    successful result yet, recording a result per instance (PS3.4 B.2.3). Returns the
    seconds after which to run again, or None."""
    return PushRun.run(job_id)
