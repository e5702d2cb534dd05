"""The recipient's side of a share: opening it with the security code and the patient's
date of birth, what the Share Inbox shows, the one Extend, and the end of access
(expiry, and the purge of archived studies nobody needs any more).

A wrong code and a wrong date of birth must be indistinguishable to the person typing:
``share_unlock`` does the same work for both (the code's keyed hash, the look-up, a
date comparison against a stand-in date when no share matched, the same counter
update, the same audit insert) and raises the same ``AccessDenied``. Only when both
match does it say that a share is revoked, expired or locked.

Every function takes ``now``; nothing here reads the clock."""

import calendar
import datetime
import hmac
import logging
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import transaction
from django.db.models import F, ProtectedError, Q, QuerySet
from django.utils.crypto import salted_hmac
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from dicomgw.models import (
    Instance,
    InstanceConflict,
    Patient,
    PushJob,
    RetrieveJob,
    Study,
    archive_storage,
)
from pockethealth.codes import code_hash
from pockethealth.models import AuditEvent, StaffUser
from pockethealth.services import audit_record

from . import throttle
from .models import Share, ShareStudy
from .services import SharingError, share_refresh, share_transfer_progress

log = logging.getLogger(__name__)

# Compared with the typed date when no share has the typed code, so that a wrong code
# costs the same as a wrong date of birth. Never a real person's date of birth.
_STAND_IN_BIRTH_DATE = datetime.date(1, 1, 1)


# --- Errors ----------------------------------------------------------------------------


class AccessDenied(SharingError):
    """The code and the date of birth do not open a share: one answer for a wrong code
    and a wrong date of birth alike."""


class AccessThrottled(SharingError):
    """Too many wrong guesses from this address, or on the whole site, just now."""

    def __init__(self, verdict: throttle.Verdict):
        super().__init__(verdict.reason)
        self.reason = verdict.reason
        self.retry_after = verdict.retry_after


class ShareUnavailable(SharingError):
    """The code and the date of birth match, but the share cannot be opened."""

    REVOKED = "revoked"
    EXPIRED = "expired"
    LOCKED = "locked"

    def __init__(self, share: Share, reason: str, *, support_can_extend: bool = False):
        super().__init__(reason)
        self.share = share
        self.reason = reason
        self.support_can_extend = support_can_extend


# --- Dates of birth as people type them -------------------------------------------------


class BirthDateError(ValueError):
    """The text is not a date we can read without guessing; the message says why."""


MONTH_NAMES = {
    # English and French, full and the usual abbreviations (accents optional).
    **{name: i for i, name in enumerate(
        ["january", "february", "march", "april", "may", "june", "july", "august",
         "september", "october", "november", "december"], start=1)},
    **{name: i for i, name in enumerate(
        ["janvier", "fevrier", "mars", "avril", "mai", "juin", "juillet", "aout",
         "septembre", "octobre", "novembre", "decembre"], start=1)},
    "sept": 9, "juil": 7, "janv": 1, "fevr": 2, "fev": 2, "avr": 4,
}
_ACCENTS = str.maketrans("éèêëàâäûüôöîïç", "eeeeaaauuooiic")
_TOKENS = re.compile(r"\d+|[^\W\d_]+")


def _month_from_word(word: str) -> int | None:
    word = word.lower().translate(_ACCENTS).rstrip(".")
    if word in MONTH_NAMES:
        return MONTH_NAMES[word]
    if len(word) >= 3:
        found = {n for name, n in MONTH_NAMES.items() if name.startswith(word)}
        if len(found) == 1:
            return found.pop()
    return None


