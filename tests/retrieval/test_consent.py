"""The patient's signed authorization: signed on the clerk's screen or through a signing
link (one use, 7 days), drawn or typed, stored once and never changed, and followed by a
new Request Page (new PIN) that carries it."""

import base64
import datetime
import hashlib
import re
import zoneinfo

import pytest
from django.contrib.admin.sites import site as admin_site
from django.test import RequestFactory

from pockethealth.codes import pin_hash
from pockethealth.models import AuditEvent
from retrieval.models import PatientConsent, RecordRequest, RequestFax
from retrieval.services import (
    RetrievalError,
    consent_link_find,
    consent_link_issue,
    consent_sign,
    consent_token_hash,
    request_cancel,
    upload_token_hash,
)

from .conftest import signature_png


def audited(record_request, action):
    return AuditEvent.objects.filter(object_type="retrieval.recordrequest",
                                     object_id=str(record_request.pk), action=action)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def signing_post(**changes):
    data = {"typed_name": "Ryan Anthony", "signature": data_url(signature_png()),
            "agree": "on"}
    data.update(changes)
    return data


def link_token(link: str) -> str:
    return re.fullmatch(r"https://images\.example\.org/consent/([A-Za-z0-9_-]+)/", link)[1]


# --- On the clerk's screen -----------------------------------------------------------------


def test_the_patient_signs_on_the_clerks_tablet_and_a_new_page_is_issued(
        clerk_client, clerk, record_request):
    made, pin, _token = record_request(consent_requested=True)
    page = clerk_client.get(f"/clerk/requests/{made.pk}/sign/")
    body = page.content.decode()
    assert page.status_code == 200
    assert "I, Ryan ANTHONY, authorize Mercy Hospital St. Louis to release" in body
    assert "mainnav" not in body  # the patient holds the tablet: no clerical menu
    assert 'data-pad' in body and "typed name above is my signature" in body

    response = clerk_client.post(f"/clerk/requests/{made.pk}/sign/", signing_post(),
                                 HTTP_USER_AGENT="Tablet/1.0", REMOTE_ADDR="10.1.2.3")
    assert response.status_code == 302
    assert response["Location"] == f"/clerk/requests/{made.pk}/signed/"
    assert "hand the screen back" in clerk_client.get(response["Location"]).content.decode()

    consent = PatientConsent.objects.get(request=made)
    assert consent.typed_name == "Ryan Anthony"
    assert consent.channel == PatientConsent.Channel.TABLET
    assert consent.signature_kind == PatientConsent.SignatureKind.DRAWN
    assert consent.collected_by == clerk
    assert consent.address == "10.1.2.3" and consent.user_agent == "Tablet/1.0"
    # The date of signing is the facility's date (Toronto), not the server's.
    assert consent.signed_on == consent.signed_at.astimezone(
        zoneinfo.ZoneInfo("America/Toronto")).date()
    assert "Mercy Hospital St. Louis" in consent.authorization_text
    stored = consent.signature.open("rb").read()
    assert stored.startswith(b"\x89PNG") and hashlib.sha256(stored).hexdigest() == \
        consent.signature_sha256

    made.refresh_from_db()
    assert made.is_signed and not made.awaits_consent
    assert made.pin_hash != pin_hash(pin)  # the old page's PIN no longer works
    sign_event = audited(made, "request.consent.sign").get()
    assert sign_event.actor_user == clerk and sign_event.client_address == "10.1.2.3"
    assert sign_event.detail["signature_sha256"] == consent.signature_sha256
    assert audited(made, "request.page.issue").get().detail == {"reason": "consent"}
    # A second signature is refused, and the page says it cannot take one.
    response = clerk_client.get(f"/clerk/requests/{made.pk}/sign/", follow=True)
    assert "cannot take a signature now" in response.content.decode()
    with pytest.raises(RetrievalError, match="already signed"):
        consent_sign(record_request=made, typed_name="Someone Else",
                     signature_png=signature_png(), channel=PatientConsent.Channel.TABLET)


def test_choosing_to_sign_now_on_the_form_opens_the_signing_page(clerk_client):
    response = clerk_client.post("/clerk/requests/new/", {
        "target_name": "Mercy Hospital St. Louis", "family_name": "Anthony",
        "given_name": "Ryan", "birth_date": "1986-12-29", "details": "Chest X-ray",
        "method": "print", "consent": "tablet"})
    made = RecordRequest.objects.get()
    assert response["Location"] == f"/clerk/requests/{made.pk}/sign/"
    assert made.consent_requested and made.awaits_consent


