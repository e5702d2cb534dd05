"""The Access Page: one US-letter page that tells a recipient how to open a share.

Rendered with WeasyPrint from ``templates/sharing/access_page.html``. WeasyPrint fetches
any URL a document names (http, https, file) unless told otherwise, so it is given
``AssetFetcher``, which serves our own static files and ``data:`` URIs and refuses the
rest: nothing in a patient's name, a note or a logo can make the renderer reach the
network or read a local file."""

import base64
import datetime
import io
import logging
import mimetypes
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import segno
from django.conf import settings
from django.contrib.staticfiles import finders
from django.template.loader import render_to_string
from django.utils import timezone
from weasyprint import HTML
from weasyprint.urls import URLFetcher, URLFetcherResponse

from dicomgw.models import Patient
from pockethealth.codes import code_format, code_normalise

log = logging.getLogger(__name__)

# The made-up origin our template's relative URLs resolve against. ".invalid" names never
# resolve (RFC 6761), and the fetcher answers for this origin from the static files.
ASSET_ORIGIN = "https://access-page.invalid"
# Exams listed by name before "+ N more exams"; fewer if the page would not fit.
EXAMS_SHOWN = 5
# Tried in turn until the page fits one sheet: fewer exams named, then tighter spacing
# (for long fax headers, names and notes, which are clipped to a few lines each).
LAYOUTS = ((EXAMS_SHOWN, False), (3, False), (3, True), (1, True))
LOGO_MAX_BYTES = 2 * 1024 * 1024
LOGO_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}


class AccessPageError(Exception):
    """The page cannot be made to fit one sheet."""


class AssetFetcher(URLFetcher):
    """Serves ``data:`` URIs and our static files (``<ASSET_ORIGIN>/static/...``) and
    refuses every other URL. ``refused`` lists what was asked for and turned down."""

    def __init__(self):
        super().__init__(timeout=1)
        self.refused: list[str] = []
        self.served: list[str] = []

    def fetch(self, url, headers=None):
        if url.startswith("data:"):
            return self._data(url)
        static_prefix = f"{ASSET_ORIGIN}{settings.STATIC_URL}"
        if url.startswith(static_prefix):
            path = unquote(urlsplit(url).path[len(settings.STATIC_URL):])
            found = finders.find(path) if ".." not in Path(path).parts else None
            if found:
                self.served.append(url)
                content_type = mimetypes.guess_type(found)[0] or "application/octet-stream"
                return URLFetcherResponse(url, Path(found).read_bytes(),
                                          {"Content-Type": content_type})
        self.refused.append(url)
        # Only the scheme: an injected URL could carry anything.
        log.warning("access page renderer refused a %s URL", urlsplit(url).scheme or "relative")
        raise ValueError("the Access Page renderer fetches only its own assets")

    def _data(self, url: str) -> URLFetcherResponse:
        header, _comma, payload = url[len("data:"):].partition(",")
        parts = header.split(";")
        content_type = parts[0] or "text/plain"
        if "base64" in parts[1:]:
            body = base64.b64decode(payload)
        else:
            body = unquote(payload).encode()
        self.served.append("data:")
        return URLFetcherResponse(url, body, {"Content-Type": content_type})


@dataclass(frozen=True)
class Exam:
    modalities: str
    description: str
    study_date: datetime.date | None

    @property
    def title(self) -> str:
        """"CR CHEST 2 VIEW": the modality, unless the description already starts with it."""
        description = self.description.strip()
        if self.modalities and not description.upper().startswith(self.modalities.upper()):
            return f"{self.modalities} {description}".strip()
        return description


@dataclass(frozen=True)
class AccessPage:
    """Everything printed on the page, prepared from a share and its code."""

    facility_name: str
    facility_phone: str
    facility_support_phone: str
    facility_support_email: str
    logo_data_uri: str
    faxed: bool
    attn: str
    recipient_institution: str
    subject: str
    note: str
    patient_name: str
    birth_date: datetime.date
    code: str
    view_url: str
    view_address: str
    qr_data_uri: str
    exams: list[Exam] = field(default_factory=list)
    expires_at: datetime.datetime | None = None
    time_zone: str = "UTC"


