"""The clerical pages of received records. The requester's side: the studies a request
brought (on the request's page, polled while imports run), reconciling a study with the
facility's record of the patient, importing into the PACS and each import's results.
The asked facility's side, when it runs on this platform: its incoming requests, and
answering one from its own archive or PACS, or declining it."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from dicomgw import retrieve as pacs
from dicomgw.forms import PacsSearchForm, PatientSearchForm
from dicomgw.models import PacsNode, Patient, Study
from dicomgw.services import DicomGatewayError
from pockethealth.auth import clerk_required
from pockethealth.models import AuditEvent
from pockethealth.services import audit_record

from .forms import AnswerForm, DeclineForm, ImportForm, ReconcileForm
from .fulfil import (
    archive_candidates,
    fulfilments_of,
    incoming_requests,
    request_fulfil,
    request_fulfil_retry,
    request_incoming_decline,
    request_incoming_open,
)
from .imports import (
    identity_changes,
    reconcile_initial,
    request_import_retry,
    request_import_start,
    request_study_reconcile,
)
from .models import RecordRequest, RequestFulfilment, RequestImport, RequestStudy
from .services import RetrievalError, name_as_read
from .upload import DECLINABLE
from .views import get_request_for_user

PAGE_SIZE = 25
ARCHIVE_SEARCH_KEY = "incoming_archive_search"
PACS_HITS_KEY = "incoming_pacs_hits"


# --- The requester's side ---------------------------------------------------------------


def get_request_study_for_user(user, request_id: int, request_study_id: int) -> RequestStudy:
    record_request = get_request_for_user(user, request_id)
    return get_object_or_404(
        RequestStudy.objects.select_related("study__patient", "reconciled_by"),
        pk=request_study_id, request=record_request)


def get_import_for_user(user, request_id: int, import_id: int) -> RequestImport:
    record_request = get_request_for_user(user, request_id)
    return get_object_or_404(
        RequestImport.objects.select_related("node", "requested_by", "request_study__study",
                                             "request_study__request"),
        pk=import_id, request_study__request=record_request)


def studies_context(record_request: RecordRequest) -> dict:
    """What the received-studies part of a request's page shows: each study with its
    latest import, the PACS to import into, and whether anything is moving."""
    request_studies = list(record_request.request_studies.select_related(
        "study__patient", "reconciled_by").prefetch_related("imports__node"))
    for request_study in request_studies:
        imports = sorted(request_study.imports.all(), key=lambda job: job.created_at,
                         reverse=True)
        request_study.latest_import = imports[0] if imports else None
        request_study.imported = any(job.status == RequestImport.Status.COMPLETE
                                     for job in imports)
    fulfilments = list(record_request.fulfilments.select_related("facility"))
    live = (any(rs.latest_import and not rs.latest_import.is_finished for rs in request_studies)
            or any(not f.is_finished for f in fulfilments))
    to_import = [rs for rs in request_studies if not rs.imported]
    return {
        "record_request": record_request, "request_studies": request_studies,
        "fulfilments": fulfilments, "polling": live,
        "import_form": ImportForm(facility=record_request.facility),
        "can_import": (record_request.status == RecordRequest.Status.RECEIVED
                       and bool(to_import) and all(rs.is_reconciled for rs in to_import)),
        "unreconciled": sum(1 for rs in to_import if not rs.is_reconciled),
        "has_nodes": PacsNode.objects.filter(facility=record_request.facility,
                                             is_active=True).exists(),
    }


@clerk_required
def request_studies(request: HttpRequest, request_id: int) -> HttpResponse:
    """The received studies of a request, polled by its page while imports run."""
    record_request = get_request_for_user(request.user, request_id)
    response = render(request, "retrieval/review/_request_studies.html",
                      studies_context(record_request))
    if request.htmx and record_request.status == RecordRequest.Status.IMPORTED:
        # The last import finished the request: the whole page (status, progress,
        # history) says so. The page then has nothing left to poll.
        response["HX-Refresh"] = "true"
    return response


@clerk_required
def request_study_reconcile_view(request: HttpRequest, request_id: int,
                                 request_study_id: int) -> HttpResponse:
    """Map a received study to the facility's patient; the changes the copies will carry
    are previewed as the clerk types (htmx posts with ``preview``)."""
    request_study = get_request_study_for_user(request.user, request_id, request_study_id)
    record_request = request_study.request
    study = request_study.study
    if study is None:
        messages.error(request, _("This study is no longer in the archive."))
        return redirect("request-detail", record_request.pk)
    previewing = request.method == "POST" and "preview" in request.POST
    form = ReconcileForm(request.POST if request.method == "POST" else None,
                         initial=ReconcileForm.initial_from(reconcile_initial(request_study)))
    if request.method == "POST" and not previewing and form.is_valid():
        try:
            request_study_reconcile(request_study=request_study, by=request.user,
                                    request=request, **form.identity())
        except RetrievalError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Study reconciled. Its copies sent to the PACS will "
                                        "carry your patient's MRN and name."))
            return redirect(f"{record_request_url(record_request)}#received-studies")
    if form.is_bound:
        identity = form.identity() if form.is_valid() else None
    else:
        identity = reconcile_initial(request_study)
    changes = identity_changes(
        study, patient_id=identity["local_patient_id"],
        patient_name=identity["local_patient_name"],
        accession_number=identity["local_accession_number"]) if identity else None
    context = {"form": form, "request_study": request_study, "record_request": record_request,
               "study": study, "patient": study.patient, "changes": changes,
               "display_name": name_as_read(record_request.patient_name)}
    if previewing and request.htmx:
        return render(request, "retrieval/review/_changes.html", context)
    return render(request, "retrieval/review/reconcile.html", context)


def record_request_url(record_request: RecordRequest) -> str:
    return reverse("request-detail", args=[record_request.pk])


@require_POST
@clerk_required
def request_import_view(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_request_for_user(request.user, request_id)
    form = ImportForm(request.POST, facility=record_request.facility)
    if not form.is_valid():
        messages.error(request, _("Choose one of your facility's PACS."))
    else:
        try:
            jobs = request_import_start(record_request=record_request,
                                        node=form.cleaned_data["node"], by=request.user,
                                        request=request)
        except RetrievalError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, ngettext(
                "Importing %(count)s study into %(node)s.",
                "Importing %(count)s studies into %(node)s.", len(jobs)) % {
                    "count": len(jobs), "node": form.cleaned_data["node"].name})
    return redirect(f"{record_request_url(record_request)}#received-studies")


@clerk_required
def request_import_detail(request: HttpRequest, request_id: int, import_id: int
                          ) -> HttpResponse:
    """One import's progress and its results, counted by DIMSE status, with every image
    the PACS did not accept."""
    job = get_import_for_user(request.user, request_id, import_id)
    results = job.results.all()
    by_status: dict[tuple, int] = {}
    for status, outcome in results.values_list("status", "outcome"):
        by_status[(status, outcome)] = by_status.get((status, outcome), 0) + 1
    problems = (results.exclude(outcome="success").select_related("instance__series")
                .order_by("instance__series__series_number", "instance__instance_number"))
    context = {"job": job, "record_request": job.request_study.request,
               "study": job.request_study.study,
               "statuses": sorted(by_status.items(), key=lambda item: (item[0][0] is None,
                                                                        item[0][0] or 0)),
               "problems": problems}
    if request.htmx:
        return render(request, "retrieval/review/_import_progress.html", context)
    audit_record(request=request, action="request.import.view", obj=job.request_study.request,
                 detail={"import": job.pk})
    return render(request, "retrieval/review/import_detail.html", context)


@require_POST
@clerk_required
def request_import_retry_view(request: HttpRequest, request_id: int, import_id: int
                              ) -> HttpResponse:
    job = get_import_for_user(request.user, request_id, import_id)
    try:
        request_import_retry(request_import=job, by=request.user, request=request)
    except RetrievalError as exc:
        messages.error(request, str(exc))
    return redirect("request-import", request_id, job.pk)


# --- The asked facility's side ---------------------------------------------------------


def get_incoming_for_user(user, request_id: int) -> RecordRequest:
    """A request addressed to the user's facility by another one, or 404."""
    return get_object_or_404(
        incoming_requests(facility=user.facility).select_related("target_facility"),
        pk=request_id)


