"""A facility's own upload host name (``Facility.upload_host``, printed on its Request
Pages): on that host this server is only the facility's upload portal. The bare address,
and any page that is not the portal's, lead to the portal (its link token, in the query
string, kept); the portal's pages and the static files are served as on the main site.
"""

import time

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.request import split_domain_port
from django.urls import reverse

from pockethealth.models import Facility

# Host name -> (the facility's short name or None, when to look again). A facility's
# host name changes seldom; looking it up on every request would cost a query each.
_hosts: dict[str, tuple[str | None, float]] = {}
HOST_CACHE_SECONDS = 60
HOST_CACHE_SIZE = 1000


def facility_for_host(host: str, *, now: float | None = None) -> str | None:
    """The short name of the facility whose upload host ``host`` is, or None."""
    now = time.monotonic() if now is None else now
    known = _hosts.get(host)
    if known is not None and known[1] > now:
        return known[0]
    short_name = Facility.objects.filter(upload_host=host).values_list(
        "short_name", flat=True).first() if host else None
    if len(_hosts) >= HOST_CACHE_SIZE:
        _hosts.clear()
    _hosts[host] = (short_name, now + HOST_CACHE_SECONDS)
    return short_name


def facility_hosts_forget() -> None:
    """Look every host up again (after a facility's host name changed)."""
    _hosts.clear()


class UploadHostMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if path.startswith(settings.STATIC_URL):  # served on every host, looked up by none
            return self.get_response(request)
        short_name = facility_for_host(split_domain_port(request.get_host())[0])
        if short_name is not None:
            portal = reverse("upload-portal", args=[short_name])
            if not (path == portal or path.startswith(f"{portal}/")):
                query = request.META.get("QUERY_STRING", "")
                return HttpResponseRedirect(f"{portal}?{query}" if query else portal)
        return self.get_response(request)
