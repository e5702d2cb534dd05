"""One settings module, read from the environment, with embedded defaults that run on a
bare machine (SQLite, a file-system Celery broker, files under ``var/``)."""

import os
import secrets
from pathlib import Path

import dj_database_url
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).resolve() if value else default


VAR_DIR = env_path("PH_VAR_DIR", BASE_DIR / "var")
VAR_DIR.mkdir(parents=True, exist_ok=True)


def secret_from_env_or_file(name: str, filename: str) -> str:
    """A key from the environment, else one generated once into ``var/`` (never the
    database), so a development machine keeps its sessions and code hashes across runs."""
    value = os.environ.get(name)
    if value:
        return value
    path = VAR_DIR / filename
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


SECRET_KEY = secret_from_env_or_file("SECRET_KEY", "secret_key")
# Keys the hashes of share security codes and upload PINs. Kept apart from SECRET_KEY
# and from the database so that a stolen database alone cannot test guesses offline.
ACCESS_CODE_KEY = secret_from_env_or_file("ACCESS_CODE_KEY", "access_code_key")

DEBUG = env_bool("DEBUG", False)
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000").rstrip("/")
PRODUCT_NAME = env_str("PRODUCT_NAME", "ImageLink")
SUPPORT_PHONE = env_str("SUPPORT_PHONE", "1-800-555-0199")
SUPPORT_EMAIL = env_str("SUPPORT_EMAIL", "support@imagelink.example")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
# X-Forwarded-For and X-Forwarded-Proto are believed only when the request comes from
# one of these addresses.
TRUSTED_PROXIES = env_list("TRUSTED_PROXIES", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "pockethealth",
    "dicomgw",
    "sharing",
    "retrieval",
    "viewer",
]

MIDDLEWARE = [
    "pockethealth.middleware.TrustedProxyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "retrieval.middleware.UploadHostMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "pockethealth.middleware.FacilityTimezoneMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "pockethealth.urls"
WSGI_APPLICATION = "pockethealth.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "pockethealth.context_processors.site",
            ],
        },
    },
]

# A web worker keeps its database connection for DATABASE_CONN_MAX_AGE seconds rather
# than opening one per request (the upload portal sends one request per file); a kept
# connection is checked before each request reuses it. 0 closes it after every request.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'pockethealth.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, worker, SCP) share the file: wait for locks, use WAL.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "pockethealth.StaffUser"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
     "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "clerk-home"
OTP_TOTP_ISSUER = PRODUCT_NAME
OTP_STATIC_BACKUP_CODES = 10

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = SITE_URL.startswith("https://")
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_AGE = env_int("STAFF_SESSION_SECONDS", 8 * 3600)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("fr", _("French"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
# Stored in UTC; shown in the facility's zone (FacilityTimezoneMiddleware).
USE_TZ = True
TIME_ZONE = env_str("DEFAULT_TIME_ZONE", "America/Toronto")

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True

# Stored DICOM goes through Django's storage API; the file-system default lives here.
STORAGE_ROOT = env_path("STORAGE_ROOT", VAR_DIR / "storage")
MEDIA_ROOT = STORAGE_ROOT / "media"
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT), "base_url": "/media-not-served/"},
    },
    "archive": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": str(STORAGE_ROOT / "archive"),
            "base_url": "/archive-not-served/",
            "file_permissions_mode": 0o640,
            "directory_permissions_mode": 0o750,
        },
    },
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Work space for files that are being received or checked before ingest.
SPOOL_DIR = env_path("SPOOL_DIR", STORAGE_ROOT / "spool")
# Largest single DICOM file the ingest service accepts.
INGEST_MAX_FILE_BYTES = env_int("INGEST_MAX_FILE_BYTES", 2 * 1024**3)

# Public test corpus used by `demo_studies --testdata` and the test-suite.
def find_testdata_dir() -> Path:
    """The corpus sits beside the checkout (``../shared``) in a developer's workspace; a
    clone elsewhere (CI) finds the workspace's copy."""
    candidates = [
        BASE_DIR.parent / "shared" / "testdata" / "dicom",
        Path("/work/shared/testdata/dicom"),
    ]
    return next((c for c in candidates if c.is_dir()), candidates[0])


TESTDATA_DICOM_DIR = env_path("TESTDATA_DICOM_DIR", find_testdata_dir())