@clerk_required
def incoming_list(request: HttpRequest) -> HttpResponse:
    requests = incoming_requests(facility=request.user.facility)
    page = Paginator(requests, PAGE_SIZE).get_page(request.GET.get("page"))
    audit_record(request=request, action="request.incoming.browse",
                 object_type="retrieval.recordrequest")
    for record_request in page:
        record_request.display_name = name_as_read(record_request.patient_name)
    return render(request, "retrieval/review/incoming_list.html", {"page": page})


def _archive_search(request: HttpRequest, record_request: RecordRequest) -> tuple:
    """The archive search of this request's page: the one the clerk last made for it,
    else the studies whose patient matches the request's."""
    saved = request.session.get(ARCHIVE_SEARCH_KEY) or {}
    if saved.get("request") == record_request.pk:
        form = PatientSearchForm(saved["criteria"])
        if form.is_valid():
            patients = form.filter(Patient.objects.filter(facility=request.user.facility))
            studies = (Study.objects.filter(patient__in=patients).select_related("patient")
                       .order_by("-study_date", "-study_time", "-id"))
            return form, studies
    family = record_request.patient_name.split("=")[0].split("^")[0]
    form = PatientSearchForm(initial={"q": family,
                                      "birth_date": record_request.patient_birth_date})
    return form, archive_candidates(record_request=record_request,
                                    facility=request.user.facility)


