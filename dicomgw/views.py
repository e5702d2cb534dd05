import datetime

from django.core.paginator import Paginator
from django.db.models import Count, Max
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from pockethealth.auth import clerk_required
from pockethealth.services import audit_record

from .forms import PatientSearchForm
from .models import Patient, Study

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
