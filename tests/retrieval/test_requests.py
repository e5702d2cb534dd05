"""Record requests, the requester's side: making one (from the form, from an archive
patient), PINs unique among a facility's open requests, searching without names in URLs,
faxing the Request Page, cancelling, and a request that never expires."""

import datetime
import email
import email.policy
import re

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from pockethealth.codes import pin_hash
from pockethealth.models import AuditEvent
from retrieval import services
from retrieval.models import RecordRequest, RequestFax
from retrieval.services import (
    RetrievalError,
    request_cancel,
    request_fax_deliver,
    request_fax_send,
    request_page_issue,
    request_timeline,
)
from tests.conftest import sign_in
from tests.sharing.conftest import make_patient

from .conftest import RYAN_DOB, outside_facility, request_patient


def audited(record_request, action):
    return AuditEvent.objects.filter(object_type="retrieval.recordrequest",
                                     object_id=str(record_request.pk), action=action)


def form_data(**changes):
    data = {
        "target_facility": "", "target_name": "Mercy Hospital St. Louis",
        "target_attn": "Film Library", "target_fax": "", "target_phone": "314-555-0100",
        "target_email": "", "family_name": "Anthony", "given_name": "Ryan",
        "birth_date": "1986-12-29", "mrn": "SAM-4471",
        "details": "Chest X-ray, 2019 to 2021", "method": "print", "consent": "none",
        "patient_email": "",
    }
    data.update(changes)
    return data


# --- Making a request --------------------------------------------------------------------


def test_a_clerk_makes_a_request_from_the_form_and_lands_on_its_page(clerk_client, clerk,
                                                                      facility):
    response = clerk_client.post("/clerk/requests/new/", form_data())
    assert response.status_code == 302
    record_request = RecordRequest.objects.get()
    assert response["Location"] == f"/clerk/requests/{record_request.pk}/"
    assert record_request.facility == facility and record_request.created_by == clerk
    assert record_request.patient_name == "Anthony^Ryan"
    assert record_request.patient_birth_date == RYAN_DOB
    assert record_request.status == RecordRequest.Status.SENT
    assert record_request.request_page and record_request.page_issued_at
    assert len(record_request.pin_hash) == 64 and len(record_request.link_token_hash) == 64
    assert audited(record_request, "request.create").get().actor_user == clerk

    body = clerk_client.get(response["Location"]).content.decode()
    assert "ANTHONY, Ryan" in body and "Mercy Hospital St. Louis" in body
    assert "Open Request Page to print" in body
    pdf = clerk_client.get(f"/clerk/requests/{record_request.pk}/request-page.pdf")
    assert pdf["Content-Type"] == "application/pdf" and pdf["Cache-Control"] == "no-store"
    assert b"".join(pdf.streaming_content).startswith(b"%PDF")
    assert audited(record_request, "request.page.open").exists()


def test_a_request_started_from_an_archive_patient_is_filled_in_and_linked(
        clerk_client, facility):
    patient = make_patient(facility, name="LOVELACE^Ada^King", patient_id="SMH-1815")
    archive_page = clerk_client.get(f"/clerk/archive/patients/{patient.pk}/").content.decode()
    assert f'href="/clerk/requests/new/?patient={patient.pk}"' in archive_page
    body = clerk_client.get(f"/clerk/requests/new/?patient={patient.pk}").content.decode()
    assert 'value="LOVELACE"' in body and 'value="Ada King"' in body
    assert 'value="1981-08-29"' in body and 'value="SMH-1815"' in body

    response = clerk_client.post("/clerk/requests/new/", form_data(
        patient=patient.pk, family_name="LOVELACE", given_name="Ada King",
        birth_date="1981-08-29", mrn="SMH-1815"))
    assert response.status_code == 302
    record_request = RecordRequest.objects.get()
    assert record_request.patient == patient
    assert record_request.patient_name == "LOVELACE^Ada King"
    assert audited(record_request, "request.create").get().patient_ref == str(patient.pk)


