"""Provider sharing services: make a share, follow its transfer, send its Access Page,
revoke it. Every write goes through here; views and tasks call these functions.

The security code exists in plain text only inside ``share_create`` and
``share_page_reissue``: the Access Page is rendered there, while the code is known, and
kept as a file; the database holds the keyed hash and the last three symbols. This is
also why rendering is not a Celery task: a task's arguments pass through the broker."""

import datetime
import logging
import re
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.mail import EmailMessage, get_connection
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext as _

from dicomgw.models import PacsNode, Patient, RetrieveJob, Study
from dicomgw.retrieve import StudyHit, retrieve_retry, retrieve_start
from dicomgw.services import name_search_key
from pockethealth.codes import code_generate, code_hash, code_suffix
from pockethealth.models import AuditEvent, Facility, StaffUser
from pockethealth.services import audit_record

from .models import Delivery, Share, ShareStudy, SharingSettings

log = logging.getLogger(__name__)

# Fresh codes tried before giving up. With 32⁹ ≈ 3.5·10¹³ codes, a second try is already
# a once-in-a-lifetime event; more than a few means something is wrong with the generator.
CODE_ATTEMPTS = 5
FAX_DIGITS = re.compile(r"^\d{7,15}$")
# A "sending" delivery whose row has not moved for this long lost its worker.
DELIVERY_STALE = datetime.timedelta(minutes=10)


class SharingError(Exception):
    """A share cannot be made or changed as asked; the message is for the clerk."""


@dataclass(frozen=True)
class PatientIdentity:
    """A patient as a PACS describes them, before any of their images is archived."""

    name: str  # DICOM PN form
    patient_id: str = ""
    birth_date: datetime.date | None = None


@dataclass(frozen=True)
class PacsStudy:
    """A study picked from a PACS search, with what the PACS said of it."""

    node: PacsNode
    study_instance_uid: str
    description: str = ""
    study_date: datetime.date | None = None
    modalities: tuple[str, ...] = ()
    num_instances: int | None = None


@dataclass(frozen=True)
class Recipient:
    method: str  # Share.Method
    attn: str = ""
    institution: str = ""
    fax_number: str = ""
    subject: str = ""
    note: str = ""


@dataclass(frozen=True)
class ShareCreated:
    share: Share
    code: str  # the only place the plain code exists after the request


def fax_digits(text: str) -> str:
    """The digits a fax gateway dials: "+1 (416) 555-0101" becomes "14165550101"."""
    return re.sub(r"[\s().+\-/]", "", text or "")


def fax_gateway_domain(facility: Facility) -> str:
    conf = SharingSettings.objects.filter(facility=facility).first()
    return conf.gateway_domain if conf else settings.FAX_GATEWAY_DOMAIN


def fax_sender_email(facility: Facility) -> str:
    conf = SharingSettings.objects.filter(facility=facility).first()
    return conf.sender_email if conf else settings.FAX_SENDER_EMAIL


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or timezone.now()


# --- Create ------------------------------------------------------------------------------


def share_create(
    *,
    facility: Facility,
    patient_or_identity: Patient | PatientIdentity,
    studies: Sequence[Study] = (),
    pacs_studies: Sequence[PacsStudy] = (),
    recipient: Recipient,
    created_by: StaffUser,
    now: datetime.datetime | None = None,
    request: HttpRequest | None = None,
) -> ShareCreated:
    """Share ``studies`` (archived) and ``pacs_studies`` (picked on a PACS) of one
    patient with ``recipient``. Retrieves whatever the archive does not fully hold yet,
    draws the security code, renders the Access Page and, for a fax, queues its
    sending. Raises ``SharingError`` with a sentence for the clerk. ``request``, when
    given, puts the client's address on the audit events."""
    now = _now(now)
    _check_recipient(facility, recipient)
    name, mrn, birth_date, patient = _identity(facility, patient_or_identity)
    archived = _check_archived(facility, patient, studies)
    picked = _check_picked(facility, pacs_studies, skip={s.study_instance_uid for s in archived})
    if not archived and not picked:
        raise SharingError(_("Tick at least one exam to share."))
    if birth_date is None:
        raise SharingError(_("This patient has no date of birth on record. The recipient "
                             "needs it to open the share, so it cannot be shared."))
    stored_file = None
    try:
        with transaction.atomic():
            share, code = _share_with_fresh_code(
                facility=facility, patient=patient, name=name, mrn=mrn,
                birth_date=birth_date, recipient=recipient, created_by=created_by, now=now,
            )
            for study in archived:
                ShareStudy.objects.create(
                    share=share, study=study, study_instance_uid=study.study_instance_uid,
                    study_date=study.study_date, description=study.description,
                    modalities=study.modalities, expected_images=study.num_instances,
                    retrieve=_live_retrieve(facility, study.study_instance_uid),
                )
            for pick in picked:
                _add_pacs_study(share, pick, created_by)
            stored_file = _store_page(share, code, now=now)
            _refresh(share, now=now, audit=False)
            audit_record(action="share.create", user=created_by, facility=facility,
                         request=request,
                         obj=share, patient_ref=share.patient_id,
                         detail={"studies": share.share_studies.count(),
                                 "retrieves": share.share_studies.filter(
                                     retrieve__isnull=False).count(),
                                 "method": share.method})
            if share.is_faxed:
                _delivery_queue(share=share, fax_number=share.recipient_fax,
                                requested_by=created_by, request=request)
            if share.is_transferring:
                _follow_transfer(share.pk)
    except BaseException:
        if stored_file:
            share.access_page.storage.delete(stored_file)
        raise
    share.refresh_from_db()
    return ShareCreated(share=share, code=code)


