from django import template

register = template.Library()


@register.inclusion_tag("retrieval/review/_request_studies.html", takes_context=True)
def request_studies_panel(context, record_request):
    """The received studies of ``record_request``, for its page (the part
    ``review_views.request_studies`` serves again while imports run)."""
    from ..review_views import studies_context

    return {**studies_context(record_request), "request": context.get("request"),
            "csrf_token": context.get("csrf_token")}


@register.simple_tag
def incoming_waiting(facility) -> int:
    """How many requests of other facilities wait for ``facility``'s answer."""
    from ..fulfil import incoming_requests
    from ..models import RecordRequest

    if facility is None:
        return 0
    return incoming_requests(facility=facility).filter(
        status__in=[RecordRequest.Status.SENT, RecordRequest.Status.OPENED]).count()