def birth_date_parse(text: str, *, today: datetime.date) -> datetime.date:
    """A date of birth typed in any common form: year first (1981/08/29, 1981-08-29,
    1981.08.29, 19810829, the date picker's 1981-08-29), with the month's name
    (29 Aug 1981, August 29, 1981, 29 août 1981), or day and month around a four-digit
    year when only one reading exists (29/08/1981, 08/29/1981; 05/05/1981). 05/06/1981
    could be either, so it is refused with a request to write the year first."""
    text = (text or "").strip()
    if not text:
        raise BirthDateError(_("Enter the patient's date of birth."))
    tokens = _TOKENS.findall(text)
    words = [t for t in tokens if not t.isdigit()]
    numbers = [t for t in tokens if t.isdigit()]
    example = _("for example 1981/08/29")
    if not words and len(numbers) == 1 and len(numbers[0]) == 8:
        digits = numbers[0]
        numbers = [digits[:4], digits[4:6], digits[6:]]
    if words:
        months = [m for m in (_month_from_word(w) for w in words) if m]
        if len(words) != 1 or len(months) != 1 or len(numbers) != 2:
            raise BirthDateError(_("Write the date of birth as year, month, day: %(ex)s.")
                                 % {"ex": example})
        years = [n for n in numbers if len(n) == 4]
        if len(years) != 1:
            raise BirthDateError(_("Write the year with four digits: %(ex)s.") % {"ex": example})
        year = int(years[0])
        day = int(next(n for n in numbers if n is not years[0]))
        month = months[0]
    elif len(numbers) == 3 and len(numbers[0]) == 4:
        year, month, day = (int(n) for n in numbers)
    elif len(numbers) == 3 and len(numbers[2]) == 4:
        first, second, year = (int(n) for n in numbers)
        if first > 12 >= second:
            day, month = first, second
        elif second > 12 >= first:
            month, day = first, second
        elif first == second:
            day = month = first
        else:
            raise BirthDateError(
                _("%(text)s could be read two ways. Write the year first: "
                  "YYYY/MM/DD, %(ex)s.") % {"text": text, "ex": example})
    elif len(numbers) == 3:
        raise BirthDateError(_("Write the year with four digits: %(ex)s.") % {"ex": example})
    else:
        raise BirthDateError(_("Write the date of birth as year, month, day: %(ex)s.")
                             % {"ex": example})
    try:
        born = datetime.date(year, month, day)
    except ValueError:
        raise BirthDateError(_("There is no such date. Write it as year, month, day: "
                               "%(ex)s.") % {"ex": example}) from None
    if born > today:
        raise BirthDateError(_("That date is in the future."))
    if born.year < 1850:
        raise BirthDateError(_("Check the year of birth."))
    return born


# --- Opening a share -------------------------------------------------------------------


def _as_from(address: str | None):
    """What ``audit_record`` reads from a request, for events that carry the client's
    address but happen in a service (the address was already taken from the request,
    honouring TRUSTED_PROXIES, by the caller)."""
    return SimpleNamespace(META={"REMOTE_ADDR": address} if address else {},
                           user=AnonymousUser())


def share_unlock(*, code: str, birth_date: datetime.date, address: str | None,
                 now: datetime.datetime) -> Share:
    """The share that ``code`` and ``birth_date`` open, for a recipient at ``address``.

    Raises ``AccessThrottled`` before looking at anything when the address or the site
    has guessed too much; ``AccessDenied`` for a wrong code or a wrong date of birth,
    alike; ``ShareUnavailable`` when both match but the share is revoked, expired or
    locked. A wrong date of birth with a right code counts towards locking the share."""
    verdict = throttle.attempt_check(address=address, now=now)
    if not verdict.allowed:
        raise AccessThrottled(verdict)
    digest = code_hash(code)
    share = Share.objects.select_related("facility").filter(code_hash=digest).first()
    expected = share.patient_birth_date if share is not None else _STAND_IN_BIRTH_DATE
    birth_matches = hmac.compare_digest(expected.isoformat().encode(),
                                        birth_date.isoformat().encode())
    if share is None or not birth_matches:
        _failure(share=share, address=address, now=now)
        raise AccessDenied(_("The code and date of birth do not match."))

    reason = None
    if share.is_revoked:
        reason = ShareUnavailable.REVOKED
    elif share.is_expired(now):
        reason = ShareUnavailable.EXPIRED
    elif share.is_locked:
        reason = ShareUnavailable.LOCKED
    if reason:
        audit_record(action="share.access.refused", outcome=AuditEvent.Outcome.DENIED,
                     request=_as_from(address), facility=share.facility, obj=share,
                     patient_ref=share.patient_id, detail={"reason": reason})
        raise ShareUnavailable(share, reason,
                               support_can_extend=now < share_max_expiry(share))

    Share.objects.filter(pk=share.pk).update(failed_dob_attempts=0, last_accessed_at=now)
    audit_record(action="share.access", actor_type=AuditEvent.ActorType.SHARE_SESSION,
                 actor_ref=str(share.pk), request=_as_from(address), facility=share.facility,
                 obj=share, patient_ref=share.patient_id)
    share.refresh_from_db()
    return share