def _check_recipient(facility: Facility, recipient: Recipient) -> None:
    if recipient.method not in Share.Method.values:
        raise SharingError(_("Choose how the Access Page reaches the recipient."))
    if recipient.method == Share.Method.FAX:
        if not FAX_DIGITS.match(fax_digits(recipient.fax_number)):
            raise SharingError(_("Enter the recipient's fax number (7 to 15 digits)."))
        if not fax_gateway_domain(facility):
            raise SharingError(_("Faxing is not set up for your facility. Print the Access "
                                 "Page instead, or ask your administrator to set the fax "
                                 "gateway."))


def _identity(facility: Facility, who: Patient | PatientIdentity):
    if isinstance(who, Patient):
        if who.facility_id != facility.pk:
            raise SharingError(_("That patient is not in your facility's archive."))
        return who.name, who.patient_id, who.birth_date, who
    return who.name, who.patient_id, who.birth_date, None


def _check_archived(facility: Facility, patient: Patient | None,
                    studies: Sequence[Study]) -> list[Study]:
    result, seen = [], set()
    for study in studies:
        if study.facility_id != facility.pk:
            raise SharingError(_("That exam is not in your facility's archive."))
        if patient is not None and study.patient_id != patient.pk:
            raise SharingError(_("All the exams of a share must be of one patient."))
        if study.study_instance_uid not in seen:
            seen.add(study.study_instance_uid)
            result.append(study)
    return result


def _check_picked(facility: Facility, picks: Sequence[PacsStudy],
                  skip: set[str]) -> list[PacsStudy]:
    result, seen = [], set(skip)
    for pick in picks:
        if pick.node.facility_id != facility.pk:
            raise SharingError(_("That PACS is not one of your facility's."))
        if not pick.study_instance_uid or pick.study_instance_uid in seen:
            continue
        seen.add(pick.study_instance_uid)
        result.append(pick)
    return result


def _share_with_fresh_code(*, facility, patient, name, mrn, birth_date, recipient,
                           created_by, now) -> tuple[Share, str]:
    """A new share row under a code no other share has. Codes are unique among all
    shares, revoked and expired ones included, so an old page can never open another
    patient's share."""
    for _attempt in range(CODE_ATTEMPTS):
        code = code_generate()
        digest = code_hash(code)
        if Share.objects.filter(code_hash=digest).exists():
            log.warning("security code collision; drawing another")
            continue
        try:
            with transaction.atomic():
                share = Share.objects.create(
                    facility=facility, patient=patient, patient_name=name,
                    patient_name_search=name_search_key(name), patient_mrn=mrn,
                    patient_birth_date=birth_date, method=recipient.method,
                    recipient_attn=recipient.attn.strip(),
                    recipient_institution=recipient.institution.strip(),
                    recipient_fax=(fax_digits(recipient.fax_number)
                                   if recipient.method == Share.Method.FAX else ""),
                    subject=recipient.subject.strip(), note=recipient.note.strip(),
                    code_hash=digest, code_last3=code_suffix(code), created_by=created_by,
                    created_at=now, expires_at=now + datetime.timedelta(
                        days=settings.SHARE_ACCESS_DAYS),
                )
        except IntegrityError:
            # Another share took the same code between the check and the insert.
            log.warning("security code collision on insert; drawing another")
            continue
        return share, code
    raise SharingError(_("No free security code could be drawn. Try again; if it happens "
                         "again, call support."))


