"""The page that starts the browser viewer (OHIF) for a recipient and for a clerk.

OHIF is a single-page app with its own router under ``routerBasename``; its one route we
use, ``viewer?StudyInstanceUIDs=…``, opens one study. The page lives where the visitor's
session cookie is sent, because the app's DICOMweb requests must carry it: under /view
for a recipient (their cookie's path), under /clerk for a clerk. The app's own files
are static (``/static/ohif/``). Each visitor's app reads only their DICOMweb root, which
answers only for what that visitor may see; the page checks the same before it starts
the app, so that a study outside it is a plain 404 rather than an empty viewer.

View opens the app at the exam's own address (``/view/studies/<id>/viewer``, an id of
ours); the page then moves the browser's address to the app's route in place
(``history.replaceState``), so the Study Instance UID reaches no server in a URL. Only a
reload asks for the route's address, which the views here answer."""

import datetime

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.templatetags.static import static
from django.urls import reverse
from django.utils.http import urlencode
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET

from dicomgw.models import Study
from pockethealth.auth import clerk_required
from sharing.models import Share
from sharing.recipient_views import recipient_required, recipient_session

from .ohif import ohif_app_config, ohif_installed
from .scopes import CLERK, RECIPIENT, dicomweb_root

VIEWER_ROUTE = "viewer"


def viewer_url(url_name: str, study_instance_uid: str) -> str:
    """The address of the app's viewer route showing one study."""
    return (reverse(url_name, args=[VIEWER_ROUTE]) + "?"
            + urlencode({"StudyInstanceUIDs": study_instance_uid}))


def _study_uids(request: HttpRequest) -> list[str]:
    """The studies the app is asked to open (OHIF reads them from the query string)."""
    uids = [u for value in request.GET.getlist("StudyInstanceUIDs") for u in value.split(",")]
    return [u.strip() for u in uids if u.strip()]


def _app_page(request: HttpRequest, *, url_name: str, kind: str, study_uids: list[str],
              exit_url: str, exit_label: str, sign_in_url: str) -> HttpResponse:
    installed = ohif_installed()
    if installed is None:
        return render(request, "viewer/unavailable.html", {"exit_url": exit_url,
                                                          "exit_label": exit_label},
                      status=503)
    basename = reverse(url_name, args=[VIEWER_ROUTE])[: -len(VIEWER_ROUTE)]
    config = ohif_app_config(dicomweb_root=request.build_absolute_uri(dicomweb_root(kind)),
                             router_basename=basename)
    response = render(request, "viewer/ohif.html", {
        "config": config,
        "page": {"publicUrl": static("ohif/"), "exitUrl": exit_url, "exitLabel": exit_label,
                 "signInUrl": sign_in_url,
                 "appUrl": viewer_url(url_name, ",".join(study_uids))},
        "ohif_url": static("ohif/"), "installed": installed,
    })
    response["Cache-Control"] = "no-store"
    return response


# --- A recipient, within the share their session opened -----------------------------------


@require_GET
@recipient_session
@recipient_required
def recipient_app(request: HttpRequest, share: Share, now: datetime.datetime,
                  route: str) -> HttpResponse:
    """The viewer on an exam of the session's share; any other route of the app (its
    study list) leads back to the Share Inbox."""
    uids = _study_uids(request)
    if route != VIEWER_ROUTE or not uids:
        return HttpResponseRedirect(reverse("recipient-inbox"), status=303)
    shared = set(share.share_studies.filter(study_instance_uid__in=uids)
                 .values_list("study_instance_uid", flat=True))
    if shared != set(uids):
        raise Http404
    return recipient_app_page(request, study_uids=uids)


def recipient_app_page(request: HttpRequest, *, study_uids: list[str]) -> HttpResponse:
    """The app on studies of the recipient's share (checked by the caller)."""
    return _app_page(request, url_name="viewer-recipient-app", kind=RECIPIENT,
                     study_uids=study_uids, exit_url=reverse("recipient-inbox"),
                     exit_label=_("Share Inbox"), sign_in_url=reverse("recipient-unlock"))


# --- A clerk, within their facility's archive ------------------------------------------------


@require_GET
@clerk_required
def clerk_study(request: HttpRequest, study_id: int) -> HttpResponse:
    """Open an archived study of the clerk's facility in the viewer (which records the
    opening when it reads the study, viewer.services.study_open_record)."""
    study = get_object_or_404(Study, pk=study_id, facility=request.user.facility)
    return _clerk_app_page(request, [study])


@require_GET
@clerk_required
def clerk_app(request: HttpRequest, route: str) -> HttpResponse:
    uids = _study_uids(request)
    if route != VIEWER_ROUTE or not uids:
        return HttpResponseRedirect(reverse("archive-patients"), status=303)
    studies = list(Study.objects.filter(facility=request.user.facility,
                                        study_instance_uid__in=uids))
    if len(studies) != len(set(uids)):
        raise Http404
    return _clerk_app_page(request, studies)


def _clerk_app_page(request: HttpRequest, studies: list[Study]) -> HttpResponse:
    if len(studies) == 1:
        exit_url, exit_label = reverse("archive-study", args=[studies[0].pk]), _("Study")
    else:
        exit_url, exit_label = reverse("archive-patients"), _("Patients")
    return _app_page(request, url_name="viewer-clerk-app", kind=CLERK,
                     study_uids=[s.study_instance_uid for s in studies], exit_url=exit_url,
                     exit_label=exit_label, sign_in_url=reverse(settings.LOGIN_URL))