def _failure(*, share: Share | None, address: str | None, now: datetime.datetime) -> None:
    """Count and record a wrong pair. The same statements run whether or not a share
    had the code, and however many wrong dates it has had: with no share they match no
    row (id 0)."""
    counted = throttle.failure_record(address=address, now=now)
    share_id = share.pk if share is not None else 0
    mine = Share.objects.filter(pk=share_id)
    mine.update(failed_dob_attempts=F("failed_dob_attempts") + 1)
    attempts = mine.values_list("failed_dob_attempts", flat=True).first()
    locked = mine.filter(locked_at__isnull=True,
                         failed_dob_attempts__gte=settings.SHARE_DOB_ATTEMPTS).update(
        locked_at=now)
    audit_record(action="share.access.denied", outcome=AuditEvent.Outcome.FAILURE,
                 request=_as_from(address),
                 facility=share.facility if share is not None else None, obj=share,
                 patient_ref=share.patient_id if share is not None else None,
                 detail={"attempts": attempts} if share is not None else {})
    if locked:
        audit_record(action="share.lock", outcome=AuditEvent.Outcome.DENIED,
                     request=_as_from(address), facility=share.facility, obj=share,
                     patient_ref=share.patient_id, detail={"attempts": attempts})
    if counted.address_blocked:
        audit_record(action="view.address.block", outcome=AuditEvent.Outcome.DENIED,
                     request=_as_from(address),
                     detail={"failures": counted.address_failures,
                             "seconds": settings.VIEW_ADDRESS_BLOCK_SECONDS})
    if counted.breaker_opened:
        audit_record(action="view.breaker.open", outcome=AuditEvent.Outcome.DENIED,
                     actor_type=AuditEvent.ActorType.SYSTEM,
                     detail={"failures_this_minute": counted.global_failures,
                             "seconds": settings.VIEW_BREAKER_SECONDS})


def share_lock_clear(*, share: Share, by: StaffUser, now: datetime.datetime,
                     request=None) -> Share:
    """Unlock a share locked by wrong dates of birth (a clerk of its facility, or
    support, after checking with the recipient). Unlocking twice changes nothing."""
    attempts = share.failed_dob_attempts
    if Share.objects.filter(pk=share.pk, locked_at__isnull=False).update(
            locked_at=None, failed_dob_attempts=0, unlocked_at=now, unlocked_by=by):
        audit_record(action="share.unlock", user=by, request=request, facility=share.facility,
                     obj=share, patient_ref=share.patient_id, detail={"attempts": attempts})
    share.refresh_from_db()
    return share


def share_session_binding(share: Share) -> str:
    """Kept in a recipient's session: changes (ending the session) when the share's code
    is replaced by a new Access Page."""
    return salted_hmac("sharing.recipient.session", f"{share.pk}:{share.code_hash}").hexdigest()


def session_ended(*, started: float, seen: float, now: datetime.datetime) -> str | None:
    """Why a recipient's session is over at ``now``: "absolute" (entered too long ago),
    "idle" (no request for too long), or None while it lasts."""
    ts = now.timestamp()
    if ts - started >= settings.RECIPIENT_SESSION_MAX_SECONDS:
        return "absolute"
    if ts - seen >= settings.RECIPIENT_SESSION_IDLE_SECONDS:
        return "idle"
    return None


# --- How long access lasts --------------------------------------------------------------


