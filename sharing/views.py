"""The clerical pages of provider sharing: the facility's shares, making one, its page
(transfer, deliveries, access history), its Access Page, and the actions on it."""

from django.conf import settings
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

from .forms import ShareCreateForm, ShareSearchForm, picks_from
from .models import Delivery, Share
from .picks import picks_from_search
from .recipient import share_lock_clear
from .services import (
    SharingError,
    delivery_resend,
    fax_gateway_domain,
    share_create,
    share_page_reissue,
    share_refresh,
    share_revoke,
    share_transfer_progress,
    share_transfer_retry,
)

SEARCH_SESSION_KEY = "share_search"


def get_share_for_user(user, share_id: int) -> Share:
    """A share of the user's facility, or 404 (the same answer whether it exists or not)."""
    return get_object_or_404(Share.objects.select_related("facility", "created_by"),
                             pk=share_id, facility=user.facility)


@clerk_required
def share_list(request: HttpRequest) -> HttpResponse:
    shares = Share.objects.filter(facility=request.user.facility).order_by("-created_at", "-id")
    return searched_list(request, shares, form_class=ShareSearchForm,
                         session_key=SEARCH_SESSION_KEY, audit_action="share.search",
                         template="sharing/share_list.html",
                         rows_template="sharing/_share_rows.html")


@clerk_required
def share_new(request: HttpRequest) -> HttpResponse:
    """Make a share. Arrives with ``?patient=<archive patient id>`` (from the archive), or
    as a POST of ticked PACS search results (``study_uids`` of the results in the
    session, or ``pick`` values; see ``sharing.picks``). The form on this page posts
    back with ``step=create``."""
    facility = request.user.facility
    patient, studies, picks, dropped = None, None, [], False
    patient_id = request.POST.get("patient") or request.GET.get("patient")
    if patient_id:
        if not str(patient_id).isdigit():
            raise Http404
        patient = get_object_or_404(Patient, pk=patient_id, facility=facility)
        studies = patient.studies.order_by("-study_date", "-study_time", "-id")
    elif request.method == "POST":
        tokens = request.POST.getlist("pick")
        if not tokens:
            tokens, dropped = picks_from_search(
                request.session, request.POST.getlist("study_uids"), facility=facility)
        picks, undecodable = picks_from(tokens, facility=facility)
        dropped = dropped or undecodable
    if patient is None and not picks:
        return render(request, "sharing/share_new_empty.html", {"dropped": dropped},
                      status=400 if request.method == "POST" else 200)

    creating = request.method == "POST" and request.POST.get("step") == "create"
    fax_available = bool(fax_gateway_domain(facility))
    initial = {"method": Share.Method.FAX if fax_available else Share.Method.PRINT}
    if picks:
        initial["pick"] = [p.token for p in picks]
    elif studies is not None and len(studies) == 1:
        initial["studies"] = [studies[0].pk]
    form = ShareCreateForm(request.POST if creating else None, initial=initial,
                           studies=studies, picks=picks, facility=facility)
    if creating and form.is_valid():
        try:
            created = share_create(
                facility=facility,
                patient_or_identity=patient or picks[0].patient,
                studies=list(form.cleaned_data.get("studies") or []),
                pacs_studies=[p.study for p in form.chosen_picks()],
                recipient=form.recipient(), created_by=request.user, request=request,
            )
        except SharingError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Share created. Its Access Page is ready to print."))
            return redirect("share-detail", created.share.pk)
    identity = patient or picks[0].patient
    ticked = {str(v) for v in (form["studies"].value() or [])} if studies is not None else set()
    ticked |= set(form["pick"].value() or []) if picks else set()
    return render(request, "sharing/share_new.html", {
        "form": form, "patient": patient, "identity": identity,
        "display_name": Patient(name=identity.name).display_name,
        "studies": studies, "picks": picks, "ticked": ticked, "dropped": dropped,
        "fax_available": fax_available,
    })