def _live_retrieve(facility: Facility, study_uid: str) -> RetrieveJob | None:
    return RetrieveJob.objects.filter(
        facility=facility, study_instance_uid=study_uid,
        status__in=[RetrieveJob.Status.QUEUED, RetrieveJob.Status.RUNNING],
    ).order_by("-pk").first()


def _add_pacs_study(share: Share, pick: PacsStudy, created_by: StaffUser) -> None:
    """Link a study picked on the PACS: the archive's copy when it is whole and nothing
    is still arriving, else a retrieve (an already running one is joined)."""
    facility = share.facility
    study = Study.objects.filter(facility=facility,
                                 study_instance_uid=pick.study_instance_uid).first()
    live = _live_retrieve(facility, pick.study_instance_uid)
    whole = (study is not None and study.num_instances > 0 and live is None
             and (pick.num_instances is None or study.num_instances >= pick.num_instances))
    job = None
    if not whole:
        job = retrieve_start(node=pick.node, study_instance_uid=pick.study_instance_uid,
                             requested_by=created_by, hit=_hit(share, pick))
    ShareStudy.objects.create(
        share=share, study=study if whole else None,
        study_instance_uid=pick.study_instance_uid, study_date=pick.study_date,
        description=pick.description[:200], modalities="\\".join(pick.modalities)[:200],
        node=pick.node, retrieve=job, expected_images=pick.num_instances,
    )


def _hit(share: Share, pick: PacsStudy) -> StudyHit:
    """The PACS's description of the study, which labels the retrieve until it lands."""
    return StudyHit(
        study_instance_uid=pick.study_instance_uid, study_date=pick.study_date,
        study_time="", patient_name=share.patient_name, patient_id=share.patient_mrn,
        birth_date=share.patient_birth_date, sex="", accession_number="",
        description=pick.description, modalities=tuple(pick.modalities), num_series=None,
        num_instances=pick.num_instances,
    )


def _store_page(share: Share, code: str, *, now: datetime.datetime) -> str:
    """Render the Access Page with ``code`` and keep it; returns the storage name.
    WeasyPrint is imported here, where a page is rendered, not by every web process."""
    from .pdf import access_page_for, access_page_pdf

    pdf = access_page_pdf(access_page_for(share, code))
    share.access_page.save("access-page.pdf", ContentFile(pdf), save=False)
    share.page_issued_at = now
    share.save(update_fields=["access_page", "page_issued_at"])
    return share.access_page.name


# --- Transfer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyProgress:
    share_study: ShareStudy
    state: str  # "complete", "transferring", "partial", "failed"
    done: int
    expected: int | None
    missing: int
    error: str
    job: RetrieveJob | None


@dataclass(frozen=True)
class TransferProgress:
    studies: list[StudyProgress]

    @property
    def done(self) -> int:
        return sum(s.done for s in self.studies)

    @property
    def expected(self) -> int | None:
        if any(s.expected is None for s in self.studies):
            return None
        return sum(s.expected for s in self.studies)

    @property
    def percent(self) -> int:
        if all(s.state == "complete" for s in self.studies):
            return 100
        if not self.expected:
            return 0
        return max(0, min(99, round(100 * self.done / self.expected)))

    @property
    def retryable(self) -> bool:
        return any(s.state in {"partial", "failed"} and s.job is not None for s in self.studies)


JOB_STATE = {
    RetrieveJob.Status.QUEUED: "transferring",
    RetrieveJob.Status.RUNNING: "transferring",
    RetrieveJob.Status.COMPLETE: "complete",
    RetrieveJob.Status.PARTIAL: "partial",
    RetrieveJob.Status.FAILED: "failed",
}


def share_transfer_progress(share: Share) -> TransferProgress:
    """Where each study of the share stands, from the archive and the retrieves."""
    rows = []
    for item in share.share_studies.select_related("retrieve", "study").order_by(
            "-study_date", "id"):
        job = _current_job(share, item)
        if job is None:
            count = item.study.num_instances if item.study else 0
            rows.append(StudyProgress(item, "complete" if item.study else "failed", count,
                                      count, 0, "" if item.study else _("Not in the archive."),
                                      None))
            continue
        expected = job.expected if job.expected is not None else item.expected_images
        rows.append(StudyProgress(
            item, JOB_STATE.get(job.status, "transferring"), job.archived, expected,
            len(job.missing or []), job.error, job,
        ))
    return TransferProgress(rows)


