"""The clerical pages of record retrieval, the requester's side: the facility's requests,
making one, its page (where it stands, its Request Page, faxes, history), the patient's
signature on this screen, and the actions on a request."""

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from dicomgw.models import Patient
from pockethealth.auth import clerk_required
from pockethealth.lists import audit_history, searched_list
from pockethealth.pages import act_and_return, stored_page_response
from pockethealth.services import audit_record
from sharing.services import fax_gateway_domain

from .forms import ConsentLinkForm, FaxForm, RequestCreateForm, RequestSearchForm, SignatureForm
from .models import PatientConsent, RecordRequest
from .services import (
    RetrievalError,
    authorization_paragraphs,
    consent_link_issue,
    consent_sign,
    facility_today,
    name_as_read,
    request_cancel,
    request_create,
    request_fax_send,
    request_page_issue,
    request_timeline,
    requests_of,
)

SEARCH_SESSION_KEY = "request_search"
# The signing link, shown once on the request's page after it is made.
LINK_SESSION_KEY = "request_consent_link"


def get_request_for_user(user, request_id: int) -> RecordRequest:
    """A request of the user's facility, or 404 (the same answer whether it exists or not)."""
    return get_object_or_404(
        RecordRequest.objects.select_related("facility", "created_by", "cancelled_by",
                                             "target_facility", "patient"),
        pk=request_id, facility=user.facility)


@clerk_required
def request_list(request: HttpRequest) -> HttpResponse:
    return searched_list(request, requests_of(request.user.facility),
                         form_class=RequestSearchForm, session_key=SEARCH_SESSION_KEY,
                         audit_action="request.search", template="retrieval/request_list.html",
                         rows_template="retrieval/_request_rows.html")


@clerk_required
def request_new(request: HttpRequest) -> HttpResponse:
    """Make a request; ``?patient=<archive patient id>`` starts from the archive."""
    facility = request.user.facility
    patient = None
    patient_id = request.POST.get("patient") or request.GET.get("patient")
    if patient_id:
        if not str(patient_id).isdigit():
            raise Http404
        patient = get_object_or_404(Patient, pk=patient_id, facility=facility)
    fax_available = bool(fax_gateway_domain(facility))
    initial = {"method": RecordRequest.Method.FAX if fax_available
               else RecordRequest.Method.PRINT}
    if patient is not None:
        initial.update(RequestCreateForm.initial_for(patient))
    form = RequestCreateForm(request.POST if request.method == "POST" else None,
                             initial=initial, facility=facility, patient=patient)
    if request.method == "POST" and form.is_valid():
        consent = form.cleaned_data["consent"]
        try:
            made = request_create(
                facility=facility, target=form.target(), patient=form.request_patient(),
                details=form.cleaned_data["details"], method=form.cleaned_data["method"],
                consent_requested=consent != RequestCreateForm.CONSENT_NONE,
                created_by=request.user, request=request,
            )
        except RetrievalError as exc:
            form.add_error(None, str(exc))
        else:
            record_request = made.request
            if consent == RequestCreateForm.CONSENT_TABLET:
                return redirect("request-sign", record_request.pk)
            messages.success(request, _("Request made. Its Request Page is ready."))
            if consent == RequestCreateForm.CONSENT_LINK:
                _issue_link(request, record_request, form.cleaned_data["patient_email"])
            return redirect("request-detail", record_request.pk)
    return render(request, "retrieval/request_new.html", {
        "form": form, "patient": patient, "fax_available": fax_available,
    })


def _issue_link(request: HttpRequest, record_request: RecordRequest, email: str) -> None:
    try:
        link = consent_link_issue(record_request=record_request, by=request.user,
                                  email=email, request=request)
    except RetrievalError as exc:
        messages.error(request, str(exc))
        return
    request.session[LINK_SESSION_KEY] = {"request": record_request.pk, "link": link,
                                         "emailed": email}


# What the history calls each audited action on a request. The upload portal and the
# review pages record their own actions against the request; unknown ones show as
# recorded.
ACTION_LABELS = {
    "request.create": gettext_lazy("Request made"),
    "request.view": gettext_lazy("Request page viewed by staff"),
    "request.page.open": gettext_lazy("Request Page opened"),
    "request.page.download": gettext_lazy("Request Page downloaded"),
    "request.page.issue": gettext_lazy("New Request Page and PIN issued"),
    "request.fax.queue": gettext_lazy("Fax queued"),
    "request.fax.sent": gettext_lazy("Fax handed to the gateway"),
    "request.fax.failed": gettext_lazy("Fax failed"),
    "request.consent.link": gettext_lazy("Signing link issued"),
    "request.consent.sign": gettext_lazy("Signed by the patient"),
    "request.consent.view": gettext_lazy("Signing page opened"),
    "request.cancel": gettext_lazy("Request cancelled"),
    # Received records and answers from the platform (review_views).
    "request.reconcile": gettext_lazy("Study reconciled with your patient"),
    "request.import.start": gettext_lazy("Import into PACS started"),
    "request.import.retry": gettext_lazy("Import into PACS retried"),
    "request.import.finish": gettext_lazy("Import of a study finished"),
    "request.import.view": gettext_lazy("Import results viewed"),
    "request.imported": gettext_lazy("Every study imported: request complete"),
    "request.incoming.view": gettext_lazy("Opened by the facility asked"),
    "request.fulfil.start": gettext_lazy("Exams picked by the facility asked"),
    "request.fulfil.retry": gettext_lazy("Sending of the exams retried"),
    "request.fulfil.finish": gettext_lazy("Exams sent by the facility asked"),
    "request.receive": gettext_lazy("Records received"),
}