def _pacs_hits(request: HttpRequest, record_request: RecordRequest):
    shown = request.session.get(PACS_HITS_KEY) or {}
    if shown.get("request") != record_request.pk:
        return None, []
    node = PacsNode.objects.filter(pk=shown.get("node") or 0, facility=request.user.facility,
                                   is_active=True).first()
    if node is None:
        return None, []
    return node, [pacs.StudyHit.from_session(hit) for hit in shown.get("hits") or []]


def _pacs_form(request: HttpRequest, record_request: RecordRequest, data=None):
    facility = request.user.facility
    family = record_request.patient_name.split("=")[0].split("^")[0]
    return PacsSearchForm(data, facility=facility, initial={
        "node": PacsNode.objects.filter(facility=facility, is_active=True).first(),
        "patient_name": family, "birth_date": record_request.patient_birth_date})


def incoming_context(request: HttpRequest, record_request: RecordRequest) -> dict:
    facility = request.user.facility
    archive_form, studies = _archive_search(request, record_request)
    node, hits = _pacs_hits(request, record_request)
    fulfilments = list(fulfilments_of(record_request=record_request, facility=facility))
    return {
        "record_request": record_request, "display_name": name_as_read(
            record_request.patient_name),
        "archive_form": archive_form, "studies": studies[:100],
        "pacs_form": _pacs_form(request, record_request), "pacs_node": node, "hits": hits,
        "has_nodes": PacsNode.objects.filter(facility=facility, is_active=True).exists(),
        "fulfilments": fulfilments, "polling": any(not f.is_finished for f in fulfilments),
        "decline_form": DeclineForm(),
        "answerable": record_request.status in (
            RecordRequest.Status.SENT, RecordRequest.Status.OPENED,
            RecordRequest.Status.UPLOADING, RecordRequest.Status.RECEIVED),
        "declinable": record_request.status in DECLINABLE,
    }


@clerk_required
def incoming_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = request_incoming_open(
        record_request=get_incoming_for_user(request.user, request_id), request=request)
    return render(request, "retrieval/review/incoming_detail.html",
                  incoming_context(request, record_request))


@require_POST
@clerk_required
def incoming_archive_search(request: HttpRequest, request_id: int) -> HttpResponse:
    """Search the facility's archive for the requested patient (kept in the session,
    never in a URL)."""
    record_request = get_incoming_for_user(request.user, request_id)
    form = PatientSearchForm(request.POST)
    if form.is_valid():
        request.session[ARCHIVE_SEARCH_KEY] = {"request": record_request.pk,
                                               "criteria": form.serialised()}
        audit_record(request=request, action="archive.search", object_type="dicomgw.patient",
                     detail={"record_request": record_request.pk})
    if request.htmx:
        context = incoming_context(request, record_request)
        if not form.is_valid():
            context["archive_form"] = form
        return render(request, "retrieval/review/_incoming_archive.html", context)
    return redirect("request-incoming", record_request.pk)


