"""Guessing upload PINs: an address is locked out after 10 wrong PINs, a facility's
portal stops checking PINs when they are sprayed from many addresses, an unknown
facility answers like a wrong PIN, and every wrong PIN and lock is audited. Counters are
in Redis (under `make test`), shared by every process."""

import datetime
import random
import re

import pytest
from django.test import Client

from pockethealth.codes import pin_generate
from pockethealth.models import AuditEvent
from retrieval.upload import PinRefused, PinThrottled, request_open_by_link, request_open_by_pin

# The start of an hour, so that a run of guesses stays inside one window.
T0 = datetime.datetime(2025, 6, 2, 14, 0, tzinfo=datetime.UTC)
GUESSES = 1_000


def guess(facility, pin, address, now):
    """One try through the service: "ok", "refused" or the throttle's reason."""
    try:
        request_open_by_pin(facility=facility, pin=pin, address=address, now=now)
    except PinRefused:
        return "refused"
    except PinThrottled as throttled:
        return throttled.reason
    return "ok"


def wrong_pin(rng, right):
    while (pin := f"{rng.randrange(10**6):06d}") == right:
        pass
    return pin


def test_the_counters_are_in_redis():
    from django.conf import settings

    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache"), (
        "run with CACHE_URL=redis://... (make test does)")


def test_a_thousand_wrong_pins_from_one_address_lock_it_after_ten(record_request, settings):
    made = record_request()
    facility = made.request.facility
    rng = random.Random(3)
    outcomes = []
    for i in range(GUESSES):
        # Every 50th try, from the 25th, is the right PIN: a locked address gets nothing.
        pin = made.pin if i % 50 == 25 else wrong_pin(rng, made.pin)
        outcomes.append(guess(facility, pin, "203.0.113.9",
                              T0 + datetime.timedelta(seconds=3 * i)))
    assert "ok" not in outcomes
    assert outcomes[:10] == ["refused"] * 10 == ["refused"] * settings.UPLOAD_PIN_ADDRESS_FAILURES
    assert outcomes[10:] == ["address"] * (GUESSES - 10)
    assert AuditEvent.objects.filter(action="retrieval.pin.failed").count() == 10
    block = AuditEvent.objects.get(action="retrieval.pin.block")
    assert block.client_address == "203.0.113.9" and block.detail["failures"] == 10
    made.request.refresh_from_db()
    assert made.request.status == "sent"

    # The locked address can still scan the Request Page's QR code: links are not PINs.
    during = T0 + datetime.timedelta(seconds=3 * GUESSES)
    assert request_open_by_link(facility=facility, token=made.link_token,
                                address="203.0.113.9", now=during).pk == made.request.pk
    # Someone else gets in meanwhile; the locked address once the lock has run out.
    assert guess(facility, made.pin, "198.51.100.3", T0 + datetime.timedelta(minutes=20)) == "ok"
    after = T0 + datetime.timedelta(seconds=3 * 9 + settings.UPLOAD_PIN_ADDRESS_BLOCK_SECONDS + 1)
    assert guess(facility, made.pin, "203.0.113.9", after) == "ok"


