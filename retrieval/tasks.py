"""Thin tasks over the retrieval services: ids in, the service does the work and claims
its row, so a duplicated or redelivered message does no harm."""

from celery import shared_task
from celery.signals import worker_ready


@shared_task(bind=True, acks_late=True, max_retries=None)
def send_request_fax(self, fax_id: int) -> None:
    """Hand fax ``fax_id`` (a Request Page) to the fax gateway; the service bounds the
    attempts and says when to try again."""
    from .services import request_fax_deliver

    retry_in = request_fax_deliver(fax_id=fax_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


# --- Received records: imports into the PACS, answers from the platform ----------------


@shared_task(bind=True, acks_late=True, max_retries=None)
def import_study(self, import_id: int) -> None:
    """Run RequestImport ``import_id`` (C-STORE of one study under its reconciled
    identity). The service claims the row and bounds the attempts; it says when to try
    again after an association failure."""
    from .imports import request_import_run

    retry_in = request_import_run(import_id=import_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(bind=True, acks_late=True, max_retries=None)
def fulfil_request(self, fulfilment_id: int) -> None:
    """Copy the studies of RequestFulfilment ``fulfilment_id`` into the requester's
    archive, once those picked from the PACS have arrived (looked at again later, never
    waited for)."""
    from .fulfil import request_fulfil_run

    retry_in = request_fulfil_run(fulfilment_id=fulfilment_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(acks_late=True)
def recover_stale_request_jobs() -> int:
    """Queue again the imports and answers whose worker died. Runs when a worker starts
    and under beat (settings.CELERY_BEAT_SCHEDULE)."""
    from .imports import request_jobs_recover_stale

    recovered = request_jobs_recover_stale()
    for kind, job_id in recovered:
        (import_study if kind == "import" else fulfil_request).delay(job_id)
    return len(recovered)


@worker_ready.connect
def _recover_when_a_worker_starts(sender, **kwargs) -> None:
    recover_stale_request_jobs.delay()
