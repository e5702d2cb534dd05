"""Record requests, the requester's side: make a request, collect the patient's signed
authorization, issue and fax its Request Page, cancel it, find it again.

The PIN and the direct-link token exist in plain text only inside ``request_create`` and
``request_page_issue``: the Request Page is rendered there, while they are known, and
kept as a file; the database holds their keyed hashes. A page cannot be printed again
with the same PIN, so issuing a page always draws a new PIN and link, and the old page
stops working. Signing the consent issues a new page (it now carries the signature)."""

import datetime
import hashlib
import io
import logging
import smtplib
import zoneinfo
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from dicomgw.models import Patient, format_person_name
from dicomgw.services import name_search_key
from pockethealth.codes import (
    link_token_generate,
    link_token_hash,
    pin_generate,
    pin_hash,
)
from pockethealth.models import AuditEvent, Facility, StaffUser
from pockethealth.services import audit_record, client_address
from sharing.services import (
    FAX_DIGITS,
    fax_digits,
    fax_failure,
    fax_gateway_domain,
    fax_pdf_send,
)

from .models import PatientConsent, RecordRequest, RequestFax

log = logging.getLogger(__name__)

# Fresh PINs drawn before giving up. A PIN need only be unique among the facility's open
# requests (10⁶ values for a few hundred open requests), so a second draw is rare and a
# twentieth would mean the generator is broken.
PIN_ATTEMPTS = 20
UPLOAD_LINK_PURPOSE = "upload"
CONSENT_LINK_PURPOSE = "consent"
CONSENT_LINK_LIFETIME = datetime.timedelta(days=7)
DETAILS_MAX = 1000
# A drawn signature: a PNG of sensible size with some ink on it.
SIGNATURE_MAX_BYTES = 1024 * 1024
SIGNATURE_MAX_SIDE = 4000
SIGNATURE_MIN_INK = 60  # dark pixels; a dot or a stray tap has fewer
FAX_STALE = datetime.timedelta(minutes=10)


class RetrievalError(Exception):
    """A request cannot be made or changed as asked; the message is for the person."""


@dataclass(frozen=True)
class OutsideFacility:
    """The facility asked for the records, as the clerk describes it."""

    name: str
    attn: str = ""
    fax: str = ""
    phone: str = ""
    email: str = ""
    facility: Facility | None = None  # when it also runs on this platform


@dataclass(frozen=True)
class RequestPatient:
    """The patient as the requester knows them; ``patient`` when taken from the archive."""

    name: str  # DICOM PN form, "FAMILY^Given"
    birth_date: datetime.date
    mrn: str = ""
    patient: Patient | None = None

    @classmethod
    def from_archive(cls, patient: Patient) -> "RequestPatient":
        return cls(name=patient.name, birth_date=patient.birth_date,
                   mrn=patient.patient_id, patient=patient)


class RequestCodes(NamedTuple):
    """A request with the PIN and link token of its current page: the only place they
    exist in plain text."""

    request: RecordRequest
    pin: str
    link_token: str


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or timezone.now()