def test_another_facilitys_patient_cannot_start_a_request(clerk_client, other_facility):
    stranger = make_patient(other_facility)
    assert clerk_client.get(f"/clerk/requests/new/?patient={stranger.pk}").status_code == 404
    assert clerk_client.post("/clerk/requests/new/",
                             form_data(patient=stranger.pk)).status_code == 404
    assert not RecordRequest.objects.exists()


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"details": ""}, "details", "This field is required."),
    ({"details": "x" * 1001}, "details", "at most 1000 characters"),
    ({"target_name": ""}, "target_name", "Name the facility you are asking."),
    ({"family_name": "Anthony^Ryan"}, "family_name", "Leave out the characters"),
    ({"birth_date": "2999-01-01"}, "birth_date", "real date of birth"),
    ({"target_fax": "12-34"}, "target_fax", "7 to 15 digits"),
    ({"method": "fax"}, "target_fax", "Enter the fax number to fax the request."),
    ({"patient_email": "ryan@example.org"}, "patient_email", "only to send a signing link"),
])
def test_the_form_says_what_is_wrong_and_makes_nothing(clerk_client, changes, field,
                                                       message):
    response = clerk_client.post("/clerk/requests/new/", form_data(**changes))
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert field in errors and message in " ".join(errors[field]), errors
    assert not RecordRequest.objects.exists()


def test_faxing_needs_a_fax_gateway(clerk_client):
    response = clerk_client.post("/clerk/requests/new/", form_data(
        method="fax", target_fax="+1 (314) 555-0142"))
    assert response.status_code == 200
    assert "Faxing is not set up" in response.content.decode()
    assert not RecordRequest.objects.exists()


def test_a_facility_on_the_platform_can_be_picked_and_names_the_request(
        clerk_client, other_facility, facility):
    body = clerk_client.get("/clerk/requests/new/").content.decode()
    assert other_facility.name in body
    assert f'<option value="{facility.pk}"' not in body  # never itself
    response = clerk_client.post("/clerk/requests/new/", form_data(
        target_facility=other_facility.pk, target_name=""))
    assert response.status_code == 302
    record_request = RecordRequest.objects.get()
    assert record_request.target_facility == other_facility
    assert record_request.target_name == other_facility.name


def test_a_facility_cannot_ask_itself(record_request, facility):
    with pytest.raises(RetrievalError, match="cannot ask itself"):
        record_request(target=outside_facility(facility=facility))


# --- PINs --------------------------------------------------------------------------------


def test_pins_are_unique_among_the_facilitys_open_requests(facility, clerk):
    """2,000 open requests draw 2,000 different PINs (about two draws in that many hit a
    PIN already taken and are drawn again)."""
    hashes = []
    for _i in range(2000):
        row = RecordRequest(facility=facility, created_by=clerk, target_name="Mercy",
                            patient_name="ANTHONY^Ryan", patient_birth_date=RYAN_DOB,
                            details="Chest")
        services._save_with_fresh_codes(row)
        hashes.append(row.pin_hash)
    assert len(set(hashes)) == 2000
    assert RecordRequest.objects.filter(facility=facility).values(
        "pin_hash").distinct().count() == 2000


def test_a_pin_already_open_is_drawn_again(record_request, monkeypatch):
    first, first_pin, _token = record_request()
    drawn = iter([first_pin, first_pin, "424242"])
    monkeypatch.setattr(services, "pin_generate", lambda: next(drawn))
    second, pin, _token = record_request()
    assert pin == "424242" and second.pin_hash == pin_hash("424242")
    assert first.pin_hash != second.pin_hash


def test_a_closed_requests_pin_may_serve_again_and_other_facilities_are_apart(
        record_request, clerk, other_facility, other_clerk, monkeypatch):
    first, pin, _token = record_request()
    request_cancel(record_request=first, by=clerk)
    monkeypatch.setattr(services, "pin_generate", lambda: pin)
    again, same_pin, _token = record_request()
    assert same_pin == pin and again.pin_hash == first.pin_hash
    elsewhere, pin_there, _token = record_request(facility=other_facility,
                                                  created_by=other_clerk)
    assert pin_there == pin


def test_the_database_refuses_two_open_requests_of_a_facility_with_one_pin(record_request):
    first, _pin, _token = record_request()
    second, _pin, _token = record_request()
    with pytest.raises(IntegrityError), transaction.atomic():
        RecordRequest.objects.filter(pk=second.pk).update(pin_hash=first.pin_hash)


def test_when_no_free_pin_can_be_drawn_the_clerk_is_told(record_request, monkeypatch):
    _first, pin, _token = record_request()
    monkeypatch.setattr(services, "pin_generate", lambda: pin)
    with pytest.raises(RetrievalError, match="No free PIN"):
        record_request()
    assert RecordRequest.objects.count() == 1