def facility_zone(share: Share) -> datetime.tzinfo:
    try:
        return zoneinfo.ZoneInfo(share.facility.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return datetime.UTC


def months_after(moment: datetime.datetime, months: int, zone: datetime.tzinfo
                 ) -> datetime.datetime:
    """The same wall-clock time ``months`` calendar months later in ``zone`` (the 31st
    becomes the month's last day), whatever daylight saving did in between."""
    local = moment.astimezone(zone)
    index = local.month - 1 + months
    year, month = local.year + index // 12, index % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    wall = local.replace(tzinfo=None, year=year, month=month, day=day)
    return wall.replace(tzinfo=zone).astimezone(datetime.UTC)


def share_max_expiry(share: Share) -> datetime.datetime:
    """The hard end of a share: SHARE_MAX_MONTHS after it was made, in the facility's
    calendar. Nobody extends past it; after it the sender makes a new share."""
    return months_after(share.created_at, settings.SHARE_MAX_MONTHS, facility_zone(share))


def extend_window_end(share: Share) -> datetime.datetime:
    """Until when the recipient may press Extend: the share's first SHARE_ACCESS_DAYS."""
    return share.created_at + datetime.timedelta(days=settings.SHARE_ACCESS_DAYS)


def extend_offered(share: Share, now: datetime.datetime) -> bool:
    return (not share.extended and share.is_open(now) and now < extend_window_end(share)
            and share.expires_at < share_max_expiry(share))


def share_extend(*, share: Share, address: str | None, now: datetime.datetime) -> Share:
    """The recipient's one Extend, within the first days: access lasts until the share's
    hard end (SHARE_MAX_MONTHS after it was made)."""
    if not extend_offered(share, now):
        raise SharingError(_("This share can no longer be extended here."))
    until = share_max_expiry(share)
    changed = Share.objects.filter(
        pk=share.pk, extended=False, revoked_at__isnull=True, expires_at__gt=now,
        expires_at__lt=until,
    ).update(expires_at=until, extended=True, extended_at=now)
    if not changed:
        raise SharingError(_("This share can no longer be extended here."))
    audit_record(action="share.extend", actor_type=AuditEvent.ActorType.SHARE_SESSION,
                 actor_ref=str(share.pk), request=_as_from(address), facility=share.facility,
                 obj=share, patient_ref=share.patient_id,
                 detail={"until": until.isoformat()})
    share.refresh_from_db()
    return share


def share_support_extend(*, share: Share, by: StaffUser, now: datetime.datetime,
                         until: datetime.datetime | None = None, request=None) -> Share:
    """Support extends access, at any time before the hard end, to ``until`` (by default
    the hard end itself). Never past SHARE_MAX_MONTHS after the share was made."""
    cap = share_max_expiry(share)
    until = until or cap
    if share.is_revoked:
        raise SharingError(_("This share was revoked; the sender must make a new share."))
    if now >= cap:
        raise SharingError(_("This share is more than %(months)s months old; the sender "
                             "must make a new share.") % {"months": settings.SHARE_MAX_MONTHS})
    if until > cap:
        local_cap = cap.astimezone(facility_zone(share)).strftime("%Y-%m-%d %H:%M")
        raise SharingError(_("Access cannot go past %(cap)s, %(months)s months after the "
                             "share was made.")
                           % {"cap": local_cap, "months": settings.SHARE_MAX_MONTHS})
    if until <= now:
        raise SharingError(_("Choose a moment in the future."))
    Share.objects.filter(pk=share.pk, revoked_at__isnull=True).update(
        expires_at=until, extended=True, extended_at=now, expired_at=None)
    audit_record(action="share.extend.support", user=by, request=request,
                 facility=share.facility, obj=share, patient_ref=share.patient_id,
                 detail={"until": until.isoformat(), "was": share.expires_at.isoformat()})
    share.refresh_from_db()
    return share


# --- The Share Inbox -------------------------------------------------------------------


@dataclass(frozen=True)
class InboxExam:
    share_study: ShareStudy
    study: Study | None
    state: str  # "complete", "transferring", "partial", "failed"
    images: int
    expected: int | None

    @property
    def series(self) -> int | None:
        return self.study.num_series if self.study is not None else None

    @property
    def available(self) -> bool:
        """Something of the exam is in the archive to view and download."""
        return self.study is not None and self.study.num_instances > 0

    @property
    def percent(self) -> int:
        if self.state == "complete":
            return 100
        if not self.expected:
            return 0
        return max(0, min(99, round(100 * self.images / self.expected)))


@dataclass(frozen=True)
class Inbox:
    share: Share
    exams: list[InboxExam] = field(default_factory=list)
    transferring: bool = False
    percent: int = 100
    extend_offered: bool = False
    max_expiry: datetime.datetime | None = None

    @property
    def available_count(self) -> int:
        return sum(exam.available for exam in self.exams)


def share_inbox(*, share: Share, now: datetime.datetime) -> Inbox:
    """What the Share Inbox shows: the exams newest first (undated last), how far their
    transfer is, and whether Extend is on offer."""
    if share.is_transferring:
        share = share_refresh(share=share, now=now)
    progress = share_transfer_progress(share)
    exams = []
    for row in progress.studies:
        item = row.share_study
        study = item.study  # loaded with the row
        if study is None and row.job is not None and row.job.study_id:
            study = row.job.study  # arrived, not linked yet
        images = row.done if row.job is not None else (study.num_instances if study else 0)
        exams.append(InboxExam(share_study=item, study=study, state=row.state,
                               images=images, expected=row.expected))
    exams.sort(key=lambda e: (e.share_study.study_date is None,
                              -(e.share_study.study_date or datetime.date.min).toordinal(),
                              e.share_study.pk))
    return Inbox(share=share, exams=exams, transferring=share.is_transferring,
                 percent=progress.percent, extend_offered=extend_offered(share, now),
                 max_expiry=share_max_expiry(share))


def share_exam_get(*, share: Share, share_study_id: int) -> ShareStudy | None:
    """One exam of ``share`` by its id, or None: ids of other shares' exams find
    nothing."""
    return share.share_studies.select_related("study").filter(pk=share_study_id).first()


def share_download_studies(*, share: Share, share_study_ids: list[int]) -> list[Study]:
    """The archived studies behind the ticked exams, newest first. Raises SharingError
    when an id is not an exam of this share, or none of them has arrived."""
    ids = set(share_study_ids)
    items = list(share.share_studies.select_related("study").filter(pk__in=ids))
    if not ids or len(items) != len(ids):
        raise SharingError(_("Tick the exams to download."))
    studies = [i.study for i in items if i.study is not None and i.study.num_instances > 0]
    if not studies:
        raise SharingError(_("The ticked exams have not arrived yet."))
    studies.sort(key=lambda s: (s.study_date is None, -(s.study_date or datetime.date.min)
                                .toordinal(), s.pk))
    return studies


def share_activity_record(*, share: Share, action: str, address: str | None,
                          detail: dict | None = None, obj=None) -> None:
    """Audit something a recipient's session did (viewed the inbox or an exam,
    downloaded, signed out)."""
    audit_record(action=action, actor_type=AuditEvent.ActorType.SHARE_SESSION,
                 actor_ref=str(share.pk), request=_as_from(address), facility=share.facility,
                 obj=obj or share, patient_ref=share.patient_id, detail=detail or {})


# --- Expiry and purge ------------------------------------------------------------------


def shares_expire(*, now: datetime.datetime) -> int:
    """Mark (and audit) the shares whose access has ended by ``now``. Access itself is
    decided by ``expires_at`` at every request; this records the end once and lets the
    purge count from it. Returns how many were marked."""
    marked = 0
    due = Share.objects.filter(expires_at__lte=now, expired_at__isnull=True,
                               revoked_at__isnull=True).select_related("facility")
    for share in due.iterator():
        if Share.objects.filter(pk=share.pk, expired_at__isnull=True,
                                expires_at__lte=now).update(expired_at=now):
            audit_record(action="share.expire", actor_type=AuditEvent.ActorType.SYSTEM,
                         facility=share.facility, obj=share, patient_ref=share.patient_id,
                         detail={"expires_at": share.expires_at.isoformat()})
            marked += 1
    return marked


def studies_held_by_shares(*, now: datetime.datetime, cutoff: datetime.datetime) -> QuerySet:
    """Studies of shares still open, or ended (expired or revoked) after ``cutoff``;
    also those a share's retrieve brought in before the share's row was linked."""
    recent = (Q(share__revoked_at__isnull=True, share__expires_at__gt=cutoff)
              | Q(share__revoked_at__gt=cutoff))
    linked = ShareStudy.objects.filter(recent, study__isnull=False).values("study_id")
    return Study.objects.filter(
        Q(pk__in=linked) | Q(pk__in=ShareStudy.objects.filter(
            recent, retrieve__study__isnull=False).values("retrieve__study_id")),
    ).values("pk")


def studies_held_by_transfers(*, now: datetime.datetime, cutoff: datetime.datetime
                              ) -> QuerySet:
    """Studies still arriving from a PACS, or being sent to one."""
    live = ["queued", "running"]
    return Study.objects.filter(
        Q(pk__in=RetrieveJob.objects.filter(status__in=live, study__isnull=False)
          .values("study_id"))
        | Q(pk__in=PushJob.objects.filter(status__in=live).values("study_id")),
    ).values("pk")


def archive_holders() -> list[Callable[..., QuerySet]]:
    return [import_string(path) for path in settings.ARCHIVE_HOLDERS]


def _unheld(studies: QuerySet, *, now, cutoff) -> QuerySet:
    for holder in archive_holders():
        studies = studies.exclude(pk__in=holder(now=now, cutoff=cutoff))
    return studies


@dataclass
class PurgeReport:
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    patients: int = 0
    kept_protected: int = 0


def archive_purge(*, now: datetime.datetime, retention_days: int | None = None,
                  limit: int | None = None) -> PurgeReport:
    """Delete archived studies that nothing holds (see ARCHIVE_HOLDERS) and that have
    not changed for ``retention_days``: their rows, their files (through the archive
    storage, once the rows are gone for good), and patients left with nothing. Each
    study is locked and checked again before it goes, so a share made meanwhile keeps
    it. At most ``limit`` studies per call."""
    days = settings.ARCHIVE_RETENTION_DAYS if retention_days is None else retention_days
    cutoff = now - datetime.timedelta(days=days)
    limit = limit or settings.ARCHIVE_PURGE_BATCH
    report = PurgeReport()
    candidates = _unheld(Study.objects.filter(updated_at__lte=cutoff, created_at__lte=cutoff),
                         now=now, cutoff=cutoff)
    for study_id in list(candidates.order_by("pk").values_list("pk", flat=True)[:limit]):
        _purge_study(study_id, now=now, cutoff=cutoff, days=days, report=report)
    return report


def _purge_study(study_id: int, *, now, cutoff, days: int, report: PurgeReport) -> None:
    with transaction.atomic():
        study = (Study.objects.select_for_update(skip_locked=True)
                 .filter(pk=study_id, updated_at__lte=cutoff).first())
        if study is None:
            return
        if not _unheld(Study.objects.filter(pk=study_id), now=now, cutoff=cutoff).exists():
            return
        instances = Instance.objects.filter(series__study=study)
        names = list(instances.values_list("file", flat=True))
        names += list(InstanceConflict.objects.filter(existing__series__study=study)
                      .values_list("file", flat=True))
        count = len(names)
        size = sum(instances.values_list("size", flat=True))
        patient_id, facility_id = study.patient_id, study.facility_id
        try:
            with transaction.atomic():
                # The exams of shares that ended long ago keep what they showed; only
                # the link to the archive's copy goes.
                ShareStudy.objects.filter(study=study).update(study=None)
                study.delete()
        except ProtectedError:
            log.info("purge: study %s is still referenced; kept", study_id)
            report.kept_protected += 1
            return
        audit_record(action="archive.purge", actor_type=AuditEvent.ActorType.SYSTEM,
                     facility=study.facility, object_type="dicomgw.study",
                     object_id=str(study_id), patient_ref=patient_id,
                     detail={"instances": count, "bytes": size, "retention_days": days})
        storage = archive_storage()
        transaction.on_commit(lambda names=names: _delete_files(storage, names))
        report.studies += 1
        report.instances += count
        report.bytes += size
        if not Study.objects.filter(patient_id=patient_id).exists() and \
                not Share.objects.filter(patient_id=patient_id).exists():
            try:
                with transaction.atomic():
                    Patient.objects.filter(pk=patient_id, facility_id=facility_id).delete()
                report.patients += 1
            except ProtectedError:
                pass


def _delete_files(storage, names: list[str]) -> None:
    for name in names:
        if not name:
            continue
        try:
            storage.delete(name)
        except OSError:
            log.warning("purge: could not delete a stored file", exc_info=True)
