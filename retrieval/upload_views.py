"""The upload portal at /upload/<facility>: the PIN, the request, sending the files,
the summary and Confirm, or Decline.

The uploader has no account. Their session is separate from the staff session: its own
cookie (UPLOAD_SESSION_COOKIE_NAME), sent only to /upload, HttpOnly, SameSite=Lax,
Secure on an https site, ending with the browser, stored by UPLOAD_SESSION_ENGINE
(``pockethealth.sessions``). Opening a request replaces the session id with a fresh one
and binds the session to that request; the session ends after
UPLOAD_SESSION_IDLE_SECONDS without a request, UPLOAD_SESSION_MAX_SECONDS after it
began, when the request gets a new Request Page (new PIN), and when the request ends.

No URL carries the PIN, a name or a file's path: the QR link's ``?t=`` is moved into the
session at once, and a file's path travels in a request header. Every answer is
``Cache-Control: no-store``."""

import base64
import binascii
import datetime
import json
from functools import wraps
from urllib.parse import unquote

from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from dicomgw.models import Patient
from pockethealth.body import body_rest
from pockethealth.services import client_address
from pockethealth.sessions import separate_session

from .models import RecordRequest, Upload, UploadedFile
from .services import RetrievalError
from .upload import (
    ANNOUNCE_BATCH,
    DECLINE_SUGGESTIONS,
    HEAD_BYTES,
    AnnouncedFile,
    FileAnswer,
    PinRefused,
    PinThrottled,
    RequestClosed,
    SentFile,
    UploadBusy,
    UploadIncomplete,
    UploadLimit,
    facility_for_portal,
    files_announce,
    files_receive,
    outcome_labels,
    pin_is_well_formed,
    request_decline,
    request_open_by_link,
    request_open_by_pin,
    request_session_binding,
    session_files_receive,
    upload_confirm,
    upload_current,
    upload_open,
    upload_summary,
)

COOKIE_PATH = "/upload"
# Session keys.
REQUEST, BINDING, STARTED, SEEN, NOTICE = "request", "binding", "started", "seen", "notice"
DECLINED_BY = "declined_facility"
# A request within this many seconds of the last recorded one does not write the session.
SEEN_GRANULARITY = 60
# What a notice-only session (after a session ended) lives for.
NOTICE_SECONDS = 300
PATH_HEADER = "X-Upload-Path"
MANIFEST_HEADER = "X-Upload-Manifest-Length"
MANIFEST_MAX_BYTES = 1024 * 1024

upload_session = separate_session(
    attribute="upload_session", cookie_setting="UPLOAD_SESSION_COOKIE_NAME",
    engine_setting="UPLOAD_SESSION_ENGINE", path=COOKIE_PATH)


def _now() -> datetime.datetime:
    """The clock of these views, in one place so tests can move it."""
    return timezone.now()


# --- The uploader's session ------------------------------------------------------------


NOTICES = {
    "idle": gettext_lazy("For privacy, your session ended after a while without activity. "
                         "Enter the PIN again to continue: the files already sent are kept."),
    "absolute": gettext_lazy("For privacy, a session lasts at most a day. Enter the PIN "
                             "again to continue: the files already sent are kept."),
    "closed": gettext_lazy("The requesting facility has issued a new Request Page for this "
                           "request. Enter the PIN printed on the new page: the files already "
                           "sent are kept."),
    "cancelled": gettext_lazy("The requesting facility has cancelled this request. Nothing "
                              "more needs to be sent."),
    "imported": gettext_lazy("The requesting facility has received and imported the "
                             "records of this request. Nothing more needs to be sent."),
    "declined": gettext_lazy("This request was declined. Nothing more needs to be sent."),
    "left": gettext_lazy("You have left the upload page. Nothing was kept on this "
                         "computer."),
    "link": gettext_lazy("That link does not open a request here. Enter the PIN printed "
                         "on the Request Page."),
}


def _end_session(session, *, notice: str) -> None:
    """Forget everything (the stored row included) and keep only why, for the next
    page to say."""
    session.flush()
    session[NOTICE] = notice
    session.set_expiry(NOTICE_SECONDS)


