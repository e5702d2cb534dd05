"""The cast of the test-suite (a facility, its clerk, a clerk of another facility, a
stranger) and the real parts the suite starts: a Celery worker on the configured broker
and headless Chromium through Playwright."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from pockethealth.models import Facility, StaffUser

BASE_DIR = Path(__file__).resolve().parent.parent
CLERK_PASSWORD = "correct-horse-battery-staple"
CHROMIUM = "/usr/bin/chromium"


def totp_now(device: TOTPDevice, offset: int = 0) -> str:
    return f"{totp(device.bin_key, device.step, device.t0, device.digits, offset):06d}"


@pytest.fixture(autouse=True)
def _isolated_storage(settings, tmp_path):
    """Each test stores DICOM in its own folder."""
    storages = {name: dict(conf) for name, conf in settings.STORAGES.items()}
    for name in ("default", "archive"):
        storages[name]["OPTIONS"] = {
            **storages[name]["OPTIONS"], "location": str(tmp_path / "storage" / name)
        }
    settings.STORAGES = storages  # Django's setting_changed handler drops cached storages
    settings.SPOOL_DIR = tmp_path / "spool"


@pytest.fixture(autouse=True)
def _empty_cache():
    """Throttling counters live in the cache (Redis under `make test`): start clean."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def testdata_dir() -> Path:
    path = Path(settings.TESTDATA_DICOM_DIR)
    assert path.is_dir(), f"public DICOM test corpus not found at {path} (TESTDATA_DICOM_DIR)"
    return path


@pytest.fixture
def facility(db) -> Facility:
    return Facility.objects.create(
        name="St. Anthony's Memorial Hospital", short_name="st-anthony",
        phone="555-0100", fax="555-0101", time_zone="America/Toronto",
    )


@pytest.fixture
def other_facility(db) -> Facility:
    return Facility.objects.create(
        name="Palm Beach MRI Clinic", short_name="palm-beach", time_zone="America/New_York",
    )


def make_staff(facility, username, role=StaffUser.Role.CLERK, **extra) -> StaffUser:
    user = StaffUser.objects.create_user(
        username=username, password=CLERK_PASSWORD, facility=facility, role=role,
        first_name="Casey", last_name="Clerk", **extra,
    )
    TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    return user


@pytest.fixture
def clerk(facility) -> StaffUser:
    return make_staff(facility, "clerk")


@pytest.fixture
def other_clerk(other_facility) -> StaffUser:
    return make_staff(other_facility, "otherclerk")


@pytest.fixture
def support_user(db) -> StaffUser:
    return make_staff(None, "support", role=StaffUser.Role.SUPPORT, is_staff=True,
                      is_superuser=True)


def sign_in(client, user: StaffUser) -> None:
    """Password, then the current TOTP code, through the real login pages."""
    response = client.post("/account/login/", {"username": user.username,
                                                "password": CLERK_PASSWORD})
    assert response.status_code == 302, response.content[:500]
    device = TOTPDevice.objects.get(user=user, confirmed=True)
    response = client.post("/account/verify/", {"token": totp_now(device)})
    assert response.status_code == 302, response.content[:500]


@pytest.fixture
def clerk_client(client, clerk):
    sign_in(client, clerk)
    return client


# --- Celery worker ---------------------------------------------------------------------


@pytest.fixture
def celery_worker(transactional_db, tmp_path):
    """A real Celery worker process on the configured broker (Redis under `make test`),
    reading the test database. Tests that use it see committed rows only, hence
    ``transactional_db``."""
    from django.db import connection

    from pockethealth.celery import app

    app.control.purge()
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": (
            f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
            if connection.vendor == "postgresql"
            else f"sqlite:///{db['NAME']}"
        ),
        "STORAGE_ROOT": str(tmp_path / "storage"),
        "SPOOL_DIR": str(settings.SPOOL_DIR),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pockethealth", "worker", "--pool=solo",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO",
         "-n", f"test-{os.getpid()}@%h"],
        cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
        if "ready." in (tmp_path / "worker.log").read_text():
            break
        time.sleep(0.2)
    else:
        log_text = (tmp_path / "worker.log").read_text()
        raise AssertionError(f"Celery worker did not start:\n{log_text}")
    yield proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


# --- Browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Chromium is not installed (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.fixture
def artifacts_dir() -> Path:
    path = BASE_DIR / "var" / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
