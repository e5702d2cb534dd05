"""What the clerical pages of shares and of record requests have in common: the stored
page printed for the other side (an Access Page, a Request Page), and the buttons that
act on the object and come back to its page with a message."""

from collections.abc import Callable

from django.contrib import messages
from django.db.models import Model
from django.db.models.fields.files import FieldFile
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import redirect

from .services import audit_record


def stored_page_response(request: HttpRequest, page: FieldFile, *, action: str, obj: Model,
                         patient_ref, filename: str) -> FileResponse:
    """The stored PDF ``page``: inline to print, or as a download with ``?download=1``;
    audited as ``<action>.open`` or ``<action>.download``; never cached."""
    download = request.GET.get("download") == "1"
    audit_record(request=request, action=f"{action}.download" if download else f"{action}.open",
                 obj=obj, patient_ref=patient_ref)
    response = FileResponse(page.open("rb"), content_type="application/pdf",
                            as_attachment=download, filename=filename)
    response["Cache-Control"] = "no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response


def act_and_return(request: HttpRequest, act: Callable[[], object], *, success: str,
                   refusal: type[Exception], page: str, pk: int) -> HttpResponse:
    """Run ``act``; say ``success``, or why it was refused (``refusal``); back to the
    object's page (URL name ``page``)."""
    try:
        act()
    except refusal as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, success)
    return redirect(page, pk)
