import logging
from pathlib import Path

from celery import current_app, shared_task
from celery.signals import worker_ready
from django.conf import settings

from pockethealth.models import Facility

from .retrieve import jobs_recover_stale, push_run, retrieve_run
from .services import ingest_file

log = logging.getLogger(__name__)

RECOVERY_INTERVAL_SECONDS = 120


def spool_path(name: str) -> Path:
    """The spooled file ``name`` inside SPOOL_DIR; refuses anything that would leave it."""
    root = Path(settings.SPOOL_DIR).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ValueError("spool name leaves the spool folder")
    return path


@shared_task(acks_late=True, autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def ingest_spooled_file(facility_id: int, spool_name: str, source: str) -> str:
    """Index a file that a receiver (SCP, upload) spooled to disk, then remove it from the
    spool. Re-running after the file is gone, or for a file already archived, is a no-op."""
    path = spool_path(spool_name)
    if not path.exists():
        return "gone"
    facility = Facility.objects.get(pk=facility_id)
    outcome = ingest_file(facility=facility, path=path, source=source)
    path.unlink(missing_ok=True)
    log.info("spooled file ingested: status=%s instance=%s", outcome.status,
             outcome.instance.pk if outcome.instance else None)
    return str(outcome.status)


# --- The PACS link: thin tasks over dicomgw.retrieve ----------------------------------


@shared_task(bind=True, acks_late=True, max_retries=None)
def retrieve_study(self, job_id: int) -> None:
    """Run RetrieveJob ``job_id``. The service claims the row, so a duplicate or a
    redelivered message is a no-op; after an association failure it says when to try
    again and counts the attempts (bounded), so Celery's own retry count is not used."""
    retry_in = retrieve_run(job_id=job_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(bind=True, acks_late=True, max_retries=None)
def push_study(self, job_id: int) -> None:
    """Run PushJob ``job_id``; idempotent in the same way as ``retrieve_study``."""
    retry_in = push_run(job_id=job_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(acks_late=True)
def recover_stale_jobs() -> int:
    """Queue again the retrieves and pushes whose worker died (see
    ``jobs_recover_stale``). Runs when a worker starts and every few minutes under beat."""
    recovered = jobs_recover_stale()
    for kind, job_id in recovered:
        (retrieve_study if kind == "retrieve" else push_study).delay(job_id)
    return len(recovered)


@worker_ready.connect
def _recover_when_a_worker_starts(sender, **kwargs) -> None:
    # A worker that starts after a crash finds the jobs its predecessor left RUNNING.
    recover_stale_jobs.delay()


# Under `celery beat`, look for stale jobs periodically as well.
current_app.conf.beat_schedule = {
    **(current_app.conf.beat_schedule or {}),
    "dicomgw.recover_stale_jobs": {"task": "dicomgw.tasks.recover_stale_jobs",
                                   "schedule": RECOVERY_INTERVAL_SECONDS},
}


# --- Recipient media: thin tasks over dicomgw.media -----------------------------------


@shared_task(bind=True, acks_late=True, max_retries=None)
def build_media_iso(self, job_id: int) -> None:
    """Build the disc image of MediaJob ``job_id``. The service claims the row, so a
    duplicate or a redelivered message is a no-op; after a storage failure it says when
    to try again and counts the attempts (bounded)."""
    from .media import iso_build

    retry_in = iso_build(job_id=job_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(acks_late=True)
def purge_media_jobs() -> int:
    """Remove expired disc images, and queue again the builds whose worker died. Runs
    under beat (settings.CELERY_BEAT_SCHEDULE)."""
    from django.utils import timezone

    from .media import media_jobs_purge, media_jobs_recover_stale

    now = timezone.now()
    for job_id in media_jobs_recover_stale(now=now):
        build_media_iso.delay(job_id)
    return media_jobs_purge(now=now)
