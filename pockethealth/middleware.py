import zoneinfo

from django.conf import settings
from django.utils import timezone


class TrustedProxyMiddleware:
    """Behind a proxy that ends TLS (one of ``TRUSTED_PROXIES``), a request that reached
    the proxy over https is an https request here too, as its ``X-Forwarded-Proto``
    says: the addresses this server writes (the viewer's DICOMweb root, redirects),
    its cookies' Secure flag and the CSRF origin check then agree with the browser's
    page. From any other peer the header is ignored: a client cannot claim https."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        meta = request.META
        if meta.get("REMOTE_ADDR") in settings.TRUSTED_PROXIES:
            proto = meta.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                meta["wsgi.url_scheme"] = proto
        return self.get_response(request)


class FacilityTimezoneMiddleware:
    """Show times in the signed-in user's facility's time zone (they are stored in UTC)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        facility = getattr(getattr(request, "user", None), "facility", None)
        if facility is not None:
            try:
                timezone.activate(zoneinfo.ZoneInfo(facility.time_zone))
            except zoneinfo.ZoneInfoNotFoundError:
                timezone.deactivate()
        else:
            timezone.deactivate()
        return self.get_response(request)