def view_url(code: str) -> str:
    """Where the QR code leads: the /view page with the code filled in (never the DOB)."""
    return f"{settings.SITE_URL}/view?code={code_normalise(code)}"


def view_address() -> str:
    """The /view address as a person types it: without "https://"."""
    address = f"{settings.SITE_URL}/view"
    return address.removeprefix("https://")


def qr_data_uri(url: str) -> str:
    # Level M survives a smudged print or a noisy fax; SVG stays sharp at any size.
    return segno.make(url, error="m", micro=False).svg_data_uri(
        scale=4, border=0, dark="#000000", omitsize=True)


def logo_data_uri(facility) -> str:
    """The facility's logo as a data URI when it is a raster image we can read; else
    empty (the page shows the facility's name instead)."""
    if not facility.logo:
        return ""
    try:
        with facility.logo.open("rb") as fh:
            data = fh.read(LOGO_MAX_BYTES + 1)
    except OSError:
        return ""
    if len(data) > LOGO_MAX_BYTES:
        return ""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            content_type = LOGO_TYPES.get(image.format or "")
    except (UnidentifiedImageError, OSError):
        return ""
    if content_type is None:
        return ""
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def access_page_for(share, code: str) -> AccessPage:
    facility = share.facility
    exams = [
        Exam(modalities=" ".join(s.modality_list), description=s.description,
             study_date=s.study_date)
        for s in share.share_studies.order_by("-study_date", "id")
    ]
    # Newest first; exams without a date last.
    exams.sort(key=lambda e: e.study_date or datetime.date.min, reverse=True)
    url = view_url(code)
    return AccessPage(
        facility_name=facility.name,
        facility_phone=facility.phone,
        facility_support_phone=facility.support_phone,
        facility_support_email=facility.support_email,
        logo_data_uri=logo_data_uri(facility),
        faxed=share.is_faxed,
        attn=share.recipient_attn,
        recipient_institution=share.recipient_institution,
        subject=share.subject,
        note=share.note,
        patient_name=Patient(name=share.patient_name).display_name,
        birth_date=share.patient_birth_date,
        code=code_format(code),
        view_url=url,
        view_address=view_address(),
        qr_data_uri=qr_data_uri(url),
        exams=exams,
        expires_at=share.expires_at,
        time_zone=facility.time_zone,
    )


def access_page_html(page: AccessPage, *, exams_shown: int = EXAMS_SHOWN,
                     compact: bool = False) -> str:
    shown = page.exams[:exams_shown]
    context = {
        "page": page,
        "compact": compact,
        "exams": shown,
        "more_exams": len(page.exams) - len(shown),
        "PRODUCT_NAME": settings.PRODUCT_NAME,
        "SUPPORT_PHONE": settings.SUPPORT_PHONE,
        "SUPPORT_EMAIL": settings.SUPPORT_EMAIL,
        "ACCESS_DAYS": settings.SHARE_ACCESS_DAYS,
        "MAX_MONTHS": settings.SHARE_MAX_MONTHS,
    }
    try:
        zone = zoneinfo.ZoneInfo(page.time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = datetime.UTC
    # Dates and times print in the facility's zone, whoever renders the page.
    with timezone.override(zone):
        return render_to_string("sharing/access_page.html", context)


def access_page_pdf(page: AccessPage, *, fetcher: AssetFetcher | None = None) -> bytes:
    """The PDF, one page. Long exam lists are cut to fewer names ("+ N more exams");
    long texts are clipped by the stylesheet. A page that still spills over is an error
    rather than a two-page Access Page."""
    fetcher = fetcher or AssetFetcher()
    for exams_shown, compact in LAYOUTS:
        html = HTML(string=access_page_html(page, exams_shown=exams_shown, compact=compact),
                    base_url=f"{ASSET_ORIGIN}/", url_fetcher=fetcher)
        document = html.render()
        if len(document.pages) == 1:
            return document.write_pdf()
        log.info("access page took %s pages (%s exams listed, compact=%s); tightening",
                 len(document.pages), exams_shown, compact)
    raise AccessPageError("the Access Page does not fit on one page")
