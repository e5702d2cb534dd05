"""Counting wrong guesses at /view, so that guessing a security code and a date of birth
is hopeless.

Three limits, all counted in the shared cache (Redis in production), so every web
process sees the same numbers:

- per client address: VIEW_ADDRESS_FAILURES wrong pairs in VIEW_ADDRESS_WINDOW_SECONDS
  refuse the address for VIEW_ADDRESS_BLOCK_SECONDS. IPv6 clients are counted per /64,
  the block a single subscriber usually holds;
- site-wide: more than VIEW_GLOBAL_FAILURES_PER_MINUTE wrong pairs in a minute, from all
  addresses together, open a breaker that refuses every attempt for VIEW_BREAKER_SECONDS
  (the answer to a botnet spraying codes, one or two per address);
- per share: wrong dates of birth with a share's right code lock the share; that one is
  kept on the share's row (``sharing.recipient``), since a person must lift it.

What the sums mean: a code is 9 symbols of 32 (3.5·10¹³ values). At the breaker's 300
guesses a minute, a whole year of spraying tries 1.6·10⁸ codes; with a million live
shares that finds a live code four or five times, and each find still needs the patient's
date of birth within 10 tries before the share locks.

Counters are fixed windows keyed by the window's number, computed from the ``now``
passed in (so tests move time without sleeping); the cache's expiry only cleans up.
``cache.incr`` is Redis INCR, atomic across processes. ``add`` creates a window's
counter once with its expiry, which outlives the window, so INCR never meets a missing
key while the window is current. Blocks store the moment they end, again compared with
``now``.

When the cache cannot be reached, attempts are refused (fail closed): guessing must
never become unlimited because Redis is down.

The same counters throttle other guesses with limits of their own (``Limits``): the
upload PINs of Record Retrieval count per address and, for the breaker, per facility
(``scope``)."""

import datetime
import ipaddress
import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

log = logging.getLogger(__name__)

PREFIX = "view-guess"
# Extra life of a cache entry after the moment that matters to it.
SLACK_SECONDS = 60

ADDRESS = "address"
BREAKER = "breaker"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Limits:
    """What one kind of guess is allowed: ``address_failures`` wrong guesses from an
    address in ``address_window`` seconds block it for ``address_block`` seconds; more
    than ``breaker_failures`` in ``breaker_window`` seconds, all addresses together (in
    one scope), open the breaker for ``breaker_seconds``."""

    prefix: str
    address_failures: int
    address_window: int
    address_block: int
    breaker_failures: int
    breaker_window: int
    breaker_seconds: int


def view_limits() -> Limits:
    """The limits of /view, read from the settings at each call (tests change them)."""
    return Limits(prefix=PREFIX, address_failures=settings.VIEW_ADDRESS_FAILURES,
                  address_window=settings.VIEW_ADDRESS_WINDOW_SECONDS,
                  address_block=settings.VIEW_ADDRESS_BLOCK_SECONDS,
                  breaker_failures=settings.VIEW_GLOBAL_FAILURES_PER_MINUTE,
                  breaker_window=60, breaker_seconds=settings.VIEW_BREAKER_SECONDS)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # ADDRESS, BREAKER or UNAVAILABLE when refused
    retry_after: int = 0  # seconds


@dataclass(frozen=True)
class FailureCount:
    address_failures: int
    global_failures: int  # in the breaker's window and scope
    address_blocked: bool  # this failure started a block of the address
    breaker_opened: bool  # this failure opened the breaker


def address_key(address: str | None) -> str:
    """What a client address is counted as: itself for IPv4, its /64 for IPv6, and one
    shared bucket for a request without an address (never the case behind a proxy)."""
    if not address:
        return "none"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "invalid"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address) + "/64"
    return str(ip)


def _ts(now: datetime.datetime) -> int:
    return int(now.timestamp())


def _keys(address: str | None, limits: Limits, scope: str) -> tuple[str, str]:
    breaker = f"{limits.prefix}:breaker" + (f":{scope}" if scope else "")
    return (f"{limits.prefix}:block:{address_key(address)}", breaker)


def attempt_check(*, address: str | None, now: datetime.datetime,
                  limits: Limits | None = None, scope: str = "") -> Verdict:
    """May a guess from ``address`` be checked at ``now``? (``scope`` names the breaker
    that applies; the limits are those of /view unless given.)"""
    limits = limits or view_limits()
    block_key, breaker_key = _keys(address, limits, scope)
    try:
        until = cache.get_many([block_key, breaker_key])
    except Exception:  # any cache failure: refuse rather than count nothing
        log.warning("guess throttle: cache unavailable; refusing %s attempts", limits.prefix,
                    exc_info=True)
        return Verdict(False, UNAVAILABLE, 60)
    ts = _ts(now)
    breaker_until = until.get(breaker_key) or 0
    if breaker_until > ts:
        return Verdict(False, BREAKER, breaker_until - ts)
    block_until = until.get(block_key) or 0
    if block_until > ts:
        return Verdict(False, ADDRESS, block_until - ts)
    return Verdict(True)


def failure_record(*, address: str | None, now: datetime.datetime,
                   limits: Limits | None = None, scope: str = "") -> FailureCount:
    """Count one wrong guess from ``address``; start a block or open the breaker when
    this failure reaches a limit."""
    limits = limits or view_limits()
    ts = _ts(now)
    window = limits.address_window
    addr = address_key(address)
    address_failures = _count(f"{limits.prefix}:fail:{addr}:{ts // window}", timeout=window)
    breaker_window = limits.breaker_window
    all_key = f"{limits.prefix}:all" + (f":{scope}" if scope else "")
    global_failures = _count(f"{all_key}:{ts // breaker_window}", timeout=breaker_window)
    block_key, breaker_key = _keys(address, limits, scope)
    blocked = opened = False
    if address_failures >= limits.address_failures:
        blocked = _open(block_key, until=ts + limits.address_block, ts=ts)
    if global_failures > limits.breaker_failures:
        opened = _open(breaker_key, until=ts + limits.breaker_seconds, ts=ts)
    return FailureCount(address_failures, global_failures, blocked, opened)


def _count(key: str, *, timeout: int) -> int:
    cache.add(key, 0, timeout=timeout + SLACK_SECONDS)
    try:
        return cache.incr(key)
    except ValueError:
        # Evicted between add and incr (a full cache): start again from this failure.
        cache.set(key, 1, timeout=timeout + SLACK_SECONDS)
        return 1


def _open(key: str, *, until: int, ts: int) -> bool:
    """Set a block ending at ``until`` unless one is already running; True when this
    call started it (so it is recorded once)."""
    current = cache.get(key) or 0
    if current > ts:
        return False
    cache.set(key, until, timeout=until - ts + SLACK_SECONDS)
    return True


def address_unblock(*, address: str, limits: Limits | None = None) -> None:
    """Lift the block of one address (support, after checking who it is)."""
    cache.delete(_keys(address, limits or view_limits(), "")[0])