# Counters that must agree across processes (sign-in throttling, later code guessing)
# live in the cache: Redis in production, process memory on a development machine.
CACHE_URL = env_str("CACHE_URL", "")
CACHES = {
    "default": (
        {"BACKEND": "pockethealth.cache.RedisCache", "LOCATION": CACHE_URL}
        if CACHE_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}
# Wrong passwords allowed per user name (and per client address) in the window.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10)
LOGIN_FAILURE_WINDOW_SECONDS = env_int("LOGIN_FAILURE_WINDOW_SECONDS", 15 * 60)

# The DICOM gateway: our storage SCP and the AE title we present to PACS nodes.
DICOM_AE_TITLE = env_str("DICOM_SCP_AE_TITLE", "EXCHANGE")
DICOM_SCP_HOST = env_str("DICOM_SCP_HOST", "127.0.0.1")
DICOM_SCP_PORT = env_int("DICOM_SCP_PORT", 11112)
DICOM_SCP_MAX_ASSOCIATIONS = env_int("DICOM_SCP_MAX_ASSOCIATIONS", 16)
DICOM_SCP_MAX_PDU = env_int("DICOM_SCP_MAX_PDU", 131072)
# Refuse C-STORE (status 0xA700, out of resources) when less than this is free.
DICOM_SCP_MIN_FREE_BYTES = env_int("DICOM_SCP_MIN_FREE_BYTES", 512 * 1024**2)
# Threads of `runscp` that index received files (the spool folder is their queue).
DICOM_SCP_INGEST_WORKERS = env_int("DICOM_SCP_INGEST_WORKERS", 2)
# Scheduling niceness of that indexing (0-19): receiving, which a sender waits on, first.
DICOM_SCP_INGEST_NICENESS = env_int("DICOM_SCP_INGEST_NICENESS", 10)
# How often the SCP re-reads which PACS nodes may send to it (seconds).
DICOM_SCP_NODE_REFRESH_SECONDS = env_int("DICOM_SCP_NODE_REFRESH_SECONDS", 5)
# SCP timeouts (seconds): for the A-ASSOCIATE-RQ after connecting, and for silence
# within an association.
DICOM_SCP_ACSE_TIMEOUT = env_int("DICOM_SCP_ACSE_TIMEOUT", 30)
DICOM_SCP_NETWORK_TIMEOUT = env_int("DICOM_SCP_NETWORK_TIMEOUT", 120)
# The demo PACS that `make run` starts (Orthanc when installed).
DEMO_PACS_AE_TITLE = env_str("DEMO_PACS_AE_TITLE", "DEMOPACS")
DEMO_PACS_PORT = env_int("DEMO_PACS_PORT", 4242)

# Celery: Redis in production; a broker that needs no server by default.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
EMAIL_FILE_PATH = VAR_DIR / "outbox"
EMAIL_HOST = env_str("EMAIL_HOST", "127.0.0.1")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", SUPPORT_EMAIL)

# Log files carry ids and outcomes only. Values read from DICOM files (names, IDs,
# birth dates) are never passed to a logger; pydicom's own warnings, which quote
# element values, are kept out of the log.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "pydicom": {"handlers": [], "level": "CRITICAL", "propagate": False},
        "pynetdicom": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}

# --- Provider sharing (sharing/) ------------------------------------------------------
# A share opens for SHARE_ACCESS_DAYS; the recipient may extend it once, within those
# days, to SHARE_MAX_MONTHS.
SHARE_ACCESS_DAYS = env_int("SHARE_ACCESS_DAYS", 30)
SHARE_MAX_MONTHS = env_int("SHARE_MAX_MONTHS", 9)
# Faxes go out as e-mail to "<digits>@<gateway domain>" through the EMAIL_* server. A
# facility's own gateway and sender (sharing.SharingSettings) override these; with no
# domain anywhere, faxing is off and the clerk prints the page instead.
FAX_GATEWAY_DOMAIN = env_str("FAX_GATEWAY_DOMAIN", "")
FAX_SENDER_EMAIL = env_str("FAX_SENDER_EMAIL", DEFAULT_FROM_EMAIL)
FAX_MAX_ATTEMPTS = env_int("FAX_MAX_ATTEMPTS", 4)
FAX_RETRY_BACKOFF_SECONDS = env_int("FAX_RETRY_BACKOFF_SECONDS", 60)
# WeasyPrint reports each rendering step at INFO; its warnings are what matter.
LOGGING["loggers"]["weasyprint"] = {"handlers": ["console"], "level": "WARNING",
                                    "propagate": False}