# What the access history calls each audited action on a share. The recipient's side
# (issue 5) records its own actions against the share; unknown ones show as recorded.
ACTION_LABELS = {
    "share.create": gettext_lazy("Share created"),
    "share.view": gettext_lazy("Share page viewed by staff"),
    "share.page.open": gettext_lazy("Access Page opened"),
    "share.page.download": gettext_lazy("Access Page downloaded"),
    "share.page.reissue": gettext_lazy("New Access Page and code issued"),
    "share.fax.queue": gettext_lazy("Fax queued"),
    "share.fax.resend": gettext_lazy("Fax queued again"),
    "share.fax.sent": gettext_lazy("Fax handed to the gateway"),
    "share.fax.failed": gettext_lazy("Fax failed"),
    "share.transfer.finish": gettext_lazy("Transfer finished"),
    "share.transfer.retry": gettext_lazy("Transfer retried"),
    "share.revoke": gettext_lazy("Share revoked"),
    "share.extend": gettext_lazy("Access extended"),
    "share.access": gettext_lazy("Opened by the recipient"),
    "share.access.denied": gettext_lazy("Refused: wrong code or date of birth"),
    "share.download": gettext_lazy("Exams downloaded by the recipient"),
    "share.study.view": gettext_lazy("Exam viewed by the recipient"),
    "share.access.refused": gettext_lazy("Refused: revoked, expired or locked"),
    "share.inbox.view": gettext_lazy("Share Inbox opened by the recipient"),
    "share.download.prepare": gettext_lazy("Disk image requested by the recipient"),
    "share.signout": gettext_lazy("Recipient left the Share Inbox"),
    "share.lock": gettext_lazy("Locked after too many wrong dates of birth"),
    "share.unlock": gettext_lazy("Unlocked"),
    "share.extend.support": gettext_lazy("Access extended by support"),
    "share.expire": gettext_lazy("Access expired"),
}


def _live_context(share: Share) -> dict:
    deliveries = list(share.deliveries.select_related("requested_by"))
    progress = share_transfer_progress(share)
    return {
        "share": share, "progress": progress, "deliveries": deliveries,
        "polling": share.is_transferring or any(d.is_pending for d in deliveries),
    }


@clerk_required
def share_detail(request: HttpRequest, share_id: int) -> HttpResponse:
    share = share_refresh(share=get_share_for_user(request.user, share_id))
    audit_record(request=request, action="share.view", obj=share,
                 patient_ref=share.patient_id)
    return render(request, "sharing/share_detail.html", {
        **_live_context(share), "history": audit_history(share, ACTION_LABELS),
        "max_months": settings.SHARE_MAX_MONTHS,
        "display_name": Patient(name=share.patient_name).display_name,
    })


@clerk_required
def share_live(request: HttpRequest, share_id: int) -> HttpResponse:
    """The part of the share page that moves (transfer, faxes); polled while it does."""
    share = share_refresh(share=get_share_for_user(request.user, share_id))
    return render(request, "sharing/_share_live.html", _live_context(share))


@clerk_required
def share_access_page(request: HttpRequest, share_id: int) -> HttpResponse:
    """The stored Access Page PDF: inline to print, or as a download. Never cached."""
    share = get_share_for_user(request.user, share_id)
    if share.is_revoked or not share.access_page:
        raise Http404
    return stored_page_response(request, share.access_page, action="share.page", obj=share,
                                patient_ref=share.patient_id,
                                filename=f"access-page-{share.pk}.pdf")


def _run(request: HttpRequest, share: Share, action, success: str) -> HttpResponse:
    return act_and_return(request, action, success=success, refusal=SharingError,
                          page="share-detail", pk=share.pk)


@require_POST
@clerk_required
def share_revoke_view(request: HttpRequest, share_id: int) -> HttpResponse:
    share = get_share_for_user(request.user, share_id)
    return _run(request, share, lambda: share_revoke(share=share, by=request.user, request=request),
                _("Share revoked. The security code no longer opens it."))


@require_POST
@clerk_required
def share_reissue_view(request: HttpRequest, share_id: int) -> HttpResponse:
    share = get_share_for_user(request.user, share_id)
    return _run(request, share, lambda: share_page_reissue(share=share, by=request.user,
                                                 request=request),
                _("New Access Page made with a new security code; the old page no longer "
                  "works. Print or fax the new one."))


@require_POST
@clerk_required
def share_retry_view(request: HttpRequest, share_id: int) -> HttpResponse:
    share = get_share_for_user(request.user, share_id)
    return _run(request, share,
                lambda: share_transfer_retry(share=share, requested_by=request.user,
                                             request=request),
                _("Retrieving the missing exams again."))


@require_POST
@clerk_required
def delivery_resend_view(request: HttpRequest, share_id: int, delivery_id: int) -> HttpResponse:
    share = get_share_for_user(request.user, share_id)
    delivery = get_object_or_404(Delivery, pk=delivery_id, share=share)
    return _run(request, share,
                lambda: delivery_resend(delivery=delivery, requested_by=request.user,
                                        request=request),
                _("The fax is queued to be sent again."))


@require_POST
@clerk_required
def share_unlock_view(request: HttpRequest, share_id: int) -> HttpResponse:
    share = get_share_for_user(request.user, share_id)
    return _run(request, share,
                lambda: share_lock_clear(share=share, by=request.user, now=timezone.now(),
                                         request=request),
                _("Share unlocked. The recipient can enter the code and date of birth again."))