@require_POST
@clerk_required
def incoming_pacs_search(request: HttpRequest, request_id: int) -> HttpResponse:
    """Search a PACS of the facility (C-FIND) for the requested patient's exams."""
    record_request = get_incoming_for_user(request.user, request_id)
    form = _pacs_form(request, record_request, data=request.POST)
    error = ""
    if form.is_valid():
        node = form.cleaned_data["node"]
        hits = []
        try:
            hits = pacs.pacs_search(node=node, criteria=form.criteria())
        except DicomGatewayError as exc:
            error = str(exc)
        request.session[PACS_HITS_KEY] = {"request": record_request.pk, "node": node.pk,
                                          "hits": [hit.as_session() for hit in hits]}
        audit_record(request=request, action="pacs.search", obj=node,
                     outcome=AuditEvent.Outcome.FAILURE if error else AuditEvent.Outcome.SUCCESS,
                     detail={"results": len(hits), "record_request": record_request.pk})
    if request.htmx:
        context = incoming_context(request, record_request)
        context.update({"pacs_form": form, "pacs_error": error})
        return render(request, "retrieval/review/_incoming_pacs.html", context)
    if error:
        messages.error(request, error)
    return redirect("request-incoming", record_request.pk)


@require_POST
@clerk_required
def incoming_answer(request: HttpRequest, request_id: int) -> HttpResponse:
    """Send the ticked exams to the requesting facility."""
    record_request = get_incoming_for_user(request.user, request_id)
    node, hits = _pacs_hits(request, record_request)
    by_uid = {hit.study_instance_uid: hit for hit in hits}
    form = AnswerForm(request.POST, facility=request.user.facility, offered_uids=list(by_uid))
    if not form.is_valid():
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, error)
        return redirect("request-incoming", record_request.pk)
    try:
        request_fulfil(record_request=record_request, facility=request.user.facility,
                       by=request.user, studies=list(form.cleaned_data["studies"]),
                       pacs_hits=[(node, by_uid[uid]) for uid in form.cleaned_data["study_uids"]],
                       request=request)
    except RetrievalError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("The exams are being sent to %(facility)s.") % {
            "facility": record_request.facility.name})
    return redirect("request-incoming", record_request.pk)


@clerk_required
def incoming_progress(request: HttpRequest, request_id: int) -> HttpResponse:
    """The answers' progress, polled while one is under way."""
    record_request = get_incoming_for_user(request.user, request_id)
    fulfilments = list(fulfilments_of(record_request=record_request,
                                      facility=request.user.facility))
    return render(request, "retrieval/review/_fulfilments.html", {
        "record_request": record_request, "fulfilments": fulfilments,
        "polling": any(not f.is_finished for f in fulfilments)})


@require_POST
@clerk_required
def incoming_retry(request: HttpRequest, request_id: int, fulfilment_id: int) -> HttpResponse:
    record_request = get_incoming_for_user(request.user, request_id)
    fulfilment = get_object_or_404(RequestFulfilment, pk=fulfilment_id, request=record_request,
                                   facility=request.user.facility)
    try:
        request_fulfil_retry(fulfilment=fulfilment, by=request.user, request=request)
    except RetrievalError as exc:
        messages.error(request, str(exc))
    return redirect("request-incoming", record_request.pk)


@require_POST
@clerk_required
def incoming_decline(request: HttpRequest, request_id: int) -> HttpResponse:
    record_request = get_incoming_for_user(request.user, request_id)
    form = DeclineForm(request.POST)
    if not form.is_valid():
        for error in form.errors.get("reason", []):
            messages.error(request, error)
        return redirect("request-incoming", record_request.pk)
    try:
        request_incoming_decline(record_request=record_request, facility=request.user.facility,
                                 by=request.user, reason=form.cleaned_data["reason"],
                                 request=request)
    except RetrievalError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("Request declined. %(facility)s sees your reason.") % {
            "facility": record_request.facility.name})
    return redirect("request-incoming", record_request.pk)