def _session_open(session, record_request: RecordRequest, now: datetime.datetime) -> None:
    """Bind the session to ``record_request`` under a fresh id; what it held before
    goes."""
    session.clear()
    session.cycle_key()
    session.update({REQUEST: record_request.pk,
                    BINDING: request_session_binding(record_request),
                    STARTED: now.timestamp(), SEEN: now.timestamp()})
    session.set_expiry(settings.UPLOAD_SESSION_MAX_SECONDS)


def _session_ended(session, now: datetime.datetime) -> str | None:
    ts = now.timestamp()
    if ts - session.get(STARTED, 0) >= settings.UPLOAD_SESSION_MAX_SECONDS:
        return "absolute"
    if ts - session.get(SEEN, 0) >= settings.UPLOAD_SESSION_IDLE_SECONDS:
        return "idle"
    return None


def _session_request(request: HttpRequest, now: datetime.datetime) -> RecordRequest | None:
    """The request the session was opened for, while the session and the request
    last."""
    session = request.upload_session
    request_id = session.get(REQUEST)
    if not request_id:
        return None
    ended = _session_ended(session, now)
    record_request = None
    if ended is None:
        record_request = RecordRequest.objects.select_related("facility").filter(
            pk=request_id).first()
        if record_request is None or \
                session.get(BINDING) != request_session_binding(record_request):
            ended = "closed"
        elif not record_request.is_open:
            ended = record_request.status
    if ended:
        _end_session(session, notice=ended)
        return None
    _session_seen(session, now)
    return record_request


def _session_seen(session, now: datetime.datetime) -> None:
    """Note the activity, writing the session at most once a SEEN_GRANULARITY."""
    if now.timestamp() - session.get(SEEN, 0) >= SEEN_GRANULARITY:
        session[SEEN] = now.timestamp()


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def uploader_required(view):
    """The view gets the session's request and the time, or the visitor goes to the
    PIN page of the facility in the address (the browser's script gets a 401 that
    says so)."""

    @wraps(view)
    def wrapper(request: HttpRequest, facility: str, *args, **kwargs):
        now = _now()
        record_request = _session_request(request, now)
        if record_request is None or record_request.facility.short_name != facility:
            target = reverse("upload-portal", args=[facility])
            if _wants_json(request):
                notice = request.upload_session.get(NOTICE, "")
                return JsonResponse({"error": str(NOTICES.get(notice) or _(
                    "Your session has ended. Enter the PIN again to continue: the files "
                    "already sent are kept.")), "signin": target}, status=401)
            return HttpResponseRedirect(target, status=303)
        return view(request, record_request, now, *args, **kwargs)

    return wrapper


def _redirect(name: str, record_request: RecordRequest) -> HttpResponse:
    return HttpResponseRedirect(reverse(name, args=[record_request.facility.short_name]),
                                status=303)


def _request_context(record_request: RecordRequest, **extra) -> dict:
    return {
        "record_request": record_request,
        "facility": record_request.facility,
        "display_name": Patient(name=record_request.patient_name).display_name,
        "step": extra.pop("step", ""),
        "leave": extra.pop("leave", True),
        **extra,
    }


# --- The PIN -------------------------------------------------------------------------------


class PinForm(forms.Form):
    pin = forms.CharField(
        label=gettext_lazy("Upload PIN"), max_length=20,
        help_text=gettext_lazy("6 digits, printed on the Request Page under “Transfer "
                               "Instructions”."),
        widget=forms.TextInput(attrs={
            "autocomplete": "off", "inputmode": "numeric", "spellcheck": "false",
            "placeholder": "000000", "class": "pin-input", "autofocus": True,
        }),
    )

    def clean_pin(self) -> str:
        pin = self.cleaned_data["pin"]
        if not pin_is_well_formed(pin):
            raise forms.ValidationError(_("The upload PIN has 6 digits."))
        return pin


