"""Guessing is throttled per client address, site-wide and per share, with counters in
Redis (under `make test`) that every process shares."""

import datetime
import random

import pytest
from django.test import Client

from pockethealth.codes import code_format, code_generate
from pockethealth.models import AuditEvent
from sharing import throttle
from sharing.models import Share
from sharing.recipient import AccessDenied, AccessThrottled, share_unlock

from .conftest import ADA_DOB

# The start of a minute, so that a run of guesses stays inside one breaker window.
T0 = datetime.datetime(2025, 6, 2, 14, 0, tzinfo=datetime.UTC)
GUESSES = 10_000


def guess(code, birth_date, address, now):
    """One try through the service: "ok", "denied" or the throttle's reason."""
    try:
        share_unlock(code=code, birth_date=birth_date, address=address, now=now)
    except AccessDenied:
        return "denied"
    except AccessThrottled as refused:
        return refused.reason
    return "ok"


def random_dob(rng):
    return datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(30_000))


def test_the_counters_are_in_redis():
    from django.conf import settings

    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache"), (
        "run with CACHE_URL=redis://... (make test does)")


def test_ten_thousand_guesses_from_one_address_never_succeed_and_stop_at_the_limit(
        share_made, settings):
    rng = random.Random(5)
    outcomes = []
    for i in range(GUESSES):
        # Mostly sprayed codes; every 50th the share's real code with a random birth date.
        code = share_made.code if i % 50 == 0 else code_generate()
        outcomes.append(guess(code, random_dob(rng), "203.0.113.9",
                              T0 + datetime.timedelta(milliseconds=50 * i)))
    assert "ok" not in outcomes
    assert outcomes.count("denied") == settings.VIEW_ADDRESS_FAILURES == 20
    assert outcomes[20:] == ["address"] * (GUESSES - 20)
    block = AuditEvent.objects.get(action="view.address.block")
    assert block.client_address == "203.0.113.9" and block.detail["failures"] == 20
    assert AuditEvent.objects.filter(action="share.access.denied").count() == 20

    # Someone else, elsewhere, still gets in; the blocked address after the block ends.
    assert guess(share_made.code, ADA_DOB, "198.51.100.3", T0 + datetime.timedelta(
        minutes=20)) == "ok"
    after = T0 + datetime.timedelta(milliseconds=50 * 19) + datetime.timedelta(
        seconds=settings.VIEW_ADDRESS_BLOCK_SECONDS + 1)
    assert guess(share_made.code, ADA_DOB, "203.0.113.9", after) == "ok"


def test_ten_thousand_guesses_from_as_many_addresses_trip_the_site_wide_breaker(
        share_made, settings):
    rng = random.Random(7)
    outcomes = []
    for i in range(GUESSES):
        address = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
        code = share_made.code if i % 50 == 0 else code_generate()
        outcomes.append(guess(code, random_dob(rng), address,
                              T0 + datetime.timedelta(milliseconds=5 * i)))
    limit = settings.VIEW_GLOBAL_FAILURES_PER_MINUTE
    assert "ok" not in outcomes
    assert "address" not in outcomes  # one guess per address: only the breaker can help
    assert outcomes.count("denied") == limit + 1
    assert outcomes[limit + 1:] == ["breaker"] * (GUESSES - limit - 1)
    opened = AuditEvent.objects.get(action="view.breaker.open")
    assert opened.actor_type == "system" and opened.detail["failures_this_minute"] == limit + 1

    # While the breaker is open, even the right pair waits; a minute later it is checked.
    during = T0 + datetime.timedelta(seconds=55)
    assert guess(share_made.code, ADA_DOB, "192.0.2.200", during) == "breaker"
    after = T0 + datetime.timedelta(seconds=(limit + 1) * 0.005 + settings.VIEW_BREAKER_SECONDS
                                    + 1)
    assert guess(share_made.code, ADA_DOB, "192.0.2.200", after) == "ok"
    # The share's real code was among the checked guesses (every 50th), with wrong birth
    # dates, each counted against it; then the right pair cleared the count.
    checked_with_real_code = len(range(0, limit + 1, 50))
    assert AuditEvent.objects.filter(
        action="share.access.denied", object_id=str(share_made.share.pk)).count() == \
        checked_with_real_code
    assert Share.objects.get(pk=share_made.share.pk).failed_dob_attempts == 0


def test_guesses_through_the_page_are_refused_with_a_plain_429_after_the_limit(
        share_made, settings):
    client = Client(REMOTE_ADDR="203.0.113.50")
    for _ in range(settings.VIEW_ADDRESS_FAILURES):
        response = client.post("/view", {"code": code_format(code_generate()),
                                         "birth_date": "1981/08/29"})
        assert response.status_code == 403
    response = client.post("/view", {"code": share_made.code, "birth_date": "1981/08/29"})
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= settings.VIEW_ADDRESS_BLOCK_SECONDS
    assert "Too many attempts from your network" in response.content.decode()
    assert response["Cache-Control"] == "no-store"


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(share_made, settings):
    # An untrusted peer cannot dodge its block by claiming another address.
    for _ in range(settings.VIEW_ADDRESS_FAILURES):
        Client(REMOTE_ADDR="203.0.113.60").post(
            "/view", {"code": code_format(code_generate()), "birth_date": "1981/08/29"})
    forged = Client(REMOTE_ADDR="203.0.113.60", HTTP_X_FORWARDED_FOR="198.51.100.61")
    response = forged.post("/view", {"code": share_made.code, "birth_date": "1981/08/29"})
    assert response.status_code == 429

    # Behind our own proxy, each client is counted by the address the proxy saw.
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    for _ in range(settings.VIEW_ADDRESS_FAILURES):
        Client(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.70").post(
            "/view", {"code": code_format(code_generate()), "birth_date": "1981/08/29"})
    assert Client(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.70").post(
        "/view", {"code": share_made.code, "birth_date": "1981/08/29"}).status_code == 429
    response = Client(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.71").post(
        "/view", {"code": share_made.code, "birth_date": "1981/08/29"})
    assert response.status_code == 303
    denied = AuditEvent.objects.filter(action="share.access.denied",
                                       client_address="198.51.100.70")
    assert denied.count() == settings.VIEW_ADDRESS_FAILURES


def test_an_ipv6_client_is_counted_per_64_block():
    assert throttle.address_key("2001:db8:1:2:aaaa::1") == throttle.address_key(
        "2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert throttle.address_key("2001:db8:1:3::1") != throttle.address_key("2001:db8:1:2::1")
    assert throttle.address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert throttle.address_key("192.0.2.1") == "192.0.2.1"


def test_counting_is_atomic_across_threads(settings):
    """Many processes count into one key: INCR loses nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def fail(i):
        try:
            throttle.failure_record(address="198.51.100.99", now=T0)
        finally:
            connections.close_all()

    settings.VIEW_ADDRESS_FAILURES = 10_000
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(fail, range(400)))
    counted = throttle.failure_record(address="198.51.100.99", now=T0)
    assert counted.address_failures == 401 and counted.global_failures == 401


def test_guessing_is_refused_while_the_cache_is_unreachable(share_made, settings):
    settings.CACHES = {"default": {"BACKEND": "pockethealth.cache.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0"}}
    with pytest.raises(AccessThrottled) as refused:
        share_unlock(code=share_made.code, birth_date=ADA_DOB, address="192.0.2.1", now=T0)
    assert refused.value.reason == "unavailable"
