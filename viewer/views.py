"""The DICOMweb endpoints the browser viewer reads (PS3.18), read-only, one set of views
mounted twice: under /view/dicomweb/ for a recipient's session (its cookie is sent only
under /view) and under /clerk/dicomweb/ for a clerk signed in with both factors.

Each view gets the visitor's ``Scope``. A visitor without access gets 401 (no session,
or it ended) or 403, as JSON, never a sign-in page; anything outside the scope is
404, the same answer as for what does not exist. Recipient answers are
``Cache-Control: no-store``, a clerk's ``private``. A recipient's session is read on
every request but written at most once a minute (SEEN_GRANULARITY), so a viewer
fetching hundreds of frames does not write it hundreds of times."""

import json
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import wraps

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.cache import patch_vary_headers
from django.utils.translation import gettext as _
from django.views.decorators.http import require_safe
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pockethealth.auth import clerk_required
from pockethealth.services import client_address
from sharing import recipient_views
from sharing.models import Share
from sharing.recipient_views import recipient_session

from .scopes import dicomweb_root
from .services import (
    OCTET_STREAM,
    RECIPIENT,
    PixelParts,
    Scope,
    SearchResult,
    ViewerError,
    bulkdata_read,
    frames_read,
    instance_chunks,
    instances_get,
    instances_search,
    metadata_text,
    scope_for_facility,
    scope_for_share,
    series_search,
    studies_search,
    study_open_record,
)

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
FRAME_LIST = re.compile(r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*$")


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


# --- Access --------------------------------------------------------------------------------


def _root(request: HttpRequest, kind: str) -> str:
    return request.build_absolute_uri(dicomweb_root(kind))


def dicomweb_view(view):
    """Run ``view(request, scope, ...)`` for the visitor the URL's ``kind`` names: the
    recipient's session or the signed-in clerk. ``ViewerError`` becomes its status with a
    JSON body."""

    def answer(request: HttpRequest, scope: Scope, *args, **kwargs) -> HttpResponse:
        try:
            response = view(request, scope, *args, **kwargs)
        except ViewerError as error:
            response = _error(error.status, str(error))
        patch_vary_headers(response, ["Accept"])
        return response

    @recipient_session
    def as_recipient(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        # Asked with every frame: only what deciding needs is read of the share.
        share = recipient_views._session_share(
            request, recipient_views._now(),
            shares=Share.objects.only(*recipient_views.SHARE_CHECK_FIELDS))
        if share is None:
            return _error(401, _("Your session has ended. Open the share at /view again."))
        scope = scope_for_share(share=share, root=_root(request, RECIPIENT),
                                visitor=request.recipient_session.session_key or "")
        return answer(request, scope, *args, **kwargs)

    def clerk_answer(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        visitor = f"{request.user.pk}:{request.session.session_key or ''}"
        scope = scope_for_facility(facility=request.user.facility_id,
                                   root=_root(request, "clerk"), visitor=visitor)
        return answer(request, scope, *args, **kwargs)

    guarded = clerk_required(clerk_answer)

    def as_clerk(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            response = guarded(request, *args, **kwargs)
        except PermissionDenied:
            response = _error(403, _("This account has no access to a facility's archive."))
        else:
            if response.status_code in (301, 302, 303, 307, 308):
                # The guard's way to the sign-in or second-factor page: a viewer cannot
                # follow it, so say what is missing instead.
                response = _error(401, _("Sign in to the clerical interface again."))
        response["Cache-Control"] = "private"
        return response

    @wraps(view)
    @require_safe
    def wrapper(request: HttpRequest, *args, kind: str, **kwargs) -> HttpResponse:
        if kind == RECIPIENT:
            return as_recipient(request, *args, **kwargs)
        return as_clerk(request, *args, **kwargs)

    return wrapper


# --- Content negotiation (PS3.18 8.7) ---------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict
    q: float


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    pieces, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def accept_ranges(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (RFC 9110 12.5.1);
    those with q=0 are refused ones and left out."""
    ranges = []
    for piece in _split_outside_quotes(header, ","):
        media_type, *params = _split_outside_quotes(piece, ";")
        media_type = media_type.strip().lower()
        if not media_type:
            continue
        values = {}
        for param in params:
            name, _sep, value = param.partition("=")
            values[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(values.pop("q", "1") or 1)
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media_type, values, q))
    return sorted(ranges, key=lambda r: -r.q)


@dataclass(frozen=True)
class Offer:
    """What we can send: one media type in one transfer syntax."""

    media_type: str
    transfer_syntax: str


def _fits(media_type: str, syntax: str | None, offer: Offer) -> bool:
    """Whether a part's media type and transfer-syntax parameter admit ``offer``. No
    parameter, or "*", admits the syntax as stored; so does
    ``application/octet-stream; transfer-syntax=*``, what OHIF's image loader asks for
    frames (PS3.18 8.7.3.5.2: "*" lets the origin server choose)."""
    if media_type in ("*/*", "*"):
        fits = True
    elif media_type.endswith("/*"):
        fits = offer.media_type.startswith(media_type[:-1])
    else:
        fits = media_type == offer.media_type or (media_type == OCTET_STREAM and syntax == "*")
    if not fits:
        return False
    if syntax in (None, "", "*"):
        return True
    if offer.media_type == OCTET_STREAM and offer.transfer_syntax == ExplicitVRLittleEndian:
        # Native bytes read the same in either little endian syntax.
        return syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    return syntax == offer.transfer_syntax


def _multipart_wanted(request: HttpRequest, offers: set[Offer], *, part_default: str,
                      single_allowed: bool) -> bool:
    """True to answer multipart/related, False for a single part; ViewerError (406) when
    the Accept header admits neither."""
    header = request.headers.get("Accept", "").strip()
    if not header:
        return True
    for media_range in accept_ranges(header):
        syntax = media_range.params.get("transfer-syntax")
        if media_range.media_type in ("*/*", "multipart/*"):
            return True
        if media_range.media_type == "multipart/related":
            part = media_range.params.get("type", part_default).lower()
            if all(_fits(part, syntax, offer) for offer in offers):
                return True
        elif single_allowed and all(_fits(media_range.media_type, syntax, offer)
                                    for offer in offers):
            return False
    raise ViewerError(_("None of the media types asked for can be sent. This server sends "
                        "what it stores and does not convert it."), status=406)


def _json_wanted(request: HttpRequest) -> None:
    header = request.headers.get("Accept", "").strip()
    if not header:
        return
    acceptable = {DICOM_JSON, "application/json", "application/*", "*/*"}
    if not any(r.media_type in acceptable for r in accept_ranges(header)):
        raise ViewerError(_("Searches and metadata are sent as application/dicom+json."),
                          status=406)


# --- Bodies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    content_type: str
    chunks: Iterable[bytes]
    size: int


def _multipart(parts: list[_Part], *, part_type: str) -> StreamingHttpResponse:
    """A multipart/related body (RFC 2387, PS3.18 8.6.1.2), streamed part by part, with
    its length known in advance."""
    boundary = secrets.token_hex(24)
    heads = [f"--{boundary}\r\nContent-Type: {p.content_type}\r\n\r\n".encode("ascii")
             for p in parts]
    closing = f"--{boundary}--\r\n".encode("ascii")

    def body() -> Iterator[bytes]:
        for head, part in zip(heads, parts, strict=True):
            yield head
            yield from part.chunks
            yield b"\r\n"
        yield closing

    response = StreamingHttpResponse(
        body(), content_type=f'multipart/related; type="{part_type}"; boundary={boundary}')
    response["Content-Length"] = str(sum(len(h) + p.size + 2 for h, p in zip(heads, parts,
                                                                              strict=True))
                                      + len(closing))
    return response


def _dicom_json(text: str, *, warnings: Iterable[str] = ()) -> HttpResponse:
    response = HttpResponse(text, content_type=DICOM_JSON)
    if warnings:
        # PS3.18 8.3.3.1: what was not done as asked goes in a Warning header.
        response["Warning"] = ", ".join(f'299 - "{w}"' for w in warnings)
    return response


def _search_answer(request: HttpRequest, search, **arguments) -> HttpResponse:
    _json_wanted(request)
    result: SearchResult = search(query=request.GET, **arguments)
    # Zero matches are an empty array with 200 (DICOM CP-2473), as most clients expect.
    return _dicom_json(json.dumps(result.matches, separators=(",", ":"), ensure_ascii=False),
                       warnings=result.warnings)


def _pixel_answer(request: HttpRequest, pixels: PixelParts) -> HttpResponse:
    offer = Offer(pixels.media_type, pixels.transfer_syntax)
    content_type = f"{pixels.media_type}; transfer-syntax={pixels.transfer_syntax}"
    multipart = _multipart_wanted(request, {offer}, part_default=OCTET_STREAM,
                                  single_allowed=len(pixels.parts) == 1)
    if not multipart:
        return HttpResponse(pixels.parts[0], content_type=content_type)
    return _multipart([_Part(content_type, [p], len(p)) for p in pixels.parts],
                      part_type=pixels.media_type)


def _instances_answer(request: HttpRequest, scope: Scope, instances: list) -> HttpResponse:
    offers = {Offer(DICOM, i.transfer_syntax_uid) for i in instances}
    multipart = _multipart_wanted(request, offers, part_default=DICOM,
                                  single_allowed=len(instances) == 1)
    study_open_record(scope=scope, study=instances[0].series.study,
                      address=client_address(request), request=request)
    if not multipart:
        response = StreamingHttpResponse(instance_chunks(instances[0]), content_type=DICOM)
        response["Content-Length"] = str(instances[0].size)
        return response
    return _multipart([_Part(f"{DICOM}; transfer-syntax={i.transfer_syntax_uid}",
                             instance_chunks(i), i.size) for i in instances],
                      part_type=DICOM)


def _metadata_answer(request: HttpRequest, scope: Scope, instances: list) -> HttpResponse:
    _json_wanted(request)
    study_open_record(scope=scope, study=instances[0].series.study,
                      address=client_address(request), request=request)
    return _dicom_json(metadata_text(scope=scope, instances=instances))


# --- Search (QIDO-RS) ---------------------------------------------------------------------


@dicomweb_view
def search_studies(request: HttpRequest, scope: Scope) -> HttpResponse:
    return _search_answer(request, studies_search, scope=scope)


@dicomweb_view
def search_series(request: HttpRequest, scope: Scope, study: str | None = None
                  ) -> HttpResponse:
    return _search_answer(request, series_search, scope=scope, study_uid=study)


@dicomweb_view
def search_instances(request: HttpRequest, scope: Scope, study: str | None = None,
                     series: str | None = None) -> HttpResponse:
    return _search_answer(request, instances_search, scope=scope, study_uid=study,
                          series_uid=series)


# --- Retrieve (WADO-RS) ---------------------------------------------------------------------


@dicomweb_view
def retrieve_instances(request: HttpRequest, scope: Scope, study: str,
                       series: str | None = None, instance: str | None = None
                       ) -> HttpResponse:
    """The stored files of a study, a series or one instance, byte for byte."""
    found = instances_get(scope=scope, study_uid=study, series_uid=series, sop_uid=instance)
    return _instances_answer(request, scope, found)


@dicomweb_view
def retrieve_metadata(request: HttpRequest, scope: Scope, study: str,
                      series: str | None = None, instance: str | None = None
                      ) -> HttpResponse:
    found = instances_get(scope=scope, study_uid=study, series_uid=series, sop_uid=instance)
    return _metadata_answer(request, scope, found)


@dicomweb_view
def retrieve_frames(request: HttpRequest, scope: Scope, study: str, series: str,
                    instance: str, frames: str) -> HttpResponse:
    if not FRAME_LIST.match(frames):
        raise ViewerError(_("Frames are listed by number from 1, separated by commas."),
                          status=400)
    [found] = instances_get(scope=scope, study_uid=study, series_uid=series,
                            sop_uid=instance)
    numbers = [int(n) for n in frames.split(",")]
    return _pixel_answer(request, frames_read(instance=found, numbers=numbers))


@dicomweb_view
def retrieve_bulkdata(request: HttpRequest, scope: Scope, study: str, series: str,
                      instance: str, path: str) -> HttpResponse:
    [found] = instances_get(scope=scope, study_uid=study, series_uid=series,
                            sop_uid=instance)
    return _pixel_answer(request, bulkdata_read(instance=found, path=path))
