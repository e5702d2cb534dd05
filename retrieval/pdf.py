"""The Request Page: one US-letter page that asks an outside facility for a patient's
prior imaging and tells it how to upload them (address, PIN, QR code of a direct link),
with the patient's signed authorization when there is one.

Rendered with WeasyPrint from ``templates/retrieval/request_page.html`` through the
Access Page's ``AssetFetcher``: only our static files and ``data:`` URIs (the QR code,
the logo, the signature) are ever read."""

import base64
import datetime
import logging
from dataclasses import dataclass

from django.conf import settings
from django.template.loader import render_to_string
from weasyprint import HTML

from sharing.pdf import ASSET_ORIGIN, AssetFetcher, logo_data_uri, qr_data_uri

log = logging.getLogger(__name__)

# Tried in turn until the page fits one sheet: tighter spacing, then smaller type. The
# signed authorization and the request details are never clipped; names in the header
# and the table are, to a few lines.
LAYOUTS = ("", "compact", "compact tight")


class RequestPageError(Exception):
    """The page cannot be made to fit one sheet."""


@dataclass(frozen=True)
class Authorization:
    """The signed section: the text the patient agreed to and their signature."""

    paragraphs: tuple[str, ...]
    typed_name: str
    signature_data_uri: str
    signed_on: datetime.date


@dataclass(frozen=True)
class RequestPage:
    """Everything printed on the page, prepared from a request, its PIN and its link."""

    facility_name: str
    facility_phone: str
    facility_fax: str
    facility_email: str
    logo_data_uri: str
    attn: str
    target_name: str
    patient_name: str  # as read ("Ryan Anthony")
    birth_date: datetime.date
    details: str
    upload_address: str  # as typed, without the scheme
    pin: str
    link: str
    qr_data_uri: str
    issued_on: datetime.date
    authorization: Authorization | None = None
    reissued: bool = False


def png_data_uri(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def request_page_for(*, record_request, pin: str, link: str, upload_address: str,
                     patient_name: str, issued_on: datetime.date,
                     authorization: Authorization | None = None,
                     reissued: bool = False) -> RequestPage:
    facility = record_request.facility
    return RequestPage(
        facility_name=facility.name,
        facility_phone=facility.support_phone or facility.phone,
        facility_fax=facility.fax,
        facility_email=facility.support_email,
        logo_data_uri=logo_data_uri(facility),
        attn=record_request.target_attn,
        target_name=record_request.target_name,
        patient_name=patient_name,
        birth_date=record_request.patient_birth_date,
        details=record_request.details,
        upload_address=upload_address,
        pin=pin,
        link=link,
        qr_data_uri=qr_data_uri(link),
        issued_on=issued_on,
        authorization=authorization,
        reissued=reissued,
    )


def request_page_html(page: RequestPage, *, layout: str = "") -> str:
    return render_to_string("retrieval/request_page.html", {
        "page": page,
        "layout": layout,
        "PRODUCT_NAME": settings.PRODUCT_NAME,
    })


def request_page_pdf(page: RequestPage, *, fetcher: AssetFetcher | None = None) -> bytes:
    """The PDF, one page; an error rather than a second sheet."""
    fetcher = fetcher or AssetFetcher()
    for layout in LAYOUTS:
        html = HTML(string=request_page_html(page, layout=layout),
                    base_url=f"{ASSET_ORIGIN}/", url_fetcher=fetcher)
        document = html.render()
        if len(document.pages) == 1:
            return document.write_pdf()
        log.info("request page took %s pages (layout %r); tightening",
                 len(document.pages), layout)
    raise RequestPageError("the Request Page does not fit on one page")