def test_a_new_page_draws_a_new_pin_and_link_and_the_old_ones_stop(record_request, clerk):
    made, pin, token = record_request()
    old_page = made.request_page.name
    reissued = request_page_issue(record_request=made, by=clerk)
    made.refresh_from_db()
    assert reissued.pin != pin or reissued.link_token != token
    assert made.pin_hash == pin_hash(reissued.pin) != pin_hash(pin)
    assert made.link_token_hash == services.upload_token_hash(reissued.link_token)
    assert made.request_page.name != old_page
    assert audited(made, "request.page.issue").get().detail == {"reason": "reissue"}


# --- Finding requests ----------------------------------------------------------------------


def test_searching_keeps_the_patients_name_out_of_every_url(clerk_client, record_request,
                                                            clerk):
    record_request()
    record_request(patient=request_patient(name="BABBAGE^Charles", mrn="SAM-1791"),
                   target=outside_facility(name="Palm Beach MRI"))
    response = clerk_client.post("/clerk/requests/", {"q": "anthony", "target": "",
                                                      "status": ""})
    assert response.status_code == 302 and response["Location"] == "/clerk/requests/"
    body = clerk_client.get("/clerk/requests/").content.decode()
    assert "ANTHONY, Ryan" in body and "BABBAGE" not in body
    links = re.findall(r'(?:href|hx-get|hx-post|action)="([^"]*)"', body)
    assert links and not any("anthony" in link.lower() for link in links)
    assert AuditEvent.objects.filter(action="request.search", actor_user=clerk).exists()

    clerk_client.post("/clerk/requests/", {"q": "SAM-1791", "target": "", "status": ""})
    assert "BABBAGE" in clerk_client.get("/clerk/requests/").content.decode()
    clerk_client.post("/clerk/requests/", {"q": "", "target": "palm", "status": ""})
    body = clerk_client.get("/clerk/requests/").content.decode()
    assert "BABBAGE" in body and "ANTHONY" not in body