def facility_today(facility: Facility, now: datetime.datetime) -> datetime.date:
    try:
        zone = zoneinfo.ZoneInfo(facility.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = datetime.UTC
    return now.astimezone(zone).date()


def name_as_read(name: str) -> str:
    """A DICOM person name as a sentence says it: "ANTHONY^Ryan" reads "Ryan Anthony".
    Other name groups (ideographic, phonetic) follow in brackets."""
    groups = [g for g in (name or "").split("=") if g.strip("^ ")]
    if not groups:
        return ""
    parts = [p.strip() for p in groups[0].split("^")] + [""] * 5
    head = " ".join(p for p in (parts[3], parts[1], parts[2], parts[0], parts[4]) if p)
    rest = [format_person_name(g) for g in groups[1:]]
    return f"{head} ({' / '.join(rest)})" if rest else head


# --- Addresses ---------------------------------------------------------------------------


def upload_address(facility: Facility) -> str:
    """The upload portal of the requesting facility: where the outside facility goes.
    The facility's own host name when it has one (``retrieval.middleware`` leads its
    visitors to the portal), else the portal's path on this site."""
    if facility.upload_host:
        return f"{urlsplit(settings.SITE_URL).scheme}://{facility.upload_host}"
    return f"{settings.SITE_URL}/upload/{facility.short_name}"


def upload_link(record_request: RecordRequest, token: str) -> str:
    """The direct link of the QR code: the portal with the request's token, which opens
    the request without typing the PIN."""
    return f"{upload_address(record_request.facility)}?t={token}"


def upload_token_hash(token: str) -> str:
    return link_token_hash(token, purpose=UPLOAD_LINK_PURPOSE)


def consent_link(token: str) -> str:
    return f"{settings.SITE_URL}{reverse('consent-sign', args=[token])}"


def consent_token_hash(token: str) -> str:
    return link_token_hash(token, purpose=CONSENT_LINK_PURPOSE)


# --- Create --------------------------------------------------------------------------------


def request_create(
    *,
    facility: Facility,
    target: OutsideFacility,
    patient: RequestPatient,
    details: str,
    method: str = RecordRequest.Method.PRINT,
    consent_requested: bool = False,
    created_by: StaffUser | None,
    now: datetime.datetime | None = None,
    request: HttpRequest | None = None,
) -> RequestCodes:
    """Ask ``target`` for the imaging of ``patient``. Draws the PIN and the link token,
    renders the Request Page and, when it is faxed and no signature is awaited, queues
    the fax. With ``consent_requested`` the fax waits until the patient signs. Raises
    ``RetrievalError`` with a sentence for the clerk."""
    now = _now(now)
    details = (details or "").strip()
    _check_target(facility, target, method)
    _check_patient(facility, patient, now)
    if not details:
        raise RetrievalError(_("Say which records are needed (Request Details)."))
    if len(details) > DETAILS_MAX:
        raise RetrievalError(_("Keep the request details to %(max)s characters.")
                             % {"max": DETAILS_MAX})
    stored = None
    try:
        with transaction.atomic():
            record_request = RecordRequest(
                facility=facility, created_by=created_by, created_at=now,
                target_name=target.name.strip(), target_attn=target.attn.strip(),
                target_fax=fax_digits(target.fax), target_phone=target.phone.strip(),
                target_email=target.email.strip(), target_facility=target.facility,
                patient=patient.patient, patient_name=patient.name,
                patient_name_search=name_search_key(patient.name),
                patient_birth_date=patient.birth_date, patient_mrn=patient.mrn.strip(),
                details=details, method=method, consent_requested=consent_requested,
            )
            pin, token = _save_with_fresh_codes(record_request)
            stored = _store_page(record_request, pin, token, now=now)
            audit_record(action="request.create", user=created_by, facility=facility,
                         request=request, obj=record_request, patient_ref=_patient_ref(
                             record_request),
                         detail={"method": method, "consent_requested": consent_requested,
                                 "on_platform": target.facility is not None})
            if record_request.is_faxed and not consent_requested:
                _fax_queue(record_request=record_request, fax_number=record_request.target_fax,
                           requested_by=created_by, request=request)
    except BaseException:
        if stored:
            RecordRequest.request_page.field.storage.delete(stored)
        raise
    record_request.refresh_from_db()
    return RequestCodes(record_request, pin, token)


def _check_target(facility: Facility, target: OutsideFacility, method: str) -> None:
    if not target.name.strip():
        raise RetrievalError(_("Name the facility you are asking for the records."))
    if target.facility is not None and target.facility.pk == facility.pk:
        raise RetrievalError(_("A facility cannot ask itself for records."))
    if method not in RecordRequest.Method.values:
        raise RetrievalError(_("Choose how the Request Page reaches the facility."))
    if target.fax and not FAX_DIGITS.match(fax_digits(target.fax)):
        raise RetrievalError(_("Enter the facility's fax number (7 to 15 digits)."))
    if method == RecordRequest.Method.FAX:
        if not target.fax:
            raise RetrievalError(_("Enter the facility's fax number to fax the request."))
        if not fax_gateway_domain(facility):
            raise RetrievalError(_("Faxing is not set up for your facility. Print the Request "
                                   "Page instead, or ask your administrator to set the fax "
                                   "gateway."))


def _check_patient(facility: Facility, patient: RequestPatient,
                   now: datetime.datetime) -> None:
    if patient.patient is not None and patient.patient.facility_id != facility.pk:
        raise RetrievalError(_("That patient is not in your facility's archive."))
    if not patient.name.strip("^= "):
        raise RetrievalError(_("Enter the patient's name."))
    if patient.birth_date is None:
        raise RetrievalError(_("Enter the patient's date of birth: the outside facility "
                               "needs it to find the records."))
    if patient.birth_date > facility_today(facility, now):
        raise RetrievalError(_("The date of birth is in the future."))


def _patient_ref(record_request: RecordRequest) -> str:
    return str(record_request.patient_id) if record_request.patient_id else ""


def _draw_codes(facility: Facility) -> tuple[str, str]:
    """A PIN that none of the facility's open requests has, and a fresh link token."""
    open_pins = RecordRequest.objects.filter(
        facility=facility, status__in=RecordRequest.OPEN_STATUSES)
    for _attempt in range(PIN_ATTEMPTS):
        pin = pin_generate()
        if open_pins.filter(pin_hash=pin_hash(pin)).exists():
            log.info("PIN already used by an open request; drawing another")
            continue
        return pin, link_token_generate()
    raise RetrievalError(_("No free PIN could be drawn. Try again."))


def _save_with_fresh_codes(record_request: RecordRequest) -> tuple[str, str]:
    """Save the row under new codes. Two requests made at the same moment may draw the
    same PIN; the database's constraint refuses the second, which draws again."""
    for _attempt in range(PIN_ATTEMPTS):
        pin, token = _draw_codes(record_request.facility)
        record_request.pin_hash = pin_hash(pin)
        record_request.link_token_hash = upload_token_hash(token)
        try:
            with transaction.atomic():
                record_request.save()
        except IntegrityError:
            log.info("PIN taken by a concurrent request; drawing another")
            continue
        return pin, token
    raise RetrievalError(_("No free PIN could be drawn. Try again."))


# --- Request Page ------------------------------------------------------------------------


def authorization_paragraphs(record_request: RecordRequest) -> tuple[str, ...]:
    """The authorization the patient signs, with the names filled in."""
    names = {
        "patient": name_as_read(record_request.patient_name),
        "outside": record_request.target_name,
        "requester": record_request.facility.name,
        "product": settings.PRODUCT_NAME,
    }
    return (
        _("I, %(patient)s, authorize %(outside)s to release the medical imaging records "
          "described in this request to %(requester)s.") % names,
        _("I understand that the records will reach %(requester)s through %(product)s, a "
          "secure record exchange platform, on which %(requester)s will be able to access, "
          "view, download and share them.") % names,
        _("I release %(outside)s and %(requester)s, their doctors, employees and agents, "
          "from all claims arising from the disclosure and transfer of these records and "
          "the retrieval of the information in them.") % names,
    )


def _authorization(record_request: RecordRequest):
    """The signed section of the page, or None before the patient signs."""
    from .pdf import Authorization, png_data_uri

    consent = PatientConsent.objects.filter(request=record_request).first()
    if consent is None:
        return None
    with consent.signature.open("rb") as fh:
        signature = fh.read()
    return Authorization(
        paragraphs=tuple(p for p in consent.authorization_text.split("\n\n") if p),
        typed_name=consent.typed_name, signature_data_uri=png_data_uri(signature),
        signed_on=consent.signed_on,
    )


def _store_page(record_request: RecordRequest, pin: str, token: str, *,
                now: datetime.datetime, reissued: bool = False) -> str:
    """Render the Request Page with ``pin`` and ``token`` and keep it; returns the storage
    name. WeasyPrint is imported here, where a page is rendered, not by every process."""
    from .pdf import RequestPageError, request_page_for, request_page_pdf

    page = request_page_for(
        record_request=record_request, pin=pin, link=upload_link(record_request, token),
        upload_address=upload_address(record_request.facility).split("://", 1)[-1],
        patient_name=name_as_read(record_request.patient_name),
        issued_on=facility_today(record_request.facility, now),
        authorization=_authorization(record_request), reissued=reissued,
    )
    try:
        pdf = request_page_pdf(page)
    except RequestPageError as exc:
        raise RetrievalError(_("The names and request details are too long for the Request "
                               "Page to fit one sheet. Shorten them and try again.")) from exc
    record_request.request_page.save("request-page.pdf", ContentFile(pdf), save=False)
    record_request.page_issued_at = now
    RecordRequest.objects.filter(pk=record_request.pk).update(
        request_page=record_request.request_page.name, page_issued_at=now)
    return record_request.request_page.name


def request_page_issue(*, record_request: RecordRequest, by: StaffUser | None,
                       now: datetime.datetime | None = None,
                       request: HttpRequest | None = None,
                       reason: str = "reissue") -> RequestCodes:
    """A new PIN, a new link and a new Request Page; the old page stops working at once."""
    now = _now(now)
    old_name = record_request.request_page.name
    new_name = None
    try:
        with transaction.atomic():
            locked = RecordRequest.objects.select_for_update().select_related(
                "facility").get(pk=record_request.pk)
            if not locked.is_open:
                raise RetrievalError(_("This request is closed; its Request Page can no "
                                       "longer be issued."))
            for _attempt in range(PIN_ATTEMPTS):
                pin, token = _draw_codes(locked.facility)
                try:
                    with transaction.atomic():
                        RecordRequest.objects.filter(pk=locked.pk).update(
                            pin_hash=pin_hash(pin), link_token_hash=upload_token_hash(token))
                except IntegrityError:
                    continue
                break
            else:
                raise RetrievalError(_("No free PIN could be drawn. Try again."))
            new_name = _store_page(locked, pin, token, now=now, reissued=True)
            audit_record(action="request.page.issue", user=by, request=request,
                         actor_type=None if by else AuditEvent.ActorType.SYSTEM,
                         facility=locked.facility, obj=locked,
                         patient_ref=_patient_ref(locked), detail={"reason": reason})
    except BaseException:
        if new_name:
            RecordRequest.request_page.field.storage.delete(new_name)
        raise
    if old_name and old_name != new_name:
        storage = RecordRequest.request_page.field.storage
        transaction.on_commit(lambda: storage.delete(old_name))
    record_request.refresh_from_db()
    return RequestCodes(record_request, pin, token)


# --- Consent -------------------------------------------------------------------------------


def consent_link_issue(*, record_request: RecordRequest, by: StaffUser, email: str = "",
                       now: datetime.datetime | None = None,
                       request: HttpRequest | None = None) -> str:
    """A signing link for the patient, valid for ``CONSENT_LINK_LIFETIME`` and one
    signature; an earlier link stops working. With ``email``, it is also sent there.
    Returns the link (shown once to the clerk, to pass on)."""
    now = _now(now)
    if not record_request.may_take_consent:
        raise RetrievalError(_consent_closed_reason(record_request))
    token = link_token_generate()
    link = consent_link(token)
    with transaction.atomic():
        RecordRequest.objects.filter(pk=record_request.pk).update(
            consent_requested=True, consent_link_hash=consent_token_hash(token),
            consent_link_expires_at=now + CONSENT_LINK_LIFETIME)
        audit_record(action="request.consent.link", user=by, request=request,
                     facility=record_request.facility, obj=record_request,
                     patient_ref=_patient_ref(record_request),
                     detail={"emailed": bool(email)})
        if email:
            _consent_link_email(record_request, link, email, now + CONSENT_LINK_LIFETIME)
    record_request.refresh_from_db()
    return link


def _consent_link_email(record_request: RecordRequest, link: str, email: str,
                        expires: datetime.datetime) -> None:
    facility = record_request.facility
    # No patient detail in the message: the link leads to it.
    body = _(
        "%(facility)s asks for your signature to obtain your earlier medical imaging from "
        "another facility.\n\nOpen this link to read the authorization and sign it:\n"
        "%(link)s\n\nThe link works once, until %(expires)s. If you did not expect this "
        "message, call %(facility)s%(phone)s."
    ) % {"facility": facility.name, "link": link,
         "expires": timezone.localtime(expires, _zone(facility)).strftime("%Y-%m-%d %H:%M"),
         "phone": f" ({facility.phone})" if facility.phone else ""}
    try:
        send_mail(_("Please sign your records request"), body, None, [email],
                  fail_silently=False)
    except (smtplib.SMTPException, OSError) as exc:
        log.warning("signing link e-mail failed: %s", type(exc).__name__)
        raise RetrievalError(_("The e-mail could not be sent. Give the patient the link "
                               "another way, or try again.")) from exc


def _zone(facility: Facility):
    try:
        return zoneinfo.ZoneInfo(facility.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return datetime.UTC


def consent_link_find(*, token: str, now: datetime.datetime | None = None
                      ) -> RecordRequest | None:
    """The request a signing link opens, or None when the link is unknown, used, replaced
    or expired (one answer for all)."""
    now = _now(now)
    if not token or len(token) > 100:
        return None
    record_request = RecordRequest.objects.select_related("facility").filter(
        consent_link_hash=consent_token_hash(token)).first()
    if record_request is None or not record_request.consent_link_open(now):
        return None
    return record_request


def _consent_closed_reason(record_request: RecordRequest) -> str:
    if record_request.is_signed:
        return _("The patient has already signed this request.")
    if not record_request.is_open:
        return _("This request is closed.")
    return _("The outside facility has started uploading, so the request can no longer "
             "change: its PIN would stop working mid-upload.")


def _signature_png(data: bytes) -> bytes:
    """The drawn signature, checked and written again as a plain greyscale PNG on white:
    nothing of the uploaded file but its pixels is kept."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RetrievalError(_("Draw your signature in the box."))
    if len(data) > SIGNATURE_MAX_BYTES:
        raise RetrievalError(_("The signature image is too large. Clear it and sign again."))
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise RetrievalError(_("The signature could not be read. Clear it and sign "
                                       "again."))
            if max(image.size) > SIGNATURE_MAX_SIDE or min(image.size) < 20:
                raise RetrievalError(_("The signature image has an unexpected size. Clear it "
                                       "and sign again."))
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RetrievalError(_("The signature could not be read. Clear it and sign "
                               "again.")) from exc
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    grey = flat.convert("L")
    ink = sum(grey.histogram()[:128])
    if ink < SIGNATURE_MIN_INK:
        raise RetrievalError(_("Draw your signature in the box."))
    out = io.BytesIO()
    grey.save(out, format="PNG", optimize=True)
    return out.getvalue()


SIGNATURE_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Italic.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSerif-Italic.ttf",
)
# Names in scripts the fonts above lack (CJK, for one) are drawn with this one.
SIGNATURE_FALLBACK_FONT = "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"


def _typed_signature_png(name: str) -> bytes:
    """A picture of a typed name, for a patient who adopts it as their signature."""
    from PIL import Image, ImageDraw, ImageFont

    candidates = list(SIGNATURE_FONTS)
    if any(ord(c) > 0x2E7F for c in name):
        candidates.insert(0, SIGNATURE_FALLBACK_FONT)
    font = None
    for path in candidates:
        try:
            font = ImageFont.truetype(path, 56)
            break
        except OSError:
            continue
    font = font or ImageFont.load_default(size=56)
    left, top, right, bottom = font.getbbox(name)
    image = Image.new("L", (max(right - left, 1) + 48, max(bottom - top, 1) + 40), 255)
    ImageDraw.Draw(image).text((24 - left, 20 - top), name, font=font, fill=0)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def consent_sign(
    *,
    record_request: RecordRequest,
    typed_name: str,
    signature_png: bytes | None,
    signature_kind: str = PatientConsent.SignatureKind.DRAWN,
    channel: str,
    collected_by: StaffUser | None = None,
    now: datetime.datetime | None = None,
    request: HttpRequest | None = None,
) -> tuple[PatientConsent, RequestCodes]:
    """Record the patient's signature, once: the authorization text as shown, the typed
    name, the signature image (drawn, or the typed name drawn for a patient who cannot
    draw) with its SHA-256, the date and time, the address and browser. Then issue the
    Request Page again with the signed section (a new PIN and link) and, for a faxed
    request, fax it."""
    now = _now(now)
    typed_name = " ".join((typed_name or "").split())
    if not typed_name:
        raise RetrievalError(_("Type your full name."))
    if len(typed_name) > 200:
        raise RetrievalError(_("Type your name in at most 200 characters."))
    if signature_kind == PatientConsent.SignatureKind.TYPED:
        png = _typed_signature_png(typed_name)
    elif signature_kind == PatientConsent.SignatureKind.DRAWN:
        png = _signature_png(signature_png or b"")
    else:
        raise RetrievalError(_("Choose how you sign."))
    if channel not in PatientConsent.Channel.values:
        raise RetrievalError(_("Choose how you sign."))
    stored = None
    try:
        with transaction.atomic():
            locked = RecordRequest.objects.select_for_update().select_related(
                "facility").get(pk=record_request.pk)
            if not locked.may_take_consent:
                raise RetrievalError(_consent_closed_reason(locked))
            if channel == PatientConsent.Channel.LINK and not locked.consent_link_open(now):
                raise RetrievalError(_("This signing link is no longer valid. Ask the "
                                       "facility for a new one."))
            consent = PatientConsent(
                request=locked, authorization_text="\n\n".join(
                    authorization_paragraphs(locked)),
                typed_name=typed_name, signature_sha256=hashlib.sha256(png).hexdigest(),
                signature_kind=signature_kind, channel=channel, collected_by=collected_by,
                signed_on=facility_today(locked.facility, now), signed_at=now,
                address=client_address(request) if request is not None else None,
                user_agent=(request.META.get("HTTP_USER_AGENT", "")[:300]
                            if request is not None else ""),
            )
            consent.signature.save("signature.png", ContentFile(png), save=False)
            stored = consent.signature.name
            consent.save()
            RecordRequest.objects.filter(pk=locked.pk).update(
                consent_requested=True, consent_link_hash="", consent_link_expires_at=None)
            audit_record(
                action="request.consent.sign",
                user=collected_by,
                actor_type=(AuditEvent.ActorType.USER if collected_by
                            else AuditEvent.ActorType.ANONYMOUS),
                actor_ref="patient", request=request, facility=locked.facility,
                obj=locked, patient_ref=_patient_ref(locked),
                detail={"consent": consent.pk, "channel": channel,
                        "signature": signature_kind,
                        "signature_sha256": consent.signature_sha256},
            )
            codes = request_page_issue(record_request=locked, by=collected_by, now=now,
                                       request=request, reason="consent")
            if locked.is_faxed and locked.target_fax:
                _fax_queue(record_request=locked, fax_number=locked.target_fax,
                           requested_by=collected_by, request=request)
    except BaseException:
        if stored:
            PatientConsent.signature.field.storage.delete(stored)
        raise
    record_request.refresh_from_db()
    return consent, RequestCodes(record_request, codes.pin, codes.link_token)


# --- Cancel --------------------------------------------------------------------------------


def request_cancel(*, record_request: RecordRequest, by: StaffUser,
                   now: datetime.datetime | None = None,
                   request: HttpRequest | None = None) -> RecordRequest:
    """End an open request: its PIN, link and signing link stop working, faxes not yet
    sent are not sent. Cancelling twice changes nothing; a request that was imported or
    declined is not open and cannot be cancelled."""
    now = _now(now)
    with transaction.atomic():
        cancelled = RecordRequest.objects.filter(
            pk=record_request.pk, status__in=RecordRequest.OPEN_STATUSES,
        ).update(status=RecordRequest.Status.CANCELLED, cancelled_at=now, cancelled_by=by,
                 consent_link_hash="", consent_link_expires_at=None)
        record_request.refresh_from_db()
        if not cancelled:
            if record_request.status == RecordRequest.Status.CANCELLED:
                return record_request
            raise RetrievalError(_("This request is %(status)s and can no longer be "
                                   "cancelled.") % {
                                       "status": record_request.get_status_display().lower()})
        stopped = RequestFax.objects.filter(
            request=record_request, status=RequestFax.Status.QUEUED).update(
            status=RequestFax.Status.FAILED, updated_at=now,
            error=_("Not sent: the request was cancelled first."))
        audit_record(action="request.cancel", user=by, request=request,
                     facility=record_request.facility, obj=record_request,
                     patient_ref=_patient_ref(record_request),
                     detail={"faxes_stopped": stopped})
    return record_request


# --- Fax -----------------------------------------------------------------------------------


def request_fax_send(*, record_request: RecordRequest, requested_by: StaffUser,
                     fax_number: str = "", request: HttpRequest | None = None) -> RequestFax:
    """Fax the current Request Page (again) to the facility, or to ``fax_number``."""
    if not record_request.is_open:
        raise RetrievalError(_("This request is closed; its Request Page is no longer sent."))
    if not record_request.request_page:
        raise RetrievalError(_("This request has no Request Page to send."))
    number = fax_digits(fax_number or record_request.target_fax)
    if not FAX_DIGITS.match(number):
        raise RetrievalError(_("Enter the facility's fax number (7 to 15 digits)."))
    with transaction.atomic():
        return _fax_queue(record_request=record_request, fax_number=number,
                          requested_by=requested_by, request=request)


def _fax_queue(*, record_request: RecordRequest, fax_number: str,
               requested_by: StaffUser | None, request: HttpRequest | None) -> RequestFax:
    domain = fax_gateway_domain(record_request.facility)
    if not domain:
        raise RetrievalError(_("Faxing is not set up for your facility."))
    digits = fax_digits(fax_number)
    fax = RequestFax.objects.create(request=record_request, fax_number=digits,
                                    address=f"{digits}@{domain}", requested_by=requested_by)
    audit_record(action="request.fax.queue", user=requested_by, request=request,
                 actor_type=None if requested_by else AuditEvent.ActorType.SYSTEM,
                 facility=record_request.facility, obj=record_request,
                 patient_ref=_patient_ref(record_request), detail={"fax": fax.pk})
    from .tasks import send_request_fax

    send_request_fax.delay_on_commit(fax.pk)
    return fax


def request_fax_deliver(*, fax_id: int, now: datetime.datetime | None = None) -> float | None:
    """The body of the fax task: e-mail the Request Page to the gateway. Claims the row
    first, so a duplicated task sends nothing twice. Returns the seconds after which to
    try again, or None when the fax is finished."""
    now = _now(now)
    claimable = Q(status=RequestFax.Status.QUEUED) | Q(status=RequestFax.Status.SENDING,
                                                       updated_at__lt=now - FAX_STALE)
    if not RequestFax.objects.filter(claimable, pk=fax_id).update(
            status=RequestFax.Status.SENDING, attempts=F("attempts") + 1, updated_at=now):
        return None
    fax = RequestFax.objects.select_related("request__facility").get(pk=fax_id)
    record_request = fax.request
    if not record_request.is_open or not record_request.request_page:
        _fax_finish(fax, sent=False, error=_("Not sent: the request is closed."))
        return None
    try:
        with record_request.request_page.open("rb") as fh:
            pdf = fh.read()
        fax_pdf_send(facility=record_request.facility, address=fax.address, pdf=pdf,
                     filename="request-page.pdf",
                     body=_("Request for medical imaging records: one page, attached."))
    except (smtplib.SMTPException, OSError) as exc:
        error, retry_in = fax_failure(exc, attempts=fax.attempts)
        if retry_in is not None:
            RequestFax.objects.filter(pk=fax.pk, status=RequestFax.Status.SENDING).update(
                status=RequestFax.Status.QUEUED, error=error, updated_at=timezone.now())
            return retry_in
        _fax_finish(fax, sent=False, error=error)
        return None
    _fax_finish(fax, sent=True)
    return None


def _fax_finish(fax: RequestFax, *, sent: bool, error: str = "") -> None:
    now = timezone.now()
    RequestFax.objects.filter(pk=fax.pk, status=RequestFax.Status.SENDING).update(
        status=RequestFax.Status.SENT if sent else RequestFax.Status.FAILED,
        error="" if sent else error[:500], sent_at=now if sent else None, updated_at=now)
    record_request = fax.request
    audit_record(action="request.fax.sent" if sent else "request.fax.failed",
                 actor_type=AuditEvent.ActorType.SYSTEM, facility=record_request.facility,
                 obj=record_request, patient_ref=_patient_ref(record_request),
                 outcome=AuditEvent.Outcome.SUCCESS if sent else AuditEvent.Outcome.FAILURE,
                 detail={"fax": fax.pk, "attempts": fax.attempts})


# --- Finding requests ----------------------------------------------------------------------


def requests_of(facility: Facility):
    """The requests a facility has made, newest first."""
    return RecordRequest.objects.filter(facility=facility).select_related(
        "target_facility", "created_by").order_by("-created_at", "-id")


@dataclass(frozen=True)
class Milestone:
    label: str
    when: datetime.datetime | None
    reached: bool
    current: bool = False


def request_timeline(record_request: RecordRequest) -> list[Milestone]:
    """Where the request stands: the steps reached, with their times, and the ones to
    come. A declined or cancelled request ends there."""
    status = record_request.status
    S = RecordRequest.Status
    uploading_at = record_request.uploads.order_by("created_at").values_list(
        "created_at", flat=True).first()
    order = [S.SENT, S.OPENED, S.UPLOADING, S.RECEIVED, S.IMPORTED]
    times = {S.SENT: record_request.page_issued_at or record_request.created_at,
             S.OPENED: record_request.opened_at, S.UPLOADING: uploading_at,
             S.RECEIVED: record_request.received_at, S.IMPORTED: record_request.imported_at}
    labels = {S.SENT: _("Request made"), S.OPENED: _("Opened by the facility"),
              S.UPLOADING: _("Upload started"), S.RECEIVED: _("Records received"),
              S.IMPORTED: _("Imported into your PACS")}
    reached_index = order.index(status) if status in order else max(
        (i for i, s in enumerate(order) if times[s]), default=0)
    steps = [Milestone(labels[s], times[s], i <= reached_index or bool(times[s]),
                       current=(s == status))
             for i, s in enumerate(order)]
    if status == S.DECLINED:
        steps = [m for m in steps if m.reached]
        steps.append(Milestone(_("Declined by the facility"), record_request.declined_at,
                               True, current=True))
    elif status == S.CANCELLED:
        steps = [m for m in steps if m.reached]
        steps.append(Milestone(_("Cancelled"), record_request.cancelled_at, True,
                               current=True))
    return steps