def _live_context(record_request: RecordRequest) -> dict:
    faxes = list(record_request.faxes.select_related("requested_by"))
    return {"record_request": record_request, "faxes": faxes,
            "polling": any(f.is_pending for f in faxes)}


@clerk_required
def request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    audit_record(request=request, action="request.view", obj=record_request,
                 patient_ref=record_request.patient_id or "")
    link = request.session.pop(LINK_SESSION_KEY, None)
    if link and link.get("request") != record_request.pk:
        link = None
    return render(request, "retrieval/request_detail.html", {
        **_live_context(record_request),
        "timeline": request_timeline(record_request),
        "history": audit_history(record_request, ACTION_LABELS),
        "consent": PatientConsent.objects.filter(request=record_request).first(),
        "display_name": name_as_read(record_request.patient_name),
        "fax_available": bool(fax_gateway_domain(record_request.facility)),
        "new_link": link, "link_form": ConsentLinkForm(),
        "now": timezone.now(),
    })


@clerk_required
def request_live(request: HttpRequest, request_id: int) -> HttpResponse:
    """The part of the request page that moves (faxes); polled while it does."""
    record_request = get_request_for_user(request.user, request_id)
    return render(request, "retrieval/_request_faxes.html", _live_context(record_request))


@clerk_required
def request_page_file(request: HttpRequest, request_id: int) -> HttpResponse:
    """The stored Request Page PDF: inline to print, or as a download. Never cached."""
    record_request = get_request_for_user(request.user, request_id)
    if not record_request.request_page:
        raise Http404
    return stored_page_response(request, record_request.request_page, action="request.page",
                                obj=record_request, patient_ref=record_request.patient_id or "",
                                filename=f"request-page-{record_request.pk}.pdf")


def _run(request: HttpRequest, record_request: RecordRequest, action,
         success: str) -> HttpResponse:
    return act_and_return(request, action, success=success, refusal=RetrievalError,
                          page="request-detail", pk=record_request.pk)


@require_POST
@clerk_required
def request_cancel_view(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    return _run(request, record_request,
                lambda: request_cancel(record_request=record_request, by=request.user,
                                       request=request),
                _("Request cancelled. Its PIN and link no longer open it."))


@require_POST
@clerk_required
def request_reissue_view(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    return _run(request, record_request,
                lambda: request_page_issue(record_request=record_request, by=request.user,
                                           request=request),
                _("New Request Page made with a new PIN; the old page no longer works. "
                  "Print or fax the new one."))


@require_POST
@clerk_required
def request_fax_view(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    form = FaxForm(request.POST)
    number = form.cleaned_data["fax_number"] if form.is_valid() else ""
    return _run(request, record_request,
                lambda: request_fax_send(record_request=record_request,
                                         requested_by=request.user, fax_number=number,
                                         request=request),
                _("The Request Page is queued to be faxed."))


@require_POST
@clerk_required
def request_consent_link_view(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    form = ConsentLinkForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Enter a valid e-mail address, or leave it empty."))
    else:
        _issue_link(request, record_request, form.cleaned_data["email"])
    return redirect("request-detail", record_request.pk)


def signing_context(record_request: RecordRequest, form: SignatureForm) -> dict:
    """What the signing page shows, in the clerk's session or through a link."""
    return {
        "form": form, "record_request": record_request,
        "patient_name": name_as_read(record_request.patient_name),
        "paragraphs": authorization_paragraphs(record_request),
        "today": facility_today(record_request.facility, timezone.now()),
    }


def sign_with(form: SignatureForm, record_request: RecordRequest, request: HttpRequest, *,
              channel: str, collected_by=None) -> bool:
    """Record the signature a valid form carries; False, with the reason on the form,
    when it is refused."""
    try:
        consent_sign(record_request=record_request,
                     typed_name=form.cleaned_data["typed_name"],
                     signature_png=form.cleaned_data.get("signature_png"),
                     signature_kind=form.signature_kind, channel=channel,
                     collected_by=collected_by, request=request)
    except RetrievalError as exc:
        form.add_error(None, str(exc))
        return False
    return True


@clerk_required
def request_sign(request: HttpRequest, request_id: int) -> HttpResponse:
    """The signing page on the clerk's screen or tablet, handed to the patient."""
    record_request = get_request_for_user(request.user, request_id)
    if not record_request.may_take_consent:
        messages.info(request, _("This request cannot take a signature now."))
        return redirect("request-detail", record_request.pk)
    form = SignatureForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid() and sign_with(
            form, record_request, request, channel=PatientConsent.Channel.TABLET,
            collected_by=request.user):
        return redirect("request-signed", record_request.pk)
    return render(request, "retrieval/sign.html", {
        **signing_context(record_request, form), "in_clerk_session": True,
    })


@clerk_required
def request_signed(request: HttpRequest, request_id: int) -> HttpResponse:
    """The thank-you page the patient sees before handing the tablet back."""
    record_request = get_request_for_user(request.user, request_id)
    return render(request, "retrieval/signed.html", {"record_request": record_request,
                                                     "in_clerk_session": True})