# --- Recipient access (/view: sharing/recipient*.py, sharing/throttle.py) ---------------
# Wrong dates of birth typed with a share's right code before the share locks (a clerk
# or support unlocks it).
SHARE_DOB_ATTEMPTS = env_int("SHARE_DOB_ATTEMPTS", 10)
# Wrong code-and-birth-date pairs from one client address (an IPv6 /64) in the window;
# reaching the limit refuses that address for VIEW_ADDRESS_BLOCK_SECONDS.
VIEW_ADDRESS_FAILURES = env_int("VIEW_ADDRESS_FAILURES", 20)
VIEW_ADDRESS_WINDOW_SECONDS = env_int("VIEW_ADDRESS_WINDOW_SECONDS", 15 * 60)
VIEW_ADDRESS_BLOCK_SECONDS = env_int("VIEW_ADDRESS_BLOCK_SECONDS", 30 * 60)
# The site-wide breaker against codes sprayed from many addresses: more wrong pairs than
# this in one minute, all addresses together, refuses every attempt for the next
# VIEW_BREAKER_SECONDS.
VIEW_GLOBAL_FAILURES_PER_MINUTE = env_int("VIEW_GLOBAL_FAILURES_PER_MINUTE", 300)
VIEW_BREAKER_SECONDS = env_int("VIEW_BREAKER_SECONDS", 60)
# The recipient's session: its own cookie, sent to /view only, ended after this long
# without a request and this long after the code and date of birth were entered.
RECIPIENT_SESSION_COOKIE_NAME = env_str("RECIPIENT_SESSION_COOKIE_NAME", "view_session")
RECIPIENT_SESSION_IDLE_SECONDS = env_int("RECIPIENT_SESSION_IDLE_SECONDS", 30 * 60)
RECIPIENT_SESSION_MAX_SECONDS = env_int("RECIPIENT_SESSION_MAX_SECONDS", 12 * 3600)
# Where those sessions are kept: read through the cache when the cache is shared by every
# process (Redis), else from the database alone (a per-process cache could serve a
# session another process has ended).
RECIPIENT_SESSION_ENGINE = (
    "django.contrib.sessions.backends.cached_db" if CACHE_URL
    else "django.contrib.sessions.backends.db")
# How long a code brought by the Access Page's QR link stays filled in on /view.
VIEW_PENDING_CODE_SECONDS = env_int("VIEW_PENDING_CODE_SECONDS", 15 * 60)
# Archived studies that no live share (or other holder below) needs are deleted this
# many days after the last one let go of them, or after they arrived if none ever held
# them. Each holder is a function (*, now, cutoff) -> query of the study ids it keeps;
# a new kind of reference (retrieval requests) adds its own here.
ARCHIVE_RETENTION_DAYS = env_int("ARCHIVE_RETENTION_DAYS", 30)
ARCHIVE_HOLDERS = [
    "sharing.recipient.studies_held_by_shares",
    "sharing.recipient.studies_held_by_transfers",
    "retrieval.imports.studies_held_by_requests",
]
# Studies purged per run of the job; the next run carries on.
ARCHIVE_PURGE_BATCH = env_int("ARCHIVE_PURGE_BATCH", 200)
CELERY_BEAT_SCHEDULE = {
    "sharing-expire-and-purge": {
        "task": "sharing.tasks.expire_and_purge",
        "schedule": env_int("EXPIRE_AND_PURGE_EVERY_SECONDS", 10 * 60),
    },
}

# --- Recipient media (dicomgw.media) ------------------------------------------------
# Disc images (ISO) are built by a worker into the default storage and removed when
# they expire; a building job whose row has not moved for MEDIA_JOB_STALE_SECONDS lost
# its worker and is queued again. MEDIA_VIEWER_DIR is the offline viewer's folder of
# static files, put under IHE_PDI/ when a recipient asks for the viewer.
MEDIA_JOB_STALE_SECONDS = env_int("MEDIA_JOB_STALE_SECONDS", 300)
MEDIA_PURGE_INTERVAL_SECONDS = env_int("MEDIA_PURGE_INTERVAL_SECONDS", 300)
# By default the viewer that `make offline-viewer` builds from viewer/offline, once built.
_OFFLINE_VIEWER_DIR = BASE_DIR / "viewer" / "offline" / "dist"
MEDIA_VIEWER_DIR = env_str("MEDIA_VIEWER_DIR", "") or (
    str(_OFFLINE_VIEWER_DIR) if (_OFFLINE_VIEWER_DIR / "index.html").is_file() else None)
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "dicomgw.purge_media_jobs": {"task": "dicomgw.tasks.purge_media_jobs",
                                 "schedule": MEDIA_PURGE_INTERVAL_SECONDS},
}
# --- end of recipient media ---------------------------------------------------------

