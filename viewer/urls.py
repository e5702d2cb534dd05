"""The DICOMweb endpoints (PS3.18 10.4-10.6), twice: ``recipient_urlpatterns`` mounted at
/view/dicomweb/ (the recipient's session) and ``clerk_urlpatterns`` at /clerk/dicomweb/
(the clerk's facility). The same views serve both; the ``kind`` passed with each URL
says whose scope applies."""

from django.urls import path

from .scopes import CLERK, RECIPIENT, URL_NAMES

STUDY = "studies/<str:study>"
SERIES = f"{STUDY}/series/<str:series>"
INSTANCE = f"{SERIES}/instances/<str:instance>"


def _on_first_use(name: str):
    """The view ``name`` of ``viewer.views``, imported when first called: the DICOMweb
    views read files with pydicom and numpy (some 35 MB), which a web process then loads
    on its first DICOMweb request rather than at start, so a process that serves only
    pages and downloads stays small."""

    def view(request, *args, **kwargs):
        from . import views

        return getattr(views, name)(request, *args, **kwargs)

    view.__name__ = view.__qualname__ = name
    return view


def _patterns(kind: str) -> list:
    scoped = {"kind": kind}
    return [
        path("studies", _on_first_use("search_studies"), scoped, name=URL_NAMES[kind]),
        path("series", _on_first_use("search_series"), scoped),
        path("instances", _on_first_use("search_instances"), scoped),
        path(STUDY, _on_first_use("retrieve_instances"), scoped),
        path(f"{STUDY}/metadata", _on_first_use("retrieve_metadata"), scoped),
        path(f"{STUDY}/series", _on_first_use("search_series"), scoped),
        path(f"{STUDY}/instances", _on_first_use("search_instances"), scoped),
        path(SERIES, _on_first_use("retrieve_instances"), scoped),
        path(f"{SERIES}/metadata", _on_first_use("retrieve_metadata"), scoped),
        path(f"{SERIES}/instances", _on_first_use("search_instances"), scoped),
        path(INSTANCE, _on_first_use("retrieve_instances"), scoped),
        path(f"{INSTANCE}/metadata", _on_first_use("retrieve_metadata"), scoped),
        path(f"{INSTANCE}/frames/<str:frames>", _on_first_use("retrieve_frames"), scoped),
        path(f"{INSTANCE}/bulkdata/<path:path>", _on_first_use("retrieve_bulkdata"), scoped),
    ]


recipient_urlpatterns = _patterns(RECIPIENT)
clerk_urlpatterns = _patterns(CLERK)
