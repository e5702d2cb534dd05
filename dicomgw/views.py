import datetime

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Max
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from pockethealth.auth import clerk_required
from pockethealth.models import AuditEvent
from pockethealth.services import audit_record

from . import retrieve as pacs
from .forms import NodeForm, PacsSearchForm, PatientSearchForm, PushForm, RetrieveForm
from .models import PacsNode, Patient, PushJob, RetrieveJob, Study
from .services import DicomGatewayError

PAGE_SIZE = 25


def get_patient_for_user(user, patient_id: int) -> Patient:
    return get_object_or_404(Patient, pk=patient_id, facility=user.facility)


def get_study_for_user(user, study_id: int) -> Study:
    return get_object_or_404(
        Study.objects.select_related("patient"), pk=study_id, facility=user.facility
    )


SEARCH_SESSION_KEY = "archive_patient_search"


@clerk_required
def patient_list(request: HttpRequest) -> HttpResponse:
    """Patients of the clerk's facility. A search is POSTed and kept in the session, so
    names, MRNs and birth dates never appear in a URL, browser history or access log."""
    if request.method == "POST":
        form = PatientSearchForm(request.POST)
        if form.is_valid():
            request.session[SEARCH_SESSION_KEY] = form.serialised()
            audit_record(request=request, action="archive.search",
                         object_type="dicomgw.patient")
            if not request.htmx:
                return redirect("archive-patients")
    else:
        if request.GET.get("clear"):
            request.session.pop(SEARCH_SESSION_KEY, None)
        form = PatientSearchForm(request.session.get(SEARCH_SESSION_KEY) or None)
        if not request.htmx:
            audit_record(request=request, action="archive.browse",
                         object_type="dicomgw.patient")
    patients = Patient.objects.filter(facility=request.user.facility)
    if form.is_bound and form.is_valid():
        patients = form.filter(patients)
    patients = patients.annotate(
        study_count=Count("studies"), latest_study=Max("studies__study_date")
    ).order_by("name_search", "birth_date", "id")
    page = Paginator(patients, PAGE_SIZE).get_page(request.GET.get("page"))
    template = "archive/_patient_rows.html" if request.htmx else "archive/patient_list.html"
    return render(request, template, {"form": form, "page": page})


@clerk_required
def patient_detail(request: HttpRequest, patient_id: int) -> HttpResponse:
    patient = get_patient_for_user(request.user, patient_id)
    studies = patient.studies.order_by("-study_date", "-study_time", "-id")
    audit_record(
        request=request, action="archive.view_patient", obj=patient, patient_ref=patient.pk
    )
    return render(request, "archive/patient_detail.html", {
        "patient": patient, "studies": studies, "age": age_on(patient.birth_date),
    })


@clerk_required
def study_detail(request: HttpRequest, study_id: int) -> HttpResponse:
    study = get_study_for_user(request.user, study_id)
    audit_record(
        request=request, action="archive.view_study", obj=study, patient_ref=study.patient_id
    )
    return render(request, "archive/study_detail.html", {
        "study": study, "patient": study.patient, "series_list": study.series.all(),
    })


def age_on(birth_date: datetime.date | None, today: datetime.date | None = None) -> int | None:
    if birth_date is None:
        return None
    today = today or datetime.date.today()
    before_birthday = (today.month, today.day) < (birth_date.month, birth_date.day)
    return today.year - birth_date.year - before_birthday


# --- The PACS link -----------------------------------------------------------------

PACS_SEARCH_SESSION_KEY = "pacs_search"
PACS_HITS_SESSION_KEY = "pacs_search_hits"
RECENT_JOBS = 50


def get_node_for_user(user, node_id: int) -> PacsNode:
    return get_object_or_404(PacsNode, pk=node_id, facility=user.facility, is_active=True)


def get_retrieve_for_user(user, job_id: int) -> RetrieveJob:
    return get_object_or_404(
        RetrieveJob.objects.select_related("node", "study__patient", "requested_by"),
        pk=job_id, facility=user.facility,
    )


def get_push_for_user(user, job_id: int) -> PushJob:
    return get_object_or_404(
        PushJob.objects.select_related("node", "study__patient", "requested_by"),
        pk=job_id, facility=user.facility,
    )


@clerk_required
def pacs_search(request: HttpRequest) -> HttpResponse:
    """Search a PACS of the clerk's facility. The criteria are POSTed and kept in the
    session, never put in a URL; the results come back by htmx (or on the redirect)."""
    facility = request.user.facility
    if request.method == "POST":
        form = PacsSearchForm(request.POST, facility=facility)
        if form.is_valid():
            request.session[PACS_SEARCH_SESSION_KEY] = form.serialised()
            if not request.htmx:
                return redirect("pacs-search")
    else:
        if request.GET.get("clear"):
            request.session.pop(PACS_SEARCH_SESSION_KEY, None)
            request.session.pop(PACS_HITS_SESSION_KEY, None)
        saved = request.session.get(PACS_SEARCH_SESSION_KEY)
        form = PacsSearchForm(saved or None, initial={"node": _default_node(facility)},
                              facility=facility)
    hits, error = None, ""
    if form.is_bound and form.is_valid():
        node = form.cleaned_data["node"]
        try:
            hits = pacs.pacs_search(node=node, criteria=form.criteria())
        except DicomGatewayError as exc:
            error = str(exc)
        request.session[PACS_HITS_SESSION_KEY] = {
            "node": node.pk, "hits": [hit.as_session() for hit in hits or []],
        }
        audit_record(request=request, action="pacs.search", obj=node,
                     outcome=AuditEvent.Outcome.FAILURE if error else AuditEvent.Outcome.SUCCESS,
                     detail={"results": len(hits) if hits is not None else None})
    context = {"form": form, "hits": hits, "error": error,
               "has_nodes": form.fields["node"].queryset.exists()}
    template = "pacs/_results.html" if request.htmx else "pacs/search.html"
    return render(request, template, context)


