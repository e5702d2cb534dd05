"""Access checks for the clerical side: a password and a second factor, every time."""

from functools import wraps
from urllib.parse import urlencode

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme


def safe_next(request, default: str = "") -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default or reverse("clerk-home")


def second_factor_url(request, next_url: str) -> str:
    from django_otp import user_has_device

    name = "otp-verify" if user_has_device(request.user) else "otp-enrol"
    return f"{reverse(name)}?{urlencode({'next': next_url})}"


def clerk_required(view):
    """The view needs a staff user of a facility whose session has passed the second
    factor. A password-only session is sent to the second-factor step."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        user = request.user
        if not user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not user.is_verified():
            return redirect(second_factor_url(request, request.get_full_path()))
        if user.facility_id is None and user.is_staff:
            # Platform support works in the administration site, not a facility's pages.
            return redirect("admin:index")
        if user.facility_id is None or not user.is_active:
            raise PermissionDenied
        return view(request, *args, **kwargs)

    return wrapper
