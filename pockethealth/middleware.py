import zoneinfo

from django.utils import timezone


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
