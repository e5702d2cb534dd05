"""The lists of the clerical pages: a facility's rows found by a search that is POSTed
and kept in the session (so names and MRNs never appear in a URL, browser history or
access log), a page at a time; and the audited history of one object."""

from collections.abc import Mapping

from django import forms
from django.core.paginator import Paginator
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .models import AuditEvent
from .services import audit_record

PAGE_SIZE = 25
HISTORY_LIMIT = 200


def searched_list(request: HttpRequest, rows: QuerySet, *, form_class: type[forms.Form],
                  session_key: str, audit_action: str, template: str,
                  rows_template: str) -> HttpResponse:
    """The page of ``rows`` that ``?page=`` asks for, narrowed by the search kept in the
    session under ``session_key``. A valid POSTed search replaces the kept one and is
    audited, then the page is shown again by redirect; ``?clear=1`` forgets it. The form
    gives ``serialised()`` (what the session keeps) and ``filter(rows)``. An htmx request
    gets ``rows_template`` alone, without a redirect."""
    if request.method == "POST":
        form = form_class(request.POST)
        if form.is_valid():
            request.session[session_key] = form.serialised()
            audit_record(request=request, action=audit_action,
                         object_type=rows.model._meta.label_lower)
            if not request.htmx:
                return redirect(request.path)
    else:
        if request.GET.get("clear"):
            request.session.pop(session_key, None)
        form = form_class(request.session.get(session_key) or None)
    if form.is_bound and form.is_valid():
        rows = form.filter(rows)
    page = Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, rows_template if request.htmx else template,
                  {"form": form, "page": page})


def audit_history(obj: Model, labels: Mapping[str, str]) -> list[tuple[AuditEvent, str]]:
    """The latest audited events of ``obj``, newest first, each with what ``labels``
    calls its action (unknown actions show as recorded)."""
    events = AuditEvent.objects.filter(
        object_type=obj._meta.label_lower, object_id=str(obj.pk),
    ).select_related("actor_user").order_by("-time", "-id")[:HISTORY_LIMIT]
    return [(event, labels.get(event.action, event.action)) for event in events]