def test_the_list_filters_by_status_and_htmx_gets_only_the_rows(clerk_client, record_request,
                                                                clerk):
    cancelled, _pin, _token = record_request(
        patient=request_patient(name="BABBAGE^Charles"))
    request_cancel(record_request=cancelled, by=clerk)
    record_request()
    clerk_client.post("/clerk/requests/", {"q": "", "target": "", "status": "open"})
    body = clerk_client.get("/clerk/requests/").content.decode()
    assert "ANTHONY" in body and "BABBAGE" not in body
    response = clerk_client.post("/clerk/requests/", {"q": "", "target": "",
                                                      "status": "cancelled"},
                                 HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert response.status_code == 200 and "<html" not in body
    assert "BABBAGE" in body and "ANTHONY" not in body and "Cancelled" in body


def test_another_facilitys_clerk_gets_404_everywhere(client, other_clerk, record_request):
    made, _pin, _token = record_request()
    sign_in(client, other_clerk)
    pk = made.pk
    for url in (f"/clerk/requests/{pk}/", f"/clerk/requests/{pk}/live/",
                f"/clerk/requests/{pk}/request-page.pdf", f"/clerk/requests/{pk}/sign/",
                f"/clerk/requests/{pk}/signed/"):
        assert client.get(url).status_code == 404, url
    for url in (f"/clerk/requests/{pk}/cancel/", f"/clerk/requests/{pk}/reissue/",
                f"/clerk/requests/{pk}/fax/", f"/clerk/requests/{pk}/consent-link/"):
        assert client.post(url).status_code == 404, url
    made.refresh_from_db()
    assert made.status == RecordRequest.Status.SENT
    assert "ANTHONY" not in client.get("/clerk/requests/").content.decode()


def test_the_request_pages_need_a_signed_in_clerk(client, record_request):
    made, _pin, _token = record_request()
    for url in (f"/clerk/requests/{made.pk}/", f"/clerk/requests/{made.pk}/request-page.pdf",
                "/clerk/requests/", "/clerk/requests/new/"):
        response = client.get(url)
        assert response.status_code == 302 and "/account/login/" in response["Location"]


def test_the_clerks_navigation_leads_to_the_requests(clerk_client):
    body = clerk_client.get("/clerk/").content.decode()
    assert 'href="/clerk/requests/"' in body and ">Requests<" in body
    body = clerk_client.get("/clerk/requests/").content.decode()
    assert 'href="/clerk/requests/" aria-current="page"' in body


# --- Cancel ------------------------------------------------------------------------------


def test_cancelling_closes_the_request_once_and_stops_queued_faxes(
        record_request, clerk, fax_gateway):
    made, _pin, _token = record_request(method=RecordRequest.Method.FAX)
    fax = made.faxes.get()
    assert fax.status == RequestFax.Status.QUEUED
    request_cancel(record_request=made, by=clerk)
    made.refresh_from_db()
    assert made.status == RecordRequest.Status.CANCELLED and not made.is_open
    assert made.cancelled_by == clerk and made.cancelled_at
    fax.refresh_from_db()
    assert fax.status == RequestFax.Status.FAILED and "cancelled" in fax.error
    assert audited(made, "request.cancel").get().detail == {"faxes_stopped": 1}
    # A second cancel changes nothing and records nothing more.
    request_cancel(record_request=made, by=clerk)
    assert audited(made, "request.cancel").count() == 1
    assert request_fax_deliver(fax_id=fax.pk) is None
    with pytest.raises(RetrievalError, match="closed"):
        request_page_issue(record_request=made, by=clerk)


def test_cancelling_from_the_page_asks_first_and_says_what_happened(clerk_client,
                                                                    record_request):
    made, _pin, _token = record_request()
    body = clerk_client.get(f"/clerk/requests/{made.pk}/").content.decode()
    assert "Cancel this request…" in body and "Yes, cancel the request" in body
    assert clerk_client.get(f"/clerk/requests/{made.pk}/cancel/").status_code == 405
    response = clerk_client.post(f"/clerk/requests/{made.pk}/cancel/", follow=True)
    body = response.content.decode()
    assert "Request cancelled. Its PIN and link no longer open it." in body
    assert "Cancel this request…" not in body
    made.refresh_from_db()
    assert made.status == RecordRequest.Status.CANCELLED


@pytest.mark.parametrize("status", [RecordRequest.Status.DECLINED,
                                    RecordRequest.Status.IMPORTED])
def test_a_declined_or_imported_request_cannot_be_cancelled(record_request, clerk, status):
    made, _pin, _token = record_request()
    RecordRequest.objects.filter(pk=made.pk).update(status=status)
    made.refresh_from_db()
    with pytest.raises(RetrievalError, match="can no longer be cancelled"):
        request_cancel(record_request=made, by=clerk)
    made.refresh_from_db()
    assert made.status == status and not audited(made, "request.cancel").exists()


def test_a_request_is_still_open_a_year_later(record_request, clerk, fax_gateway):
    made_at = datetime.datetime(2025, 3, 1, 14, 0, tzinfo=datetime.UTC)
    made, _pin, _token = record_request(now=made_at)
    a_year_on = made_at + datetime.timedelta(days=366)
    made.refresh_from_db()
    assert made.is_open and made.status == RecordRequest.Status.SENT
    reissued = request_page_issue(record_request=made, by=clerk, now=a_year_on)
    made.refresh_from_db()
    assert made.pin_hash == pin_hash(reissued.pin) and made.page_issued_at == a_year_on
    assert request_fax_send(record_request=made, requested_by=clerk,
                            fax_number="3145550142").status == RequestFax.Status.QUEUED
    request_cancel(record_request=made, by=clerk, now=a_year_on)
    made.refresh_from_db()
    assert made.cancelled_at == a_year_on


def test_the_timeline_shows_the_steps_reached_and_how_it_ended(record_request, clerk):
    made, _pin, _token = record_request()
    steps = request_timeline(made)
    assert [s.reached for s in steps] == [True, False, False, False, False]
    assert steps[0].current and steps[0].when == made.page_issued_at
    opened = timezone.now()
    RecordRequest.objects.filter(pk=made.pk).update(status=RecordRequest.Status.OPENED,
                                                    opened_at=opened)
    made.refresh_from_db()
    steps = request_timeline(made)
    assert [s.reached for s in steps] == [True, True, False, False, False]
    assert steps[1].current and steps[1].when == opened
    request_cancel(record_request=made, by=clerk)
    made.refresh_from_db()
    steps = request_timeline(made)
    assert [str(s.label) for s in steps] == ["Request made", "Opened by the facility",
                                             "Cancelled"]
    assert steps[-1].current and steps[-1].when == made.cancelled_at


# --- Fax ---------------------------------------------------------------------------------


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_a_faxed_request_reaches_the_gateway_with_its_page_and_no_patient_detail(
        record_request, fax_gateway, smtp_server):
    made, _pin, _token = record_request(method=RecordRequest.Method.FAX)
    fax = made.faxes.get()
    assert fax.address == "13145550142@fax.gateway.test"
    assert audited(made, "request.fax.queue").exists()

    assert request_fax_deliver(fax_id=fax.pk) is None
    (recipients, sender, raw), = smtp_server.mailbox.messages
    assert recipients == ["13145550142@fax.gateway.test"]
    assert sender == "films@st-anthony.test"
    message = parse(raw)
    attachment, = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == made.request_page.open("rb").read()
    # Nothing about the patient in the envelope (the facility is "St. Anthony's").
    for text in (message["Subject"], message.get_body(("plain",)).get_content()):
        assert "ryan" not in text.lower() and "1986" not in text
    fax.refresh_from_db()
    assert fax.status == RequestFax.Status.SENT and fax.attempts == 1
    assert audited(made, "request.fax.sent").get().outcome == "success"
    # The task running twice sends nothing twice.
    assert request_fax_deliver(fax_id=fax.pk) is None
    assert len(smtp_server.mailbox.messages) == 1


def test_a_refused_fax_number_fails_at_once_and_a_clerk_can_fax_again(
        record_request, clerk, fax_gateway, smtp_server):
    made, _pin, _token = record_request(method=RecordRequest.Method.FAX)
    smtp_server.mailbox.refuse = True
    fax = made.faxes.get()
    assert request_fax_deliver(fax_id=fax.pk) is None
    fax.refresh_from_db()
    assert fax.status == RequestFax.Status.FAILED and "550" in fax.error
    assert audited(made, "request.fax.failed").get().outcome == "failure"

    smtp_server.mailbox.refuse = False
    again = request_fax_send(record_request=made, requested_by=clerk,
                             fax_number="+1 314 555 0199")
    assert again.fax_number == "13145550199"
    assert request_fax_deliver(fax_id=again.pk) is None
    assert smtp_server.mailbox.messages[0][0] == ["13145550199@fax.gateway.test"]


def test_an_unreachable_gateway_is_retried_later(record_request, fax_gateway, settings):
    from tests.sharing.conftest import free_port

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = (
        "127.0.0.1", free_port(), 2)
    made, _pin, _token = record_request(method=RecordRequest.Method.FAX)
    fax = made.faxes.get()
    delay = request_fax_deliver(fax_id=fax.pk)
    assert delay == settings.FAX_RETRY_BACKOFF_SECONDS
    fax.refresh_from_db()
    assert fax.status == RequestFax.Status.QUEUED and "could not be reached" in fax.error


def test_the_fax_form_on_the_page_queues_a_fax(clerk_client, record_request, fax_gateway):
    made, _pin, _token = record_request()
    body = clerk_client.get(f"/clerk/requests/{made.pk}/").content.decode()
    assert "Fax the current Request Page to" not in body  # printed, and never faxed
    made_fax, _pin, _token = record_request(method=RecordRequest.Method.FAX)
    response = clerk_client.post(f"/clerk/requests/{made_fax.pk}/fax/",
                                 {"fax_number": "314-555-0177"}, follow=True)
    assert "queued to be faxed" in response.content.decode()
    assert made_fax.faxes.filter(fax_number="3145550177").exists()
    body = clerk_client.get(f"/clerk/requests/{made_fax.pk}/").content.decode()
    assert f'hx-get="/clerk/requests/{made_fax.pk}/live/"' in body


def test_times_are_stored_in_utc_and_shown_in_the_facilitys_zone(clerk_client,
                                                                 record_request):
    made_at = datetime.datetime(2025, 3, 1, 3, 30, tzinfo=datetime.UTC)
    made, _pin, _token = record_request(now=made_at)
    made.refresh_from_db()
    assert made.created_at == made_at
    body = clerk_client.get(f"/clerk/requests/{made.pk}/").content.decode()
    assert "2025/02/28 22:30" in body  # Toronto, five hours behind in winter
    body = clerk_client.get("/clerk/requests/").content.decode()
    assert "2025/02/28" in body and "22:30" in body