# --- Record retrieval: imports into the PACS, answers from the platform ---------------
CELERY_BEAT_SCHEDULE = {
    **CELERY_BEAT_SCHEDULE,
    "retrieval.recover_stale_request_jobs": {
        "task": "retrieval.tasks.recover_stale_request_jobs",
        "schedule": env_int("REQUEST_JOBS_RECOVERY_SECONDS", 120)},
}
# --- end of record retrieval imports -------------------------------------------------

# --- Browser viewer (viewer/ohif.py) ----------------------------------------------------
# OHIF's prebuilt app, installed by `make ohif` (manage.py ohif_install) into OHIF_DIR
# and served with the static files under /static/ohif/.
OHIF_DIR = env_path("OHIF_DIR", BASE_DIR / "var" / "ohif")
if OHIF_DIR.is_dir():
    STATICFILES_DIRS = [*STATICFILES_DIRS, ("ohif", OHIF_DIR)]
# --- end of browser viewer ---------------------------------------------------------------

# --- Record retrieval: the upload portal (retrieval/upload*.py) --------------------------
# Wrong upload PINs from one client address (an IPv6 /64) in the window; reaching the
# limit locks that address out of every facility's portal for UPLOAD_PIN_ADDRESS_BLOCK_SECONDS.
UPLOAD_PIN_ADDRESS_FAILURES = env_int("UPLOAD_PIN_ADDRESS_FAILURES", 10)
UPLOAD_PIN_ADDRESS_WINDOW_SECONDS = env_int("UPLOAD_PIN_ADDRESS_WINDOW_SECONDS", 3600)
UPLOAD_PIN_ADDRESS_BLOCK_SECONDS = env_int("UPLOAD_PIN_ADDRESS_BLOCK_SECONDS", 3600)
# The breaker of one facility's portal against PINs sprayed from many addresses: more
# wrong PINs than this in the window, all addresses together, stop PIN checks there for
# UPLOAD_PIN_FACILITY_BREAKER_SECONDS (the Request Page's QR link still works).
UPLOAD_PIN_FACILITY_FAILURES = env_int("UPLOAD_PIN_FACILITY_FAILURES", 60)
UPLOAD_PIN_FACILITY_WINDOW_SECONDS = env_int("UPLOAD_PIN_FACILITY_WINDOW_SECONDS", 3600)
UPLOAD_PIN_FACILITY_BREAKER_SECONDS = env_int("UPLOAD_PIN_FACILITY_BREAKER_SECONDS", 900)
# The uploader's session: its own cookie, sent to /upload only, bound to one request,
# ended after this long without a request and this long after the PIN was entered.
UPLOAD_SESSION_COOKIE_NAME = env_str("UPLOAD_SESSION_COOKIE_NAME", "upload_session")
UPLOAD_SESSION_IDLE_SECONDS = env_int("UPLOAD_SESSION_IDLE_SECONDS", 2 * 3600)
UPLOAD_SESSION_MAX_SECONDS = env_int("UPLOAD_SESSION_MAX_SECONDS", 24 * 3600)
UPLOAD_SESSION_ENGINE = RECIPIENT_SESSION_ENGINE
# What one upload may hold: files, bytes in all, bytes in one file.
UPLOAD_MAX_FILES = env_int("UPLOAD_MAX_FILES", 20_000)
UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 100 * 1024**3)
UPLOAD_MAX_FILE_BYTES = env_int("UPLOAD_MAX_FILE_BYTES", INGEST_MAX_FILE_BYTES)
# The browser sends a disc's small files several to a request (one transaction for
# them all), up to this many files and UPLOAD_BATCH_BYTES.
UPLOAD_BATCH_FILES = env_int("UPLOAD_BATCH_FILES", 100)
UPLOAD_BATCH_BYTES = env_int("UPLOAD_BATCH_BYTES", 8 * 1024**2)
# Requests the browser has in flight at once.
UPLOAD_PARALLEL = env_int("UPLOAD_PARALLEL", 4)
# A request of the browser's that neither sends nor receives a byte for this long is
# given up and made again (a connection can die without closing: a router asleep, a
# network changed): what arrived whole is kept, the rest sent again.
UPLOAD_STALL_SECONDS = env_int("UPLOAD_STALL_SECONDS", 90)
# Receiving stops (the browser waits and retries) while less than this is free.
UPLOAD_MIN_FREE_BYTES = env_int("UPLOAD_MIN_FREE_BYTES", 512 * 1024**2)
# --- end of the upload portal ------------------------------------------------------------