def _current_job(share: Share, item: ShareStudy) -> RetrieveJob | None:
    """The retrieve that decides the study's state: the share's own, or a newer one of
    the same study (a retry from the PACS pages, or another share's)."""
    if item.retrieve_id is None:
        return None
    newer = RetrieveJob.objects.filter(
        facility=share.facility_id, study_instance_uid=item.study_instance_uid,
        pk__gt=item.retrieve_id,
    ).order_by("-pk").first()
    if newer is not None:
        ShareStudy.objects.filter(pk=item.pk).update(retrieve=newer)
        item.retrieve = newer
    return item.retrieve


def _status_from(progress: TransferProgress) -> str:
    states = [s.state for s in progress.studies]
    if "transferring" in states:
        return Share.Status.TRANSFERRING
    if all(state == "complete" for state in states):
        return Share.Status.READY
    if any(state in {"complete", "partial"} for state in states):
        return Share.Status.PARTIAL
    return Share.Status.FAILED


def share_refresh(*, share: Share, now: datetime.datetime | None = None) -> Share:
    """Bring the share's status up to date with its retrieves, link the archive's rows
    as they arrive, and audit the transfer's outcome once."""
    return _refresh(share, now=_now(now), audit=True)


def _refresh(share: Share, *, now: datetime.datetime, audit: bool) -> Share:
    progress = share_transfer_progress(share)
    for row in progress.studies:
        job = row.job
        if job is not None and job.study_id and row.share_study.study_id != job.study_id:
            ShareStudy.objects.filter(pk=row.share_study.pk).update(study=job.study_id)
    if share.patient_id is None:
        patient_id = Study.objects.filter(
            pk__in=share.share_studies.filter(study__isnull=False).values("study"),
        ).values_list("patient_id", flat=True).first()
        if patient_id:
            Share.objects.filter(pk=share.pk, patient__isnull=True).update(patient=patient_id)
    if share.status == Share.Status.REVOKED:
        share.refresh_from_db()
        return share
    status = _status_from(progress)
    finished = status != Share.Status.TRANSFERRING
    changed = Share.objects.filter(pk=share.pk).exclude(
        status__in=[status, Share.Status.REVOKED]).update(
        status=status, transfer_finished_at=now if finished else None)
    share.refresh_from_db()
    if changed and finished and audit:
        audit_record(
            action="share.transfer.finish", actor_type=AuditEvent.ActorType.SYSTEM,
            facility=share.facility, obj=share, patient_ref=share.patient_id,
            outcome=(AuditEvent.Outcome.SUCCESS if status == Share.Status.READY
                     else AuditEvent.Outcome.FAILURE),
            detail={"status": status, "studies": len(progress.studies),
                    "complete": sum(s.state == "complete" for s in progress.studies),
                    "missing_images": sum(s.missing for s in progress.studies)},
        )
    return share


def share_transfer_retry(*, share: Share, requested_by: StaffUser,
                         request: HttpRequest | None = None) -> Share:
    """Retrieve again what did not arrive (partial and failed studies)."""
    if share.is_revoked:
        raise SharingError(_("This share was revoked."))
    progress = share_transfer_progress(share)
    retried = 0
    with transaction.atomic():
        for row in progress.studies:
            if row.state not in {"partial", "failed"} or row.job is None:
                continue
            job = retrieve_retry(job=row.job, requested_by=requested_by)
            ShareStudy.objects.filter(pk=row.share_study.pk).update(retrieve=job)
            retried += 1
        if not retried:
            raise SharingError(_("Nothing to retry: every exam has arrived or is arriving."))
        Share.objects.filter(pk=share.pk).exclude(status=Share.Status.REVOKED).update(
            status=Share.Status.TRANSFERRING, transfer_finished_at=None)
        audit_record(action="share.transfer.retry", user=requested_by, request=request,
                     facility=share.facility, obj=share, patient_ref=share.patient_id,
                     detail={"studies": retried})
        _follow_transfer(share.pk)
    share.refresh_from_db()
    return share


