"""Platform services: the audit trail and the client address of a request."""

import hashlib
import ipaddress

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

from .models import AuditEvent, Facility, StaffUser


def client_address(request: HttpRequest) -> str | None:
    """The address of the client. ``X-Forwarded-For`` is believed only when the direct
    peer is one of ``TRUSTED_PROXIES``; then the right-most address that is not itself a
    trusted proxy is the client."""
    remote = request.META.get("REMOTE_ADDR") or None
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if remote and forwarded and remote in settings.TRUSTED_PROXIES:
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if hop in settings.TRUSTED_PROXIES:
                continue
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                break
    return remote


def audit_record(
    *,
    action: str,
    outcome: str = AuditEvent.Outcome.SUCCESS,
    request: HttpRequest | None = None,
    user: StaffUser | None = None,
    actor_type: str | None = None,
    actor_ref: str = "",
    facility: Facility | None = None,
    obj=None,
    object_type: str = "",
    object_id: str = "",
    patient_ref: str | int | None = None,
    detail: dict | None = None,
) -> AuditEvent:
    """Append one event to the audit trail. The actor is the request's signed-in staff
    user unless given; ``obj`` (a model instance) fills the object type and id."""
    if user is None and request is not None and request.user.is_authenticated:
        user = request.user
    if actor_type is None:
        actor_type = AuditEvent.ActorType.USER if user else AuditEvent.ActorType.ANONYMOUS
    if facility is None and user is not None:
        facility = user.facility
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
    return AuditEvent.objects.create(
        action=action,
        outcome=outcome,
        actor_type=actor_type,
        actor_user=user,
        actor_ref=actor_ref[:150],
        facility=facility,
        object_type=object_type,
        object_id=object_id,
        patient_ref="" if patient_ref is None else str(patient_ref),
        client_address=client_address(request) if request is not None else None,
        detail=detail or {},
    )


# --- Second factor -----------------------------------------------------------------


def totp_device_start(*, user: StaffUser):
    """An unconfirmed authenticator for ``user`` (replacing any earlier unconfirmed one);
    it counts only after ``totp_device_confirm``."""
    from django_otp.plugins.otp_totp.models import TOTPDevice

    TOTPDevice.objects.filter(user=user, confirmed=False).delete()
    return TOTPDevice.objects.create(user=user, name="Authenticator app", confirmed=False)


def totp_device_confirm(*, device, token: str) -> bool:
    if not device.verify_token(token):
        return False
    device.confirmed = True
    device.save(update_fields=["confirmed"])
    return True


def static_codes_issue(*, user: StaffUser, count: int | None = None) -> list[str]:
    """A fresh set of single-use backup codes; earlier codes stop working."""
    from django_otp.plugins.otp_static.models import StaticDevice, StaticToken

    count = count or settings.OTP_STATIC_BACKUP_CODES
    device, _ = StaticDevice.objects.get_or_create(
        user=user, name="Backup codes", defaults={"confirmed": True}
    )
    device.token_set.all().delete()
    codes = [StaticToken.random_token() for _ in range(count)]
    StaticToken.objects.bulk_create(StaticToken(device=device, token=c) for c in codes)
    return codes


# --- Sign-in throttling --------------------------------------------------------------


def _throttle_keys(*, username: str, address: str | None) -> list[str]:
    digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
    keys = [f"login-fail:user:{digest}"]
    if address:
        keys.append(f"login-fail:addr:{address}")
    return keys


def login_allowed(*, username: str, address: str | None) -> bool:
    """False once a user name, or a client address, has had too many wrong passwords in
    the window; the counters live in the shared cache so every web process agrees."""
    counts = cache.get_many(_throttle_keys(username=username, address=address))
    return all(count < settings.LOGIN_FAILURE_LIMIT for count in counts.values())


def login_failure_record(*, username: str, address: str | None) -> None:
    for key in _throttle_keys(username=username, address=address):
        # add() starts the window; incr() is atomic in Redis.
        cache.add(key, 0, timeout=settings.LOGIN_FAILURE_WINDOW_SECONDS)
        try:
            cache.incr(key)
        except ValueError:
            cache.set(key, 1, timeout=settings.LOGIN_FAILURE_WINDOW_SECONDS)


def login_failures_clear(*, username: str) -> None:
    cache.delete_many(_throttle_keys(username=username, address=None))
