import logging
from pathlib import Path

from celery import shared_task
from django.conf import settings

from pockethealth.models import Facility

from .services import ingest_file

log = logging.getLogger(__name__)


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