@pytest.mark.parametrize(("post", "message"), [
    ({"signature": ""}, "Draw your signature in the box, or tick the box"),
    ({"signature": data_url(signature_png(ink=False))}, "Draw your signature in the box."),
    ({"signature": "data:image/png;base64,not base64!"}, "could not be read"),
    ({"signature": data_url(b"GIF89a" + b"\0" * 64)}, "could not be read"),
    ({"signature": data_url(signature_png(5000, 200))}, "unexpected size"),
    ({"typed_name": "   "}, "This field is required."),
    ({"agree": ""}, "Tick the box to agree"),
])
def test_a_signature_that_is_not_one_is_refused_with_a_reason(clerk_client, record_request,
                                                              post, message):
    made, _pin, _token = record_request()
    response = clerk_client.post(f"/clerk/requests/{made.pk}/sign/", signing_post(**post))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PatientConsent.objects.exists()
    assert not audited(made, "request.consent.sign").exists()


def test_a_patient_who_cannot_draw_adopts_their_typed_name(clerk_client, record_request):
    made, _pin, _token = record_request()
    response = clerk_client.post(f"/clerk/requests/{made.pk}/sign/", signing_post(
        signature="", adopt_typed="on", typed_name="Ryan  Anthony"))
    assert response.status_code == 302
    consent = PatientConsent.objects.get()
    assert consent.signature_kind == PatientConsent.SignatureKind.TYPED
    assert consent.typed_name == "Ryan Anthony"
    from PIL import Image

    with Image.open(consent.signature.open("rb")) as image:
        assert image.format == "PNG"
        assert sum(image.convert("L").histogram()[:128]) > 200  # the name, drawn


def test_a_drawn_signature_is_stored_as_its_pixels_on_white(record_request):
    made, _pin, _token = record_request()
    consent, _codes = consent_sign(record_request=made, typed_name="Ryan Anthony",
                                   signature_png=signature_png(),
                                   channel=PatientConsent.Channel.TABLET)
    from PIL import Image

    with Image.open(consent.signature.open("rb")) as image:
        assert image.mode == "L" and image.size == (600, 200)
        assert image.getpixel((2, 2)) == 255  # transparent became white
        assert not image.info.get("text")


# --- Through a signing link ---------------------------------------------------------------