def _pin_page(request: HttpRequest, facility: str, form: PinForm, *, status: int = 200,
              error: str = "", notice: str = "", open_request: bool = False,
              retry_after: int = 0) -> HttpResponse:
    response = render(request, "retrieval/upload/pin.html", {
        "form": form, "error": error, "notice": notice, "open_request": open_request,
        "facility_slug": facility, "step": "pin",
    }, status=status)
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


def _throttle_message(refused: PinThrottled) -> str:
    minutes = max(1, -(-refused.retry_after // 60))
    if refused.reason == "address":
        return _("Too many wrong PINs from your network. To protect patients' records, PIN "
                 "entry is locked here for %(minutes)s minutes. Use the QR code on the "
                 "Request Page, wait, or call support.") % {"minutes": minutes}
    if refused.reason == "breaker":
        return _("This upload page is receiving unusually many wrong PINs and has paused "
                 "checking them for %(minutes)s minutes to protect patients' records. Use "
                 "the QR code on the Request Page, or try again later.") % {"minutes": minutes}
    return _("PINs cannot be checked at the moment. Please try again in a minute.")


@require_http_methods(["GET", "POST"])
@upload_session
def portal(request: HttpRequest, facility: str) -> HttpResponse:
    """GET: the PIN form (``?t=`` from the QR link opens the request, then goes on
    without it). POST: open the request with the PIN."""
    now = _now()
    session = request.upload_session
    address = client_address(request)
    if request.method == "GET":
        if "t" in request.GET:
            return _open_by_link(request, facility, request.GET["t"], address, now)
        current = _session_request(request, now)
        open_request = current is not None and current.facility.short_name == facility
        notice = session.pop(NOTICE, "")
        return _pin_page(request, facility, PinForm(), notice=str(NOTICES.get(notice, "")),
                         open_request=open_request)

    form = PinForm(request.POST)
    if not form.is_valid():
        return _pin_page(request, facility, form, status=400)
    try:
        record_request = request_open_by_pin(
            facility=facility_for_portal(facility), pin=form.cleaned_data["pin"],
            address=address, now=now)
    except PinThrottled as refused:
        return _pin_page(request, facility, PinForm(), status=429,
                         error=_throttle_message(refused), retry_after=refused.retry_after)
    except PinRefused:
        return _pin_page(request, facility, PinForm(), status=403, error=_(
            "This PIN does not open a request at this address. Check the 6 digits and the "
            "upload address against the Request Page, and try again."))
    _session_open(session, record_request, now)
    return _redirect("upload-request", record_request)


def _open_by_link(request: HttpRequest, facility: str, token: str, address, now
                  ) -> HttpResponse:
    session = request.upload_session
    try:
        record_request = request_open_by_link(
            facility=facility_for_portal(facility), token=token, address=address, now=now)
    except PinThrottled as refused:
        return _pin_page(request, facility, PinForm(), status=429,
                         error=_throttle_message(refused), retry_after=refused.retry_after)
    except PinRefused:
        _end_session(session, notice="link")
        return HttpResponseRedirect(reverse("upload-portal", args=[facility]), status=303)
    except RequestClosed as closed:
        return _closed_page(request, closed.record_request)
    _session_open(session, record_request, now)
    return _redirect("upload-request", record_request)


def _closed_page(request: HttpRequest, record_request: RecordRequest) -> HttpResponse:
    return render(request, "retrieval/upload/closed.html", _request_context(
        record_request, notice=NOTICES.get(record_request.status, ""), leave=False),
        status=410)


# --- The request -----------------------------------------------------------------------


@require_GET
@upload_session
@uploader_required
def request_detail(request: HttpRequest, record_request: RecordRequest,
                   now: datetime.datetime) -> HttpResponse:
    """What is asked for: the patient's name and date of birth, the details, and who
    asks. "Ready to Upload" or "Decline"."""
    upload = upload_current(record_request)
    received = upload.files.exclude(outcome=UploadedFile.Outcome.PENDING).count() \
        if upload else 0
    confirmed = record_request.uploads.filter(status=Upload.Status.CONFIRMED).exists()
    return render(request, "retrieval/upload/request.html", _request_context(
        record_request, step="request", upload=upload, received=received,
        confirmed=confirmed, notice=request.upload_session.pop(NOTICE, "")))


@require_POST
@upload_session
@uploader_required
def upload_start(request: HttpRequest, record_request: RecordRequest,
                 now: datetime.datetime) -> HttpResponse:
    upload_open(record_request=record_request, address=client_address(request), now=now)
    return _redirect("upload-files", record_request)


@require_GET
@upload_session
@uploader_required
def upload_files(request: HttpRequest, record_request: RecordRequest,
                 now: datetime.datetime) -> HttpResponse:
    """Choosing the disc or folder, and sending it."""
    upload = upload_current(record_request)
    if upload is None:
        return _redirect("upload-request", record_request)
    settled = upload.files.exclude(outcome=UploadedFile.Outcome.PENDING)
    facility = record_request.facility.short_name
    return render(request, "retrieval/upload/files.html", _request_context(
        record_request, step="upload", upload=upload, settled=settled.count(),
        pending=upload.files.filter(outcome=UploadedFile.Outcome.PENDING).count(),
        config={
            "announceUrl": reverse("upload-announce", args=[facility]),
            "batchUrl": reverse("upload-batch", args=[facility]),
            "batchFiles": settings.UPLOAD_BATCH_FILES, "batchBytes": settings.UPLOAD_BATCH_BYTES,
            "reviewUrl": reverse("upload-review", args=[facility]),
            "parallel": settings.UPLOAD_PARALLEL, "batch": ANNOUNCE_BATCH,
            "headBytes": HEAD_BYTES, "maxFiles": settings.UPLOAD_MAX_FILES,
            "maxFileBytes": settings.UPLOAD_MAX_FILE_BYTES,
            "stallSeconds": settings.UPLOAD_STALL_SECONDS,
        }))


def _json_error(message: str, status: int, **extra) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def _announced(payload) -> tuple[list[AnnouncedFile], int, int]:
    """The files of an announcement, from its JSON; ValueError when it is malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
        raise ValueError("no files")
    if len(payload["files"]) > ANNOUNCE_BATCH:
        raise ValueError("too many files in one announcement")
    files = []
    for item in payload["files"]:
        path, size = item.get("path"), item.get("size")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            raise ValueError("a file needs a path and a size")
        try:
            head = base64.b64decode(item.get("head") or "", validate=True)
        except (binascii.Error, TypeError):
            raise ValueError("a file's head is not base64") from None
        files.append(AnnouncedFile(path=path, size=size, head=head))
    totals = [payload.get("total_files", 0), payload.get("total_bytes", 0)]
    if not all(isinstance(v, int) and v >= 0 for v in totals):
        raise ValueError("totals must be counts")
    return files, totals[0], totals[1]


@require_POST
@upload_session
@uploader_required
def upload_announce(request: HttpRequest, record_request: RecordRequest,
                    now: datetime.datetime) -> HttpResponse:
    """The browser names the files it will send (path, size, first bytes); the answer
    says which of them the server has settled already, and which are still to send."""
    upload = upload_current(record_request)
    if upload is None:
        return _json_error(_("This upload is finished."), 409,
                           review=reverse("upload-review", args=[
                               record_request.facility.short_name]))
    try:
        files, total_files, total_bytes = _announced(json.loads(request.body))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return _json_error(_("The list of files could not be read."), 400)
    try:
        answer = files_announce(upload=upload, files=files, total_files=total_files,
                                total_bytes=total_bytes, now=now)
    except UploadLimit as limit:
        return _json_error(str(limit), 413)
    return JsonResponse({"files": answer.files, "total_files": answer.total_files,
                         "total_bytes": answer.total_bytes})


@require_http_methods(["PUT"])
@upload_session
def upload_file(request: HttpRequest, facility: str) -> HttpResponse:
    """One announced file, its bytes the request body and its path (percent-encoded
    UTF-8) in the X-Upload-Path header. Answers with what became of it."""
    path = unquote(request.headers.get(PATH_HEADER, ""), errors="strict")
    try:
        size = int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return _json_error(_("The file's size is missing."), 411)
    answers = _files_take(request, facility, [SentFile(path, size)])
    if isinstance(answers, HttpResponse):
        return answers
    if answers[0].error:
        return _json_error(answers[0].error, 409)
    return JsonResponse(_file_json(answers[0], outcome_labels()))


@require_POST
@upload_session
def upload_batch(request: HttpRequest, facility: str) -> HttpResponse:
    """Several announced files in one request, which is how the browser sends a disc's
    small files: the body is a manifest (JSON, ``{"files": [{"path", "size"}, ...]}``,
    X-Upload-Manifest-Length bytes long), then each file's bytes in the manifest's
    order. Answers with what became of each file: ``{"files": [{"path", "outcome",
    "label", "reason"} or {"path", "error"}, ...]}``."""
    try:
        files = _manifest(request)
    except ValueError:
        return _json_error(_("The list of files sent could not be read."), 400)
    answers = _files_take(request, facility, files)
    if isinstance(answers, HttpResponse):
        return answers
    labels = outcome_labels()
    return JsonResponse({"files": [_file_json(answer, labels) for answer in answers]})


def _manifest(request: HttpRequest) -> list[SentFile]:
    """The batch's files, read from the start of the body; ValueError when the manifest
    is unreadable, names too many files, or does not add up to the body's length."""
    length = int(request.headers.get(MANIFEST_HEADER, ""))
    if not 0 < length <= MANIFEST_MAX_BYTES:
        raise ValueError("manifest length")
    payload = json.loads(request.read(length))
    items = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= settings.UPLOAD_BATCH_FILES:
        raise ValueError("manifest files")
    files = []
    for item in items:
        path, size = item.get("path") if isinstance(item, dict) else None, item.get("size")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            raise ValueError("manifest entry")
        files.append(SentFile(path, size))
    if int(request.META.get("CONTENT_LENGTH") or 0) != length + sum(f.size for f in files):
        raise ValueError("body length")
    return files


def _files_take(request: HttpRequest, facility: str, files: list[SentFile]
                ) -> list[FileAnswer] | HttpResponse:
    """Receive ``files`` from the request's body for the session's request. A disc is
    thousands of files, so the session's request is read together with the files' rows;
    anything but files to settle for a live session goes the way of every other view
    (``uploader_required``), which says what is wrong."""
    now = _now()
    session = request.upload_session
    request_id = session.get(REQUEST)
    stream = body_rest(request, sum(f.size for f in files))
    if request_id and not _session_ended(session, now):
        try:
            answers = session_files_receive(
                request_id=request_id, binding=session.get(BINDING, ""), facility=facility,
                files=files, stream=stream, now=now)
        except RetrievalError as refused:
            return _file_error(refused)
        if answers is not None:
            _session_seen(session, now)
            return answers
    return _files_take_checked(request, facility, files=files, stream=stream)


@uploader_required
def _files_take_checked(request: HttpRequest, record_request: RecordRequest,
                        now: datetime.datetime, *, files: list[SentFile], stream
                        ) -> list[FileAnswer] | HttpResponse:
    try:
        return files_receive(record_request=record_request, files=files, stream=stream,
                             now=now)
    except RetrievalError as refused:
        return _file_error(refused)


def _file_error(refused: RetrievalError) -> HttpResponse:
    if isinstance(refused, UploadIncomplete):
        return _json_error(str(refused), 400, retry=True)
    if isinstance(refused, UploadBusy):
        response = _json_error(str(refused), 503, retry=True)
        response["Retry-After"] = "30"
        return response
    return _json_error(str(refused), 409)


def _file_json(answer: FileAnswer, labels: dict[str, str]) -> dict:
    if answer.row is None:
        return {"path": answer.path, "error": answer.error}
    row = answer.row
    return {"path": row.path, "outcome": row.outcome, "label": labels[row.outcome],
            "reason": row.reason}


# --- Summary, confirm, done ------------------------------------------------------------


@require_GET
@upload_session
@uploader_required
def upload_review(request: HttpRequest, record_request: RecordRequest,
                  now: datetime.datetime) -> HttpResponse:
    """What arrived, grouped by patient, study and series; what did not become an image
    and why; what the disc's DICOMDIR lists but did not arrive. Then Confirm."""
    upload = upload_current(record_request)
    if upload is None:
        return _redirect("upload-request", record_request)
    return render(request, "retrieval/upload/review.html", _request_context(
        record_request, step="confirm", summary=upload_summary(upload),
        error=request.upload_session.pop(NOTICE, "")))


@require_POST
@upload_session
@uploader_required
def upload_confirm_view(request: HttpRequest, record_request: RecordRequest,
                        now: datetime.datetime) -> HttpResponse:
    upload = upload_current(record_request)
    if upload is None:
        return _redirect("upload-done", record_request)
    try:
        upload_confirm(upload=upload, address=client_address(request), now=now)
    except RetrievalError as refused:
        request.upload_session[NOTICE] = str(refused)
        return _redirect("upload-review", record_request)
    return _redirect("upload-done", record_request)


@require_GET
@upload_session
@uploader_required
def upload_done(request: HttpRequest, record_request: RecordRequest,
                now: datetime.datetime) -> HttpResponse:
    upload = record_request.uploads.filter(status=Upload.Status.CONFIRMED).order_by(
        "-confirmed_at").first()
    if upload is None:
        return _redirect("upload-request", record_request)
    return render(request, "retrieval/upload/done.html", _request_context(
        record_request, step="done", summary=upload_summary(upload)))


# --- Decline, leave ------------------------------------------------------------------


class DeclineForm(forms.Form):
    OTHER = "other"
    choice = forms.ChoiceField(
        label=gettext_lazy("Why can the records not be sent?"), widget=forms.RadioSelect,
        choices=[*((str(s), s) for s in DECLINE_SUGGESTIONS),
                 (OTHER, gettext_lazy("Another reason"))],
    )
    note = forms.CharField(
        label=gettext_lazy("Details for the requesting facility"), required=False,
        max_length=400, widget=forms.Textarea(attrs={"rows": 3}),
        help_text=gettext_lazy("Required for “Another reason”. Do not include other "
                               "patients' details."),
    )

    def clean(self):
        cleaned = super().clean()
        choice, note = cleaned.get("choice"), (cleaned.get("note") or "").strip()
        if choice == self.OTHER and not note:
            self.add_error("note", _("Say why the records cannot be sent."))
        elif choice:
            label = "" if choice == self.OTHER else choice
            cleaned["reason"] = ". ".join(p for p in (label, note) if p)
        return cleaned


@require_http_methods(["GET", "POST"])
@upload_session
@uploader_required
def decline(request: HttpRequest, record_request: RecordRequest,
            now: datetime.datetime) -> HttpResponse:
    form = DeclineForm(request.POST or None)
    error = ""
    if request.method == "POST" and form.is_valid():
        try:
            request_decline(record_request=record_request, reason=form.cleaned_data["reason"],
                            address=client_address(request), now=now)
        except RetrievalError as refused:
            error = str(refused)
        else:
            name = record_request.facility.name
            _end_session(request.upload_session, notice="declined")
            request.upload_session[DECLINED_BY] = name
            return HttpResponseRedirect(reverse("upload-declined", args=[
                record_request.facility.short_name]), status=303)
    return render(request, "retrieval/upload/decline.html", _request_context(
        record_request, step="request", form=form, error=error),
        status=400 if request.method == "POST" else 200)


@require_GET
@upload_session
def declined(request: HttpRequest, facility: str) -> HttpResponse:
    """The thank-you page after declining (the session is over; it names whom the
    answer went to)."""
    requester = request.upload_session.get(DECLINED_BY)
    if not requester:
        return HttpResponseRedirect(reverse("upload-portal", args=[facility]), status=303)
    return render(request, "retrieval/upload/declined.html", {
        "requester": requester, "facility_slug": facility, "step": "done"})


@require_POST
@upload_session
@uploader_required
def leave(request: HttpRequest, record_request: RecordRequest,
          now: datetime.datetime) -> HttpResponse:
    _end_session(request.upload_session, notice="left")
    return HttpResponseRedirect(reverse("upload-portal", args=[
        record_request.facility.short_name]), status=303)
