"""The patient's signing page reached through a signing link: no account, the link is
the key. It works for one signature and until it expires; an unknown, used, replaced or
expired link gets one answer."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache

from pockethealth.models import AuditEvent
from pockethealth.services import audit_record

from .forms import SignatureForm
from .models import PatientConsent
from .services import consent_link_find
from .views import sign_with, signing_context


@never_cache
def consent_sign_view(request: HttpRequest, token: str) -> HttpResponse:
    record_request = consent_link_find(token=token)
    if record_request is None:
        return render(request, "retrieval/consent_unavailable.html", status=404)
    form = SignatureForm(request.POST if request.method == "POST" else None)
    if request.method == "POST":
        if form.is_valid() and sign_with(form, record_request, request,
                                         channel=PatientConsent.Channel.LINK):
            return redirect("consent-done")
    else:
        audit_record(action="request.consent.view", actor_type=AuditEvent.ActorType.ANONYMOUS,
                     actor_ref="patient", request=request, facility=record_request.facility,
                     obj=record_request, patient_ref=record_request.patient_id or "")
    return render(request, "retrieval/sign.html", signing_context(record_request, form))


@never_cache
def consent_done(request: HttpRequest) -> HttpResponse:
    return render(request, "retrieval/signed.html", {"in_clerk_session": False})