def test_a_signing_link_opens_the_page_once(client, clerk, record_request):
    made, _pin, _token = record_request()
    link = consent_link_issue(record_request=made, by=clerk)
    token = link_token(link)
    assert len(base64.urlsafe_b64decode(token + "==")) * 8 >= 128
    made.refresh_from_db()
    # Stored only as a keyed hash.
    assert made.consent_requested and made.consent_link_hash == consent_token_hash(token)
    assert token not in made.consent_link_hash
    assert audited(made, "request.consent.link").get().actor_user == clerk

    url = f"/consent/{token}/"
    page = client.get(url)
    body = page.content.decode()
    assert page.status_code == 200 and "Authorization to release imaging records" in body
    assert "Back to the request (staff)" not in body
    assert page["Cache-Control"].startswith("max-age=0")
    assert audited(made, "request.consent.view").get().actor_type == "anonymous"

    response = client.post(url, signing_post(), REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 302 and response["Location"] == "/consent/done/"
    assert "You can close this page" in client.get("/consent/done/").content.decode()
    consent = PatientConsent.objects.get(request=made)
    assert consent.channel == PatientConsent.Channel.LINK and consent.collected_by is None
    assert consent.address == "203.0.113.9"
    event = audited(made, "request.consent.sign").get()
    assert event.actor_type == "anonymous" and event.actor_ref == "patient"

    again = client.get(url)
    assert again.status_code == 404 and "not valid" in again.content.decode()
    assert client.post(url, signing_post()).status_code == 404
    assert PatientConsent.objects.count() == 1


def test_a_signing_link_expires_after_seven_days(clerk, record_request):
    made, _pin, _token = record_request()
    issued = datetime.datetime(2025, 5, 1, 12, 0, tzinfo=datetime.UTC)
    token = link_token(consent_link_issue(record_request=made, by=clerk, now=issued))
    assert consent_link_find(token=token, now=issued + datetime.timedelta(days=6, hours=23))
    assert consent_link_find(token=token, now=issued + datetime.timedelta(days=7)) is None
    made.refresh_from_db()
    with pytest.raises(RetrievalError, match="no longer valid"):
        consent_sign(record_request=made, typed_name="Ryan Anthony",
                     signature_png=signature_png(), channel=PatientConsent.Channel.LINK,
                     now=issued + datetime.timedelta(days=8))


def test_a_new_link_replaces_the_old_one(clerk, record_request):
    made, _pin, _token = record_request()
    first = link_token(consent_link_issue(record_request=made, by=clerk))
    second = link_token(consent_link_issue(record_request=made, by=clerk))
    assert consent_link_find(token=first) is None
    assert consent_link_find(token=second).pk == made.pk
    assert consent_link_find(token="x" * 32) is None
    assert consent_link_find(token="") is None


def test_the_link_dies_with_the_request_and_when_the_upload_has_started(clerk,
                                                                         record_request):
    made, _pin, _token = record_request()
    token = link_token(consent_link_issue(record_request=made, by=clerk))
    RecordRequest.objects.filter(pk=made.pk).update(status=RecordRequest.Status.UPLOADING)
    assert consent_link_find(token=token) is None
    made.refresh_from_db()
    with pytest.raises(RetrievalError, match="started uploading"):
        consent_link_issue(record_request=made, by=clerk)

    other, _pin, _token = record_request()
    token = link_token(consent_link_issue(record_request=other, by=clerk))
    request_cancel(record_request=other, by=clerk)
    assert consent_link_find(token=token) is None


def test_the_link_can_be_emailed_without_patient_detail(clerk_client, clerk, record_request,
                                                        mailoutbox):
    made, _pin, _token = record_request()
    response = clerk_client.post(f"/clerk/requests/{made.pk}/consent-link/",
                                 {"email": "ryan@example.org"}, follow=True)
    body = response.content.decode()
    assert "Signing link for the patient" in body and "sent to ryan@example.org" in body
    message, = mailoutbox
    assert message.to == ["ryan@example.org"]
    link = re.search(r"https://images\.example\.org/consent/\S+/", message.body)[0]
    assert link in body  # shown once to the clerk too
    assert "1986" not in message.body and "Ryan" not in message.body
    # Shown once: the next visit of the page no longer has it.
    assert link not in clerk_client.get(f"/clerk/requests/{made.pk}/").content.decode()


def test_signing_through_a_faxed_requests_link_faxes_the_signed_page(
        client, clerk, record_request, fax_gateway):
    made, _pin, _token = record_request(method=RecordRequest.Method.FAX,
                                        consent_requested=True)
    assert not made.faxes.exists()  # waiting for the signature
    token = link_token(consent_link_issue(record_request=made, by=clerk))
    client.post(f"/consent/{token}/", signing_post())
    fax = made.faxes.get()
    assert fax.status == RequestFax.Status.QUEUED and fax.fax_number == "13145550142"


# --- Immutable -----------------------------------------------------------------------------


def test_a_signed_consent_is_never_changed_or_removed(record_request, support_user):
    made, _pin, _token = record_request()
    consent, _codes = consent_sign(record_request=made, typed_name="Ryan Anthony",
                                   signature_png=signature_png(),
                                   channel=PatientConsent.Channel.TABLET)
    consent.typed_name = "Someone Else"
    with pytest.raises(PermissionError):
        consent.save()
    with pytest.raises(PermissionError):
        PatientConsent.objects.filter(pk=consent.pk).update(typed_name="Someone Else")
    with pytest.raises(PermissionError):
        consent.delete()
    with pytest.raises(PermissionError):
        PatientConsent.objects.all().delete()
    assert PatientConsent.objects.get().typed_name == "Ryan Anthony"

    admin = admin_site._registry[PatientConsent]
    request = RequestFactory().get("/admin/")
    request.user = support_user
    assert not admin.has_change_permission(request, consent)
    assert not admin.has_delete_permission(request, consent)
    assert not admin.has_add_permission(request)


def test_a_signing_link_token_never_opens_the_upload_portal(clerk, record_request):
    made, _pin, _token = record_request()
    token = link_token(consent_link_issue(record_request=made, by=clerk))
    made.refresh_from_db()
    assert upload_token_hash(token) != made.consent_link_hash == consent_token_hash(token)
    assert not RecordRequest.objects.filter(link_token_hash=upload_token_hash(token)).exists()


def test_choosing_a_signing_link_on_the_form_sends_it_and_shows_it_once(clerk_client,
                                                                         mailoutbox):
    response = clerk_client.post("/clerk/requests/new/", {
        "target_name": "Mercy Hospital St. Louis", "family_name": "Anthony",
        "given_name": "Ryan", "birth_date": "1986-12-29", "details": "Chest X-ray",
        "method": "print", "consent": "link", "patient_email": "ryan@example.org"},
        follow=True)
    made = RecordRequest.objects.get()
    body = response.content.decode()
    message, = mailoutbox
    link = re.search(r"https://images\.example\.org/consent/\S+/", message.body)[0]
    assert link in body and "Waiting for the patient's signature" in body
    assert consent_link_find(token=link_token(link)).pk == made.pk
