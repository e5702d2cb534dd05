import base64

import segno
from django.contrib import auth, messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_POST
from django_otp import devices_for_user, match_token, user_has_device
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from dicomgw.models import Patient, Study

from .auth import clerk_required, safe_next, second_factor_url
from .forms import PasswordLoginForm, TokenForm
from .models import AuditEvent
from .services import (
    audit_record,
    client_address,
    login_allowed,
    login_failure_record,
    login_failures_clear,
    static_codes_issue,
    totp_device_confirm,
    totp_device_start,
)

ENROL_DEVICE_SESSION_KEY = "enrol_totp_device_id"
FRESH_CODES_SESSION_KEY = "fresh_backup_codes"


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
def login_view(request: HttpRequest) -> HttpResponse:
    next_url = safe_next(request)
    if request.user.is_authenticated:
        if request.user.is_verified():
            return redirect(next_url)
        return redirect(second_factor_url(request, next_url))
    form = PasswordLoginForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        username = form.cleaned_data["username"]
        address = client_address(request)
        if not login_allowed(username=username, address=address):
            audit_record(request=request, action="login.password",
                         outcome=AuditEvent.Outcome.DENIED, actor_ref=username,
                         detail={"reason": "throttled"})
            form.add_error(None, _(
                "Too many unsuccessful attempts. Wait 15 minutes, or ask your facility "
                "administrator to reset your password."
            ))
            return render(request, "account/login.html", {"form": form, "next": next_url})
        user = auth.authenticate(request, username=username,
                                 password=form.cleaned_data["password"])
        if user is None:
            login_failure_record(username=username, address=address)
            audit_record(
                request=request, action="login.password",
                outcome=AuditEvent.Outcome.FAILURE, actor_ref=username,
            )
            form.add_error(None, _("That user name and password do not match an account."))
        else:
            login_failures_clear(username=username)
            auth.login(request, user)
            audit_record(request=request, action="login.password", user=user)
            return redirect(second_factor_url(request, next_url))
    return render(request, "account/login.html", {"form": form, "next": next_url})


@sensitive_post_parameters("token")
@login_required
@never_cache
def otp_verify(request: HttpRequest) -> HttpResponse:
    next_url = safe_next(request)
    if request.user.is_verified():
        return redirect(next_url)
    if not user_has_device(request.user):
        return redirect(f"{reverse('otp-enrol')}?{urlencode({'next': next_url})}")
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        device = match_token(request.user, form.cleaned_data["token"])
        if device is None:
            audit_record(request=request, action="login.otp", outcome=AuditEvent.Outcome.FAILURE)
            form.add_error("token", otp_failure_message(request.user))
        else:
            otp_login(request, device)
            audit_record(
                request=request, action="login", detail={"second_factor": device._meta.model_name}
            )
            return redirect(next_url)
    return render(request, "account/verify.html", {"form": form, "next": next_url})


def otp_failure_message(user) -> str:
    """Say so when django-otp's throttling, not the code itself, refused the attempt."""
    waits = []
    for device in devices_for_user(user):
        allowed, data = device.verify_is_allowed()
        if not allowed and data and data.get("locked_until"):
            waits.append((data["locked_until"] - timezone.now()).total_seconds())
    if waits:
        seconds = max(1, int(min(waits)) + 1)
        return ngettext(
            "Too many wrong codes. Wait %(seconds)d second, then try again.",
            "Too many wrong codes. Wait %(seconds)d seconds, then try again.",
            seconds,
        ) % {"seconds": seconds}
    return _("That code is not valid. Codes change every 30 seconds; each works once.")


@sensitive_post_parameters("token")
@login_required
@never_cache
def otp_enrol(request: HttpRequest) -> HttpResponse:
    """Set up an authenticator app: scan the QR code, type one code to confirm. Open to a
    user with no second factor yet, or to a verified user replacing theirs."""
    next_url = safe_next(request)
    user = request.user
    if user_has_device(user) and not user.is_verified():
        return redirect(f"{reverse('otp-verify')}?{urlencode({'next': next_url})}")
    device = TOTPDevice.objects.filter(
        pk=request.session.get(ENROL_DEVICE_SESSION_KEY), user=user, confirmed=False
    ).first()
    if device is None:
        device = totp_device_start(user=user)
        request.session[ENROL_DEVICE_SESSION_KEY] = device.pk
    form = TokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if totp_device_confirm(device=device, token=form.cleaned_data["token"]):
            TOTPDevice.objects.filter(user=user, confirmed=True).exclude(pk=device.pk).delete()
            del request.session[ENROL_DEVICE_SESSION_KEY]
            otp_login(request, device)
            request.session[FRESH_CODES_SESSION_KEY] = static_codes_issue(user=user)
            audit_record(request=request, action="otp.enrol")
            return redirect(f"{reverse('otp-backup-codes')}?{urlencode({'next': next_url})}")
        audit_record(request=request, action="otp.enrol", outcome=AuditEvent.Outcome.FAILURE)
        form.add_error("token", _("That code does not match. Check the time on your phone."))
    qr_svg = segno.make(device.config_url, error="m").svg_inline(scale=5, border=2)
    secret = base64.b32encode(device.bin_key).decode().rstrip("=")
    return render(request, "account/enrol.html", {
        "form": form, "next": next_url, "qr_svg": qr_svg,
        "secret_groups": [secret[i:i + 4] for i in range(0, len(secret), 4)],
    })


@clerk_required
@never_cache
def backup_codes(request: HttpRequest) -> HttpResponse:
    """Shows freshly issued backup codes once; POST issues a new set."""
    if request.method == "POST":
        request.session[FRESH_CODES_SESSION_KEY] = static_codes_issue(user=request.user)
        audit_record(request=request, action="otp.backup_codes_issued")
        return redirect(f"{reverse('otp-backup-codes')}?{urlencode({'next': safe_next(request)})}")
    codes = request.session.pop(FRESH_CODES_SESSION_KEY, None)
    return render(request, "account/backup_codes.html", {
        "codes": codes, "next": safe_next(request),
    })


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        audit_record(request=request, action="logout")
    auth.logout(request)
    messages.info(request, _("You are signed out."))
    return redirect("login")


def admin_login_redirect(request: HttpRequest, extra_context=None) -> HttpResponse:
    """The admin signs in through the same password + second-factor pages."""
    next_url = request.GET.get("next") or reverse("admin:index")
    if request.user.is_authenticated and request.user.is_verified() and not request.user.is_staff:
        messages.error(request, _("Your account does not have access to administration."))
        return redirect("clerk-home")
    return redirect(f"{reverse('login')}?{urlencode({'next': next_url})}")


@clerk_required
def clerk_home(request: HttpRequest) -> HttpResponse:
    facility = request.user.facility
    totals = Study.objects.filter(facility=facility).aggregate(
        studies=Count("id"), images=Sum("num_instances"), size=Sum("total_bytes")
    )
    recent = (
        Study.objects.filter(facility=facility)
        .select_related("patient")
        .order_by("-created_at")[:8]
    )
    return render(request, "clerk/home.html", {
        "patient_count": Patient.objects.filter(facility=facility).count(),
        "totals": totals,
        "recent_studies": recent,
    })
