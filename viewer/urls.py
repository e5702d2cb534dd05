"""The DICOMweb endpoints (PS3.18 10.4-10.6), twice: ``recipient_urlpatterns`` mounted at
/view/dicomweb/ (the recipient's session) and ``clerk_urlpatterns`` at /clerk/dicomweb/
(the clerk's facility). The same views serve both; the ``kind`` passed with each URL
says whose scope applies."""

from django.urls import path

from . import views
from .services import CLERK, RECIPIENT, URL_NAMES

STUDY = "studies/<str:study>"
SERIES = f"{STUDY}/series/<str:series>"
INSTANCE = f"{SERIES}/instances/<str:instance>"


def _patterns(kind: str) -> list:
    scoped = {"kind": kind}
    return [
        path("studies", views.search_studies, scoped, name=URL_NAMES[kind]),
        path("series", views.search_series, scoped),
        path("instances", views.search_instances, scoped),
        path(STUDY, views.retrieve_instances, scoped),
        path(f"{STUDY}/metadata", views.retrieve_metadata, scoped),
        path(f"{STUDY}/series", views.search_series, scoped),
        path(f"{STUDY}/instances", views.search_instances, scoped),
        path(SERIES, views.retrieve_instances, scoped),
        path(f"{SERIES}/metadata", views.retrieve_metadata, scoped),
        path(f"{SERIES}/instances", views.search_instances, scoped),
        path(INSTANCE, views.retrieve_instances, scoped),
        path(f"{INSTANCE}/metadata", views.retrieve_metadata, scoped),
        path(f"{INSTANCE}/frames/<str:frames>", views.retrieve_frames, scoped),
        path(f"{INSTANCE}/bulkdata/<path:path>", views.retrieve_bulkdata, scoped),
    ]


recipient_urlpatterns = _patterns(RECIPIENT)
clerk_urlpatterns = _patterns(CLERK)