def _follow_transfer(share_id: int) -> None:
    from .tasks import follow_transfer

    follow_transfer.delay_on_commit(share_id)


# --- Access Page -------------------------------------------------------------------------


def share_page_reissue(*, share: Share, by: StaffUser, now: datetime.datetime | None = None,
                       request: HttpRequest | None = None) -> str:
    """A new security code and a new Access Page for a share whose page was lost; the
    old code stops working at once. Returns the new code."""
    now = _now(now)
    if share.is_revoked:
        raise SharingError(_("This share was revoked; make a new share instead."))
    old_name = share.access_page.name
    new_name = None
    try:
        with transaction.atomic():
            locked = Share.objects.select_for_update().get(pk=share.pk)
            for _attempt in range(CODE_ATTEMPTS):
                code = code_generate()
                digest = code_hash(code)
                if not Share.objects.filter(code_hash=digest).exists():
                    break
            else:
                raise SharingError(_("No free security code could be drawn. Try again."))
            locked.code_hash, locked.code_last3 = digest, code_suffix(code)
            locked.save(update_fields=["code_hash", "code_last3"])
            new_name = _store_page(locked, code, now=now)
            audit_record(action="share.page.reissue", user=by, request=request,
                         facility=share.facility,
                         obj=share, patient_ref=share.patient_id)
    except BaseException:
        if new_name:
            share.access_page.storage.delete(new_name)
        raise
    if old_name:
        share.access_page.storage.delete(old_name)
    share.refresh_from_db()
    return code


def share_revoke(*, share: Share, by: StaffUser, now: datetime.datetime | None = None,
                 request: HttpRequest | None = None) -> Share:
    """End access at once. The stored Access Page is deleted (its code is dead) and
    faxes not yet sent are cancelled. Revoking twice changes nothing."""
    now = _now(now)
    with transaction.atomic():
        revoked = Share.objects.filter(pk=share.pk, revoked_at__isnull=True).update(
            revoked_at=now, revoked_by=by, status=Share.Status.REVOKED)
        if not revoked:
            share.refresh_from_db()
            return share
        cancelled = Delivery.objects.filter(share=share, status=Delivery.Status.QUEUED).update(
            status=Delivery.Status.FAILED, updated_at=now,
            error=_("Not sent: the share was revoked first."))
        audit_record(action="share.revoke", user=by, request=request,
                     facility=share.facility, obj=share,
                     patient_ref=share.patient_id, detail={"faxes_cancelled": cancelled})
        page_name = share.access_page.name
        Share.objects.filter(pk=share.pk).update(access_page="")
        if page_name:
            storage = share.access_page.storage
            transaction.on_commit(lambda: storage.delete(page_name))
    share.refresh_from_db()
    return share


# --- Fax ---------------------------------------------------------------------------------


def delivery_resend(*, delivery: Delivery, requested_by: StaffUser,
                    request: HttpRequest | None = None) -> Delivery:
    """Send the share's current Access Page again to the same fax number."""
    share = delivery.share
    if share.is_revoked:
        raise SharingError(_("This share was revoked; its Access Page can no longer be sent."))
    if not share.access_page:
        raise SharingError(_("This share has no Access Page to send."))
    with transaction.atomic():
        return _delivery_queue(share=share, fax_number=delivery.fax_number,
                               requested_by=requested_by, resend_of=delivery,
                               request=request)


def _delivery_queue(*, share: Share, fax_number: str, requested_by: StaffUser,
                    resend_of: Delivery | None = None,
                    request: HttpRequest | None = None) -> Delivery:
    domain = fax_gateway_domain(share.facility)
    if not domain:
        raise SharingError(_("Faxing is not set up for your facility."))
    digits = fax_digits(fax_number)
    delivery = Delivery.objects.create(
        share=share, fax_number=digits, address=f"{digits}@{domain}",
        requested_by=requested_by, resend_of=resend_of,
    )
    audit_record(action="share.fax.resend" if resend_of else "share.fax.queue",
                 user=requested_by, request=request, facility=share.facility, obj=share,
                 patient_ref=share.patient_id,
                 detail={"delivery": delivery.pk, **({"resend_of": resend_of.pk}
                                                     if resend_of else {})})
    from .tasks import send_fax

    send_fax.delay_on_commit(delivery.pk)
    return delivery


def _fax_retry_delay(attempt: int) -> float:
    return min(settings.FAX_RETRY_BACKOFF_SECONDS * 2 ** max(attempt - 1, 0), 3600)


