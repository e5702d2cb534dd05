"""Thin tasks over ``sharing.services``: ids in, the service does the work and claims
its row, so a duplicated or redelivered message does no harm."""

from importlib import import_module

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from .models import Share

# How often a transfer is looked at, and how many looks (a day's worth) before the task
# stops following it; the share page still refreshes it whenever it is opened.
FOLLOW_EVERY_SECONDS = 15
FOLLOW_LOOKS = 24 * 3600 // FOLLOW_EVERY_SECONDS


@shared_task(bind=True, acks_late=True, max_retries=None)
def send_fax(self, delivery_id: int) -> None:
    """Hand delivery ``delivery_id`` to the fax gateway; the service bounds the attempts
    and says when to try again."""
    from .services import delivery_send

    retry_in = delivery_send(delivery_id=delivery_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@shared_task(bind=True, acks_late=True, max_retries=None)
def follow_transfer(self, share_id: int) -> None:
    """Bring a share's status up to date while its studies arrive, so the outcome is
    recorded (and audited) even when nobody has the share page open."""
    from .services import share_refresh

    share = Share.objects.filter(pk=share_id).first()
    if share is None:
        return
    share = share_refresh(share=share)
    if share.is_transferring and self.request.retries < FOLLOW_LOOKS:
        raise self.retry(countdown=FOLLOW_EVERY_SECONDS)


@shared_task(acks_late=True)
def expire_and_purge() -> None:
    """The periodic end of access (CELERY_BEAT_SCHEDULE): mark the shares whose access
    has ended, purge the archived studies nothing holds any more, and drop expired
    sessions. Every step is idempotent; a second run at once finds nothing to do."""
    from .recipient import archive_purge, shares_expire

    now = timezone.now()
    shares_expire(now=now)
    archive_purge(now=now)
    import_module(settings.RECIPIENT_SESSION_ENGINE).SessionStore.clear_expired()
