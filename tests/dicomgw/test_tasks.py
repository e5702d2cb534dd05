"""The ingest task through a real Celery worker on the configured broker."""

import shutil
import time

from django.conf import settings

from dicomgw.models import Instance
from dicomgw.tasks import ingest_spooled_file


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_worker_ingests_a_spooled_file_and_empties_the_spool(celery_worker, facility,
                                                              testdata_dir):
    settings.SPOOL_DIR.mkdir(parents=True, exist_ok=True)
    source = testdata_dir / "transfer_syntaxes_siemens_trio" / "1.dcm"
    shutil.copy(source, settings.SPOOL_DIR / "incoming-1")

    ingest_spooled_file.delay(facility.pk, "incoming-1", "scp")

    assert wait_for(lambda: Instance.objects.filter(facility=facility).exists())
    assert wait_for(lambda: not (settings.SPOOL_DIR / "incoming-1").exists())
    instance = Instance.objects.get(facility=facility)
    assert instance.source == "scp"
    assert instance.file.size == source.stat().st_size


def test_a_spool_name_cannot_leave_the_spool(db):
    import pytest

    with pytest.raises(ValueError):
        ingest_spooled_file.run(1, "../../etc/passwd", "scp")