def _permanent(exc: Exception) -> bool:
    """A refusal that another try will not change: the gateway said no (5xx)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _msg in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500
    return False


def delivery_send(*, delivery_id: int, now: datetime.datetime | None = None) -> float | None:
    """The body of the fax task: e-mail the Access Page to the gateway address. Claims
    the row first, so a duplicated task sends nothing twice. Returns the seconds after
    which to try again, or None when the delivery is finished."""
    now = _now(now)
    claimable = Q(status=Delivery.Status.QUEUED) | Q(status=Delivery.Status.SENDING,
                                                     updated_at__lt=now - DELIVERY_STALE)
    if not Delivery.objects.filter(claimable, pk=delivery_id).update(
            status=Delivery.Status.SENDING, attempts=F("attempts") + 1, updated_at=now):
        return None
    delivery = Delivery.objects.select_related("share__facility").get(pk=delivery_id)
    share = delivery.share
    if share.is_revoked or not share.access_page:
        _delivery_finish(delivery, sent=False, error=(
            _("Not sent: the share was revoked.") if share.is_revoked
            else _("Not sent: the share has no Access Page.")))
        return None
    try:
        with share.access_page.open("rb") as fh:
            pdf = fh.read()
        fax_pdf_send(facility=share.facility, address=delivery.address, pdf=pdf,
                     filename="access-page.pdf",
                     body=_("Access Page for shared medical imaging: one page, attached."))
    except (smtplib.SMTPException, OSError) as exc:
        error, retry_in = fax_failure(exc, attempts=delivery.attempts)
        if retry_in is not None:
            Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING).update(
                status=Delivery.Status.QUEUED, error=error, updated_at=timezone.now())
            log.info("Delivery %s: attempt %s failed, retrying", delivery.pk, delivery.attempts)
            return retry_in
        _delivery_finish(delivery, sent=False, error=error)
        return None
    _delivery_finish(delivery, sent=True)
    return None


def fax_pdf_send(*, facility: Facility, address: str, pdf: bytes, filename: str,
                 body: str) -> None:
    """E-mail a one-page PDF to a fax gateway address (``<digits>@<gateway domain>``).
    Raises ``smtplib.SMTPException`` or ``OSError``; see ``fax_failure``."""
    message = EmailMessage(
        # No patient detail in the envelope: gateways often print the subject on a
        # cover sheet, and mail servers log it.
        subject=_("Fax from %(facility)s") % {"facility": facility.name},
        body=body,
        from_email=fax_sender_email(facility),
        to=[address],
        connection=get_connection(fail_silently=False),
    )
    message.attach(filename, pdf, "application/pdf")
    message.send()


def fax_failure(exc: Exception, *, attempts: int) -> tuple[str, float | None]:
    """What a failed fax attempt means: the error to show, and the seconds after which to
    try again, or None to give up (the gateway refused, or the attempts are spent)."""
    error = _describe_smtp_error(exc)
    if not _permanent(exc) and attempts < settings.FAX_MAX_ATTEMPTS:
        return error, _fax_retry_delay(attempts)
    return error, None


def _describe_smtp_error(exc: Exception) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = ", ".join(str(code) for code, _msg in exc.recipients.values())
        return _("The fax gateway refused the number (SMTP %(codes)s).") % {"codes": codes}
    if isinstance(exc, smtplib.SMTPResponseException):
        return _("The fax gateway answered SMTP %(code)s.") % {"code": exc.smtp_code}
    if isinstance(exc, OSError):
        return _("The mail server could not be reached.")
    return _("The fax could not be handed to the gateway.")


def _delivery_finish(delivery: Delivery, *, sent: bool, error: str = "") -> None:
    now = timezone.now()
    Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING).update(
        status=Delivery.Status.SENT if sent else Delivery.Status.FAILED,
        error="" if sent else error[:500], sent_at=now if sent else None, updated_at=now)
    share = delivery.share
    audit_record(action="share.fax.sent" if sent else "share.fax.failed",
                 actor_type=AuditEvent.ActorType.SYSTEM, facility=share.facility, obj=share,
                 patient_ref=share.patient_id,
                 outcome=AuditEvent.Outcome.SUCCESS if sent else AuditEvent.Outcome.FAILURE,
                 detail={"delivery": delivery.pk, "attempts": delivery.attempts})
