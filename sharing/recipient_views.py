"""The recipient's pages at /view: the code and date of birth form, the Share Inbox, the
one Extend, downloads, and the way into the browser viewer (viewer/app_views.py).

The recipient has no account. Their session is separate from the staff session: its
own cookie (RECIPIENT_SESSION_COOKIE_NAME), sent only to /view, HttpOnly, SameSite=Lax,
Secure on an https site, with no expiry date (it ends with the browser), stored by
RECIPIENT_SESSION_ENGINE. Opening a share replaces the session id with a fresh one and
binds the session to that share; the session ends after RECIPIENT_SESSION_IDLE_SECONDS
without a request, RECIPIENT_SESSION_MAX_SECONDS after it began, and as soon as the
share is revoked, expires or gets a new code.

No URL here carries the code, the date of birth or a name: the QR link's ``?code=`` is
moved into the session at once, and exam ids in URLs are looked up within the
session's share only. Every answer is ``Cache-Control: no-store``."""

import datetime
from functools import wraps

from django import forms
from django.conf import settings
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import (
    require_GET,
    require_http_methods,
    require_POST,
    require_safe,
)

from dicomgw.models import Patient
from pockethealth.codes import code_format, code_is_well_formed, code_normalise
from pockethealth.services import client_address
from pockethealth.sessions import separate_session

from .models import Share
from .recipient import (
    AccessDenied,
    AccessThrottled,
    BirthDateError,
    ShareUnavailable,
    birth_date_parse,
    facility_zone,
    session_ended,
    share_activity_record,
    share_download_studies,
    share_exam_get,
    share_extend,
    share_inbox,
    share_max_expiry,
    share_session_binding,
    share_unlock,
)
from .services import SharingError

COOKIE_PATH = "/view"
# Session keys.
SHARE, BINDING, STARTED, SEEN = "share", "binding", "started", "seen"
PENDING_CODE, PENDING_AT, NOTICE, MEDIA_JOBS = "pending_code", "pending_at", "notice", "media"
# A request within this many seconds of the last recorded one does not write the session.
SEEN_GRANULARITY = 60
# What a notice-only session (after a session ended) lives for.
NOTICE_SECONDS = 300


def _now() -> datetime.datetime:
    """The clock of these views, in one place so tests can move it."""
    return timezone.now()


# --- The recipient's session -----------------------------------------------------------


recipient_session = separate_session(
    attribute="recipient_session", cookie_setting="RECIPIENT_SESSION_COOKIE_NAME",
    engine_setting="RECIPIENT_SESSION_ENGINE", path=COOKIE_PATH)


def _end_session(session, *, notice: str) -> None:
    """Forget everything (the stored row included) and keep only why, for the next
    page to say."""
    session.flush()
    session[NOTICE] = notice
    session.set_expiry(NOTICE_SECONDS)


# What deciding whether a session's share still lasts reads of it.
SHARE_CHECK_FIELDS = ("id", "facility_id", "patient_id", "code_hash", "revoked_at",
                      "expires_at")


def _session_share(request: HttpRequest, now: datetime.datetime, *,
                   shares: QuerySet | None = None) -> Share | None:
    """The share the session was opened for, while the session and the share last; read
    from ``shares`` (by default with its facility, as pages show it)."""
    session = request.recipient_session
    share_id = session.get(SHARE)
    if not share_id:
        return None
    ended = session_ended(started=session.get(STARTED, 0), seen=session.get(SEEN, 0), now=now)
    share = None
    if ended is None:
        try:
            share = (Share.objects.select_related("facility") if shares is None
                     else shares).get(pk=share_id)
        except Share.DoesNotExist:
            share = None
        if share is None or session.get(BINDING) != share_session_binding(share):
            ended = "closed"
        elif share.is_revoked:
            ended = "revoked"
        elif share.is_expired(now):
            ended = "expired"
    if ended:
        _end_session(session, notice=ended)
        return None
    if now.timestamp() - session[SEEN] >= SEEN_GRANULARITY:
        session[SEEN] = now.timestamp()
    return share


