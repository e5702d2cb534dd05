"""Settings for the Celery workers of the PACS-link tests: the project's, with the
retrieve's waits shortened so that retries, backoff and stale-job recovery happen within
a test's time."""

from pockethealth.settings import *  # noqa: F403

PACS_RETRY_BACKOFF_SECONDS = 0.5
PACS_RETRY_BACKOFF_MAX_SECONDS = 4
PACS_JOB_STALE_SECONDS = 4
PACS_ARCHIVE_SETTLE_SECONDS = 10