def test_a_thousand_wrong_pins_from_as_many_addresses_stop_the_facility_portal(
        record_request, other_facility, other_clerk, settings):
    made = record_request()
    facility = made.request.facility
    elsewhere = record_request(facility=other_facility, created_by=other_clerk)
    rng = random.Random(11)
    outcomes = []
    for i in range(GUESSES):
        address = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        pin = made.pin if i % 50 == 25 else wrong_pin(rng, made.pin)
        outcomes.append(guess(facility, pin, address,
                              T0 + datetime.timedelta(milliseconds=500 * i)))
    limit = settings.UPLOAD_PIN_FACILITY_FAILURES
    assert "address" not in outcomes  # one try per address: only the breaker helps
    # The right PIN got through only while the breaker was still closed.
    assert outcomes.count("ok") == len([i for i in range(limit + 1) if i % 50 == 25])
    assert outcomes.count("refused") == limit + 1
    assert set(outcomes[limit + 1 + outcomes.count("ok"):]) == {"breaker"}
    breaker = AuditEvent.objects.get(action="retrieval.pin.breaker")
    assert breaker.facility == facility and breaker.detail["failures"] == limit + 1

    # Another facility's portal is not affected, and the QR link still opens the request.
    now = T0 + datetime.timedelta(milliseconds=500 * GUESSES)
    assert guess(other_facility, elsewhere.pin, "10.9.9.9", now) == "ok"
    opened = request_open_by_link(facility=facility, token=made.link_token,
                                  address="10.9.9.9", now=now)
    assert opened.pk == made.request.pk
    # The breaker closes again after its time.
    later = now + datetime.timedelta(seconds=settings.UPLOAD_PIN_FACILITY_BREAKER_SECONDS + 1)
    assert guess(facility, made.pin, "10.9.9.10", later) == "ok"


def test_a_pin_of_another_facility_or_an_unknown_portal_is_just_wrong(
        record_request, other_facility, other_clerk):
    made = record_request()
    elsewhere = record_request(facility=other_facility, created_by=other_clerk)
    assert guess(made.request.facility, elsewhere.pin, "192.0.2.1", T0) == "refused"
    assert guess(None, made.pin, "192.0.2.1", T0) == "refused"
    assert AuditEvent.objects.filter(action="retrieval.pin.failed").count() == 2


def page_text(response) -> str:
    """The page without its per-response parts (the CSRF token)."""
    return re.sub(r'name="csrfmiddlewaretoken" value="[^"]+"|"X-CSRFToken": "[^"]+"', "",
                  response.content.decode())


def test_an_unknown_facility_answers_like_a_wrong_pin(record_request):
    made = record_request()
    wrong = f"{(int(made.pin) + 1) % 10**6:06d}"
    known = Client().post(f"/upload/{made.request.facility.short_name}", {"pin": wrong})
    unknown = Client().post(f"/upload/{made.request.facility.short_name}x", {"pin": wrong})
    assert known.status_code == unknown.status_code == 403
    assert page_text(known).replace(made.request.facility.short_name, "F") == \
        page_text(unknown).replace(made.request.facility.short_name + "x", "F")
    assert "This PIN does not open a request at this address" in page_text(known)
    # The form page itself does not tell either.
    assert page_text(Client().get(f"/upload/{made.request.facility.short_name}")).replace(
        made.request.facility.short_name, "F") == page_text(
        Client().get(f"/upload/{made.request.facility.short_name}x")).replace(
        made.request.facility.short_name + "x", "F")


def test_a_locked_address_is_told_plainly_how_long(record_request):
    made = record_request()
    client = Client(REMOTE_ADDR="203.0.113.50")
    base = f"/upload/{made.request.facility.short_name}"
    for _ in range(10):
        assert client.post(base, {"pin": pin_generate()}).status_code in (403, 303)
    response = client.post(base, {"pin": made.pin})
    assert response.status_code == 429
    assert int(response["Retry-After"]) == 3600
    assert "PIN entry is locked here for 60 minutes" in response.content.decode()


@pytest.mark.parametrize("typed", ["12345", "1234567", "12a456", "", "１２３４５６"])
def test_a_malformed_pin_is_corrected_not_counted(record_request, typed):
    made = record_request()
    response = Client().post(f"/upload/{made.request.facility.short_name}", {"pin": typed})
    assert response.status_code == 400
    assert not AuditEvent.objects.filter(action="retrieval.pin.failed").exists()


def test_a_pin_typed_with_spaces_opens_the_request(record_request):
    made = record_request()
    typed = f"{made.pin[:3]} {made.pin[3:]}"
    response = Client().post(f"/upload/{made.request.facility.short_name}", {"pin": typed})
    assert response.status_code == 303 and response["Location"].endswith("/request")