def _session_open(session, share: Share, now: datetime.datetime) -> None:
    """Bind the session to ``share`` under a fresh id; what it held before goes."""
    session.clear()
    session.cycle_key()
    session.update({SHARE: share.pk, BINDING: share_session_binding(share),
                    STARTED: now.timestamp(), SEEN: now.timestamp()})
    session.set_expiry(settings.RECIPIENT_SESSION_MAX_SECONDS)


def recipient_required(view):
    """The view gets the session's share and the time, or the visitor goes to /view."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        now = _now()
        share = _session_share(request, now)
        if share is None:
            target = reverse("recipient-unlock")
            if request.htmx:
                response = HttpResponse(status=204)
                response["HX-Redirect"] = target
                return response
            return HttpResponseRedirect(target, status=303)
        with timezone.override(facility_zone(share)):
            return view(request, share, now, *args, **kwargs)

    return wrapper


def _redirect(name: str) -> HttpResponse:
    response = HttpResponseRedirect(reverse(name))
    response.status_code = 303
    return response


# --- Opening a share -------------------------------------------------------------------


class UnlockForm(forms.Form):
    code = forms.CharField(
        label=gettext_lazy("Security code"), max_length=40,
        help_text=gettext_lazy("9 letters and digits, printed on the Access Page."),
        widget=forms.TextInput(attrs={
            "autocomplete": "off", "autocapitalize": "characters", "spellcheck": "false",
            "placeholder": "XXX-XXX-XXX", "class": "code-input",
        }),
    )
    birth_date = forms.CharField(
        label=gettext_lazy("Patient's date of birth"), max_length=40,
        help_text=gettext_lazy("Year, month, day: YYYY/MM/DD, for example 1981/08/29."),
        widget=forms.TextInput(attrs={
            "autocomplete": "off", "placeholder": "YYYY/MM/DD", "spellcheck": "false",
            "class": "dob-input",
        }),
    )

    def __init__(self, *args, today: datetime.date, **kwargs):
        super().__init__(*args, **kwargs)
        self.today = today

    def clean_code(self) -> str:
        code = code_normalise(self.cleaned_data["code"])
        if not code_is_well_formed(code):
            raise forms.ValidationError(_("A security code has 9 letters and digits, in "
                                          "three groups: XXX-XXX-XXX."))
        return code

    def clean_birth_date(self) -> datetime.date:
        try:
            return birth_date_parse(self.cleaned_data["birth_date"], today=self.today)
        except BirthDateError as exc:
            raise forms.ValidationError(str(exc)) from None


def _today_anywhere(now: datetime.datetime) -> datetime.date:
    """The latest date it is anywhere on Earth (UTC+14): a newborn's date of birth is
    never "in the future" for the recipient, wherever they are."""
    return (now + datetime.timedelta(hours=14)).date()


def _pending_code(session, now: datetime.datetime) -> str:
    code = session.get(PENDING_CODE, "")
    if code and now.timestamp() - session.get(PENDING_AT, 0) < settings.VIEW_PENDING_CODE_SECONDS:
        return code
    return ""


NOTICES = {
    "idle": gettext_lazy("For privacy, your session ended after a while without activity. "
                         "Enter the code and date of birth again to continue."),
    "absolute": gettext_lazy("For privacy, sessions last at most a few hours. Enter the code "
                             "and date of birth again to continue."),
    "closed": gettext_lazy("This share has a new Access Page and code. Enter the new code."),
    "revoked": gettext_lazy("The sender has withdrawn access to this share."),
    "expired": gettext_lazy("Access to this share has ended."),
    "signed_out": gettext_lazy("You have left the Share Inbox. Nothing was kept on this "
                               "computer."),
}


def _unlock_page(request: HttpRequest, form: UnlockForm, *, status: int = 200,
                 error: str = "", notice: str = "", retry_after: int = 0,
                 open_share: bool = False) -> HttpResponse:
    response = render(request, "recipient/unlock.html", {
        "form": form, "error": error, "notice": notice, "open_share": open_share,
        "idle_minutes": settings.RECIPIENT_SESSION_IDLE_SECONDS // 60,
    }, status=status)
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


@require_http_methods(["GET", "POST"])
@recipient_session
def unlock(request: HttpRequest) -> HttpResponse:
    """GET: the form (``?code=`` from the QR link goes into the session, then back here
    without it). POST: open the share."""
    now = _now()
    session = request.recipient_session
    today = _today_anywhere(now)
    if request.method == "GET":
        if "code" in request.GET:
            code = code_normalise(request.GET["code"][:40])
            if code_is_well_formed(code):
                session[PENDING_CODE], session[PENDING_AT] = code, now.timestamp()
                session.set_expiry(settings.VIEW_PENDING_CODE_SECONDS)
            return _redirect("recipient-unlock")
        open_share = _session_share(request, now) is not None
        notice = session.pop(NOTICE, "")
        pending = _pending_code(session, now)
        form = UnlockForm(initial={"code": code_format(pending) if pending else ""},
                          today=today)
        return _unlock_page(request, form, notice=NOTICES.get(notice, ""),
                            open_share=open_share)

    form = UnlockForm(request.POST, today=today)
    if not form.is_valid():
        return _unlock_page(request, form, status=400)
    address = client_address(request)
    try:
        share = share_unlock(code=form.cleaned_data["code"],
                             birth_date=form.cleaned_data["birth_date"],
                             address=address, now=now)
    except AccessThrottled as refused:
        return _unlock_page(request, _retry_form(request, session, now, today), status=429,
                            error=_throttle_message(refused), retry_after=refused.retry_after)
    except AccessDenied:
        # The same page for a wrong code and a wrong date of birth: built from what was
        # typed and what the session held before, never from what was found.
        return _unlock_page(request, _retry_form(request, session, now, today), status=403,
                            error=_("The security code and date of birth do not match a "
                                    "share. Check both against the Access Page and try "
                                    "again."))
    except ShareUnavailable as unavailable:
        return _unavailable_page(request, unavailable, now)
    _session_open(session, share, now)
    return _redirect("recipient-inbox")


def _retry_form(request: HttpRequest, session, now, today) -> UnlockForm:
    pending = _pending_code(session, now)
    return UnlockForm(initial={"code": code_format(pending) if pending else "",
                               "birth_date": request.POST.get("birth_date", "")[:40]},
                      today=today)


def _throttle_message(refused: AccessThrottled) -> str:
    minutes = max(1, -(-refused.retry_after // 60))
    if refused.reason == "address":
        return _("Too many attempts from your network. To protect patients' records, "
                 "try again in %(minutes)s minutes, or call support.") % {"minutes": minutes}
    if refused.reason == "breaker":
        return _("We are receiving unusually many attempts and have paused checking codes "
                 "for a minute to protect patients' records. Please try again shortly.")
    return _("Codes cannot be checked at the moment. Please try again in a minute.")


def _unavailable_page(request: HttpRequest, unavailable: ShareUnavailable,
                      now: datetime.datetime) -> HttpResponse:
    share = unavailable.share
    with timezone.override(facility_zone(share)):
        return render(request, "recipient/unavailable.html", {
            "share": share, "reason": unavailable.reason,
            "support_can_extend": unavailable.support_can_extend,
            "max_expiry": share_max_expiry(share),
            "max_months": settings.SHARE_MAX_MONTHS,
        }, status=403)


# --- The Share Inbox -------------------------------------------------------------------


def _inbox_context(share: Share, now: datetime.datetime) -> dict:
    inbox = share_inbox(share=share, now=now)
    return {
        "inbox": inbox, "share": inbox.share, "now": now,
        "display_name": Patient(name=share.patient_name).display_name,
        "access_days": settings.SHARE_ACCESS_DAYS, "max_months": settings.SHARE_MAX_MONTHS,
        "idle_minutes": settings.RECIPIENT_SESSION_IDLE_SECONDS // 60,
        "viewer_available": _viewer_available(),
    }


def _viewer_available() -> bool:
    """Whether downloads can carry the offline viewer (dicomgw.media adds it from
    MEDIA_VIEWER_DIR; without one the option would do nothing, so it is not offered)."""
    return bool(getattr(settings, "MEDIA_VIEWER_DIR", None))


@require_GET
@recipient_session
@recipient_required
def inbox(request: HttpRequest, share: Share, now: datetime.datetime) -> HttpResponse:
    context = _inbox_context(share, now)
    context["notice"] = request.recipient_session.pop(NOTICE, "")
    context["media_jobs"] = _media_jobs(request, share)
    share_activity_record(share=share, action="share.inbox.view",
                          address=client_address(request))
    return render(request, "recipient/inbox.html", context)


@require_GET
@recipient_session
@recipient_required
def inbox_progress(request: HttpRequest, share: Share, now: datetime.datetime) -> HttpResponse:
    """The transfer bar, polled while images arrive; when they have, the page reloads
    once to offer the exams."""
    context = _inbox_context(share, now)
    inbox = context["inbox"]
    response = render(request, "recipient/_progress.html", context)
    if not inbox.transferring or request.GET.get("available") != str(inbox.available_count):
        response["HX-Refresh"] = "true"
    return response


@require_POST
@recipient_session
@recipient_required
def extend(request: HttpRequest, share: Share, now: datetime.datetime) -> HttpResponse:
    try:
        share_extend(share=share, address=client_address(request), now=now)
    except SharingError:
        request.recipient_session[NOTICE] = "extend_refused"
    else:
        request.recipient_session[NOTICE] = "extended"
    return _redirect("recipient-inbox")


@require_GET
@recipient_session
@recipient_required
def exam_viewer(request: HttpRequest, share: Share, now: datetime.datetime,
                share_study_id: int) -> HttpResponse:
    """The exam in the browser viewer, with what of it has arrived so far (the View link
    carries the exam's id only, see viewer.app_views). Before its first image arrives, a
    page that says so."""
    from viewer.app_views import recipient_app_page

    exam = share_exam_get(share=share, share_study_id=share_study_id)
    if exam is None:
        raise Http404
    study = exam.study or (exam.retrieve.study if exam.retrieve_id else None)
    arrived = study is not None and study.num_instances > 0
    share_activity_record(share=share, action="share.study.view",
                          address=client_address(request),
                          detail={"exam": exam.pk, "arrived": arrived})
    if arrived:
        return recipient_app_page(request, study_uids=[exam.study_instance_uid])
    return render(request, "recipient/exam.html", {
        "share": share, "exam": exam,
        "display_name": Patient(name=share.patient_name).display_name,
        "idle_minutes": settings.RECIPIENT_SESSION_IDLE_SECONDS // 60,
    })


@require_POST
@recipient_session
@recipient_required
def sign_out(request: HttpRequest, share: Share, now: datetime.datetime) -> HttpResponse:
    share_activity_record(share=share, action="share.signout", address=client_address(request))
    _end_session(request.recipient_session, notice="signed_out")
    return _redirect("recipient-unlock")


# --- Downloads -------------------------------------------------------------------------


def _ticked(request: HttpRequest, share: Share) -> list[int]:
    """The ticked exam ids; 404 when one is not an exam of the session's share."""
    ids = {int(v) for v in request.POST.getlist("exam") if v.isdigit()}
    if len(ids) != share.share_studies.filter(pk__in=ids).count():
        raise Http404
    return sorted(ids)


def _owner_ref(share: Share) -> str:
    """Whose disc images these are, in the media jobs' terms."""
    return f"share:{share.pk}"


@require_POST
@recipient_session
@recipient_required
def download(request: HttpRequest, share: Share, now: datetime.datetime) -> HttpResponse:
    """The ticked exams as a ZIP (streamed at once) or a disc image (built in the
    background; the inbox follows it)."""
    from dicomgw import media

    kind = request.POST.get("format")
    if kind not in {"zip", "iso"}:
        raise Http404
    include_viewer = request.POST.get("include_viewer") == "on"
    try:
        studies = share_download_studies(share=share, share_study_ids=_ticked(request, share))
        last_name = media.family_name(share.patient_name)
        if kind == "zip":
            response = media.zip_response(studies=studies, patient_last_name=last_name,
                                          include_viewer=include_viewer)
        else:
            keep_until = min(share.expires_at, now + datetime.timedelta(
                seconds=settings.RECIPIENT_SESSION_MAX_SECONDS))
            job = media.iso_job_start(studies=studies, patient_last_name=last_name,
                                      include_viewer=include_viewer,
                                      owner_ref=_owner_ref(share), expires_at=keep_until)
    except (SharingError, media.MediaError) as exc:
        request.recipient_session[NOTICE] = str(exc)
        return _redirect("recipient-inbox")
    detail = {"format": kind, "studies": len(studies), "viewer": include_viewer}
    address = client_address(request)
    if kind == "zip":
        share_activity_record(share=share, action="share.download", address=address,
                              detail=detail)
        return response
    jobs = [j for j in request.recipient_session.get(MEDIA_JOBS, []) if j != job.pk]
    request.recipient_session[MEDIA_JOBS] = [job.pk, *jobs][:5]
    share_activity_record(share=share, action="share.download.prepare", address=address,
                          detail={**detail, "job": job.pk})
    return _redirect("recipient-inbox")


def _media_job(share: Share, job_id: int):
    """A disc image made for this share, or 404."""
    from dicomgw.models import MediaJob

    job = MediaJob.objects.filter(pk=job_id, owner_ref=_owner_ref(share)).first()
    if job is None:
        raise Http404
    return job


def _media_job_fragment(request: HttpRequest, job) -> HttpResponse:
    from dicomgw.media_views import media_job_status

    return media_job_status(
        request, job, download_url=reverse("recipient-media-file", args=[job.pk]),
        poll_url=reverse("recipient-media-status", args=[job.pk]))


def _media_jobs(request: HttpRequest, share: Share) -> list[str]:
    """The status fragments of the disc images this session asked for."""
    from dicomgw.models import MediaJob

    ids = request.recipient_session.get(MEDIA_JOBS, [])
    if not ids:
        return []
    jobs = {j.pk: j for j in MediaJob.objects.filter(pk__in=ids, owner_ref=_owner_ref(share))}
    # Rendered by our own template from the job row: safe to place as it is.
    return [mark_safe(_media_job_fragment(request, jobs[i]).content.decode())
            for i in ids if i in jobs]


@require_GET
@recipient_session
@recipient_required
def media_status(request: HttpRequest, share: Share, now: datetime.datetime,
                 job_id: int) -> HttpResponse:
    """A disc image's progress, polled by the inbox until it is ready or failed."""
    return _media_job_fragment(request, _media_job(share, job_id))


@require_safe
@recipient_session
@recipient_required
def media_file(request: HttpRequest, share: Share, now: datetime.datetime,
               job_id: int) -> HttpResponse:
    """The finished disc image, whole or by ranges (a resumed download)."""
    from dicomgw.media_views import media_job_download

    job = _media_job(share, job_id)
    response = media_job_download(request, job)
    if request.method == "GET" and response.status_code == 200:
        share_activity_record(share=share, action="share.download",
                              address=client_address(request),
                              detail={"format": "iso", "studies": len(job.study_ids),
                                      "viewer": job.include_viewer, "job": job.pk})
    return response