def _default_node(facility) -> PacsNode | None:
    return PacsNode.objects.filter(facility=facility, is_active=True).first()


@require_POST
@clerk_required
def pacs_verify(request: HttpRequest) -> HttpResponse:
    """C-ECHO the chosen node, for a clerk who wants to know whether the PACS is up."""
    form = NodeForm(request.POST, facility=request.user.facility)
    if not form.is_valid():
        return HttpResponse(status=404)
    ok, message = pacs.node_verify(node=form.cleaned_data["node"], user=request.user)
    if request.htmx:
        return render(request, "pacs/_verify_result.html", {"ok": ok, "message": message})
    (messages.success if ok else messages.error)(request, message)
    return redirect("pacs-search")


@require_POST
@clerk_required
def pacs_retrieve(request: HttpRequest) -> HttpResponse:
    """Queue a retrieve for each ticked study of the last search."""
    shown = request.session.get(PACS_HITS_SESSION_KEY) or {"node": None, "hits": []}
    hits = {hit["study_instance_uid"]: hit for hit in shown["hits"]}
    form = RetrieveForm(request.POST, offered=list(hits))
    if shown["node"] is None or not form.is_valid():
        for error in form.errors.get("study_uids", []) or [_("Search again first.")]:
            messages.error(request, error)
        return redirect("pacs-search")
    node = get_node_for_user(request.user, shown["node"])
    jobs = [
        pacs.retrieve_start(node=node, study_instance_uid=uid, requested_by=request.user,
                            hit=pacs.StudyHit.from_session(hits[uid]))
        for uid in form.cleaned_data["study_uids"]
    ]
    if len(jobs) == 1:
        return redirect("pacs-retrieve-detail", jobs[0].pk)
    messages.success(request, ngettext(
        "%(count)s retrieve queued.", "%(count)s retrieves queued.", len(jobs),
    ) % {"count": len(jobs)})
    return redirect("pacs-retrieves")


@clerk_required
def retrieve_list(request: HttpRequest) -> HttpResponse:
    jobs = list(RetrieveJob.objects.filter(facility=request.user.facility)
                .select_related("node", "study__patient")[:RECENT_JOBS])
    context = {"jobs": jobs, "live": any(not job.is_finished for job in jobs)}
    template = "pacs/_retrieve_rows.html" if request.htmx else "pacs/retrieve_list.html"
    return render(request, template, context)


@clerk_required
def retrieve_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_retrieve_for_user(request.user, job_id)
    if not request.htmx:
        audit_record(request=request, action="pacs.retrieve.view", obj=job,
                     patient_ref=job.study.patient_id if job.study else None)
    template = "pacs/_retrieve_progress.html" if request.htmx else "pacs/retrieve_detail.html"
    return render(request, template, {"job": job})


@require_POST
@clerk_required
def retrieve_retry(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_retrieve_for_user(request.user, job_id)
    job = pacs.retrieve_retry(job=job, requested_by=request.user)
    return redirect("pacs-retrieve-detail", job.pk)


@clerk_required
def push_new(request: HttpRequest, study_id: int) -> HttpResponse:
    """Choose a PACS and send an archived study to it."""
    study = get_study_for_user(request.user, study_id)
    form = PushForm(request.POST or None, facility=request.user.facility)
    if request.method == "POST" and form.is_valid():
        job = pacs.push_start(node=form.cleaned_data["node"], study=study,
                              requested_by=request.user)
        return redirect("pacs-push-detail", job.pk)
    pushes = study.pushes.filter(facility=request.user.facility).select_related("node")[:10]
    return render(request, "pacs/push_new.html", {
        "form": form, "study": study, "patient": study.patient, "pushes": pushes,
        "has_nodes": form.fields["node"].queryset.exists(),
    })


@clerk_required
def push_list(request: HttpRequest) -> HttpResponse:
    jobs = list(PushJob.objects.filter(facility=request.user.facility)
                .select_related("node", "study__patient")[:RECENT_JOBS])
    context = {"jobs": jobs, "live": any(not job.is_finished for job in jobs)}
    template = "pacs/_push_rows.html" if request.htmx else "pacs/push_list.html"
    return render(request, template, context)


@clerk_required
def push_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_push_for_user(request.user, job_id)
    if not request.htmx:
        audit_record(request=request, action="pacs.push.view", obj=job,
                     patient_ref=job.study.patient_id)
    problems = (job.results.exclude(outcome="success")
                .select_related("instance__series").order_by("instance__series__series_number",
                                                             "instance__instance_number"))
    template = "pacs/_push_progress.html" if request.htmx else "pacs/push_detail.html"
    return render(request, template, {"job": job, "problems": problems})


@require_POST
@clerk_required
def push_retry(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_push_for_user(request.user, job_id)
    job = pacs.push_retry(job=job, requested_by=request.user)
    return redirect("pacs-push-detail", job.pk)
