"""Faxing the Access Page through an e-mail-to-fax gateway: a real SMTP server (aiosmtpd)
on a free port stands in for the gateway."""

import email
import email.policy
import time

import pytest

from pockethealth.models import AuditEvent
from sharing.models import Delivery, Share
from sharing.services import delivery_resend, delivery_send, share_create

from .conftest import fax_recipient, free_port


def fax_share(facility, clerk, patient, studies):
    return share_create(facility=facility, patient_or_identity=patient, studies=studies,
                        recipient=fax_recipient(), created_by=clerk).share


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def audited(share, action):
    return AuditEvent.objects.filter(object_type="sharing.share", object_id=str(share.pk),
                                     action=action)


def test_the_gateway_receives_the_access_page_at_digits_at_its_domain(
        facility, clerk, patient, studies, fax_gateway, smtp_server):
    share = fax_share(facility, clerk, patient, studies)
    delivery = share.deliveries.get()

    assert delivery_send(delivery_id=delivery.pk) is None

    (recipients, sender, raw), = smtp_server.mailbox.messages
    assert recipients == ["15615550142@fax.gateway.test"]
    assert sender == "films@st-anthony.test"
    message = parse(raw)
    attachment, = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == share.access_page.open("rb").read()
    # Nothing about the patient in the envelope.
    assert "LOVELACE" not in message["Subject"].upper()
    assert "LOVELACE" not in message.get_body(("plain",)).get_content().upper()
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.SENT and delivery.sent_at and delivery.attempts == 1
    assert audited(share, "share.fax.sent").get().outcome == "success"


def test_a_delivery_is_sent_once_however_often_the_task_runs(
        facility, clerk, patient, studies, fax_gateway, smtp_server):
    share = fax_share(facility, clerk, patient, studies)
    delivery = share.deliveries.get()
    delivery_send(delivery_id=delivery.pk)
    delivery_send(delivery_id=delivery.pk)
    assert len(smtp_server.mailbox.messages) == 1


def test_a_refused_number_is_recorded_as_failed_and_a_resend_goes_through(
        facility, clerk, patient, studies, fax_gateway, smtp_server):
    share = fax_share(facility, clerk, patient, studies)
    delivery = share.deliveries.get()
    smtp_server.mailbox.refuse = True

    assert delivery_send(delivery_id=delivery.pk) is None  # a 5xx is not retried

    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.FAILED
    assert "550" in delivery.error
    assert audited(share, "share.fax.failed").get().outcome == "failure"

    smtp_server.mailbox.refuse = False
    again = delivery_resend(delivery=delivery, requested_by=clerk)
    assert again.resend_of == delivery and again.status == Delivery.Status.QUEUED
    delivery_send(delivery_id=again.pk)
    again.refresh_from_db()
    assert again.status == Delivery.Status.SENT
    assert len(smtp_server.mailbox.messages) == 1
    assert audited(share, "share.fax.resend").get().detail == {"delivery": again.pk,
                                                               "resend_of": delivery.pk}


def test_an_unreachable_mail_server_is_retried_then_given_up(
        facility, clerk, patient, studies, fax_gateway, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nobody listens
    settings.FAX_MAX_ATTEMPTS = 2
    share = fax_share(facility, clerk, patient, studies)
    delivery = share.deliveries.get()

    retry_in = delivery_send(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert retry_in and retry_in > 0
    assert delivery.status == Delivery.Status.QUEUED and "could not be reached" in delivery.error

    assert delivery_send(delivery_id=delivery.pk) is None
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.FAILED and delivery.attempts == 2


def test_a_fax_for_a_revoked_share_is_not_sent(facility, clerk, patient, studies,
                                               fax_gateway, smtp_server):
    share = fax_share(facility, clerk, patient, studies)
    delivery = share.deliveries.get()
    Share.objects.filter(pk=share.pk).update(status="revoked", revoked_at=share.created_at)
    delivery_send(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.FAILED
    assert smtp_server.mailbox.messages == []


@pytest.fixture
def worker_mail_env(smtp_server, monkeypatch):
    """The worker is its own process: it reads the mail server from its environment,
    which must be set before ``celery_worker`` starts it."""
    monkeypatch.setenv("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
    monkeypatch.setenv("EMAIL_HOST", smtp_server.host)
    monkeypatch.setenv("EMAIL_PORT", str(smtp_server.port))


def test_a_celery_worker_faxes_a_new_share(transactional_db, smtp_server, worker_mail_env,
                                           celery_worker, facility, clerk, patient, studies,
                                           fax_gateway):
    share = fax_share(facility, clerk, patient, studies)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not smtp_server.mailbox.messages:
        time.sleep(0.2)
    assert smtp_server.mailbox.messages, "the worker sent no fax"
    (recipients, _sender, raw), = smtp_server.mailbox.messages
    assert recipients == ["15615550142@fax.gateway.test"]
    assert list(parse(raw).iter_attachments())[0].get_content()[:5] == b"%PDF-"
    while time.monotonic() < deadline and share.deliveries.get().status != "sent":
        time.sleep(0.2)
    assert share.deliveries.get().status == Delivery.Status.SENT
