"""Sending archived studies to a PACS (C-STORE) against real Orthanc: a result per
instance, each instance in the transfer syntax it was archived in, and a retry that
sends only what failed."""

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from dicomgw.models import Instance, PushJob, PushResult, Study
from dicomgw.retrieve import push_retry, push_run, push_start
from dicomgw.services import ingest_file
from pockethealth.models import AuditEvent

from .conftest import ORTHANC, PEER_ENV, OrthancPeer, free_port, stop_process, wait_for_port
from .pacs_helpers import start_worker, stop_worker, wait_for

TS_FOLDER = "transfer_syntaxes_siemens_trio"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
COMPRESSED = {JPEG_LS, JPEG_2000_LOSSLESS, RLE, JPEG_LOSSLESS_SV1}


@pytest.fixture(autouse=True)
def _empty_queue():
    from pockethealth.celery import app

    app.control.purge()
    yield
    app.control.purge()


@pytest.fixture
def archived_study(facility, testdata_dir) -> Study:
    """The nine-syntax Siemens series, archived as received."""
    for path in sorted((testdata_dir / TS_FOLDER).glob("*.dcm")):
        assert ingest_file(facility=facility, path=path, source="import").ok
    return Study.objects.get(facility=facility)


def dataset_digest(data: bytes) -> str:
    """SHA-256 of a Part 10 file's data set, after the preamble and the File Meta
    Information (PS3.10 7.1), which every archive writes for itself."""
    group_length = int.from_bytes(data[140:144], "little")
    return hashlib.sha256(data[144 + group_length:]).hexdigest()


def results_of(job: PushJob) -> dict[str, PushResult]:
    return {r.instance.sop_instance_uid: r
            for r in job.results.select_related("instance")}


def test_a_study_is_pushed_with_each_instance_in_its_own_transfer_syntax(
        orthanc, pacs_node_for, archived_study, clerk, transactional_db):
    orthanc.delete_study(archived_study.study_instance_uid)
    node = pacs_node_for(orthanc)
    job = push_start(node=node, study=archived_study, requested_by=clerk)
    assert push_run(job_id=job.pk) is None

    job.refresh_from_db()
    assert job.status == PushJob.Status.COMPLETE, job.error
    assert (job.total, job.sent, job.failed, job.attempts) == (9, 9, 0, 1)
    results = results_of(job)
    assert len(results) == 9
    assert {(r.status, r.outcome) for r in results.values()} == {(0, "success")}

    in_orthanc = orthanc.instance_ids(archived_study.study_instance_uid)
    assert set(in_orthanc) == set(results)
    compressed = 0
    for instance in Instance.objects.filter(series__study=archived_study):
        orthanc_id = in_orthanc[instance.sop_instance_uid]
        if instance.transfer_syntax_uid in COMPRESSED:
            compressed += 1
            # Still compressed, in the same syntax: nothing was decoded on the way.
            assert orthanc.transfer_syntax(orthanc_id) == instance.transfer_syntax_uid
            with instance.file.open("rb") as fh:
                assert dataset_digest(orthanc.file(orthanc_id)) == dataset_digest(fh.read())
    assert compressed == 6
    event = AuditEvent.objects.get(action="pacs.push.finish", object_id=str(job.pk))
    assert event.outcome == "success"
    assert event.detail == {"node": node.pk, "status": "complete", "images": 9, "sent": 9,
                            "failed": 0, "attempts": 1}


def test_failed_instances_are_listed_and_a_retry_sends_only_them(
        orthanc, pacs_node_for, archived_study, clerk, transactional_db, tmp_path):
    orthanc.delete_study(archived_study.study_instance_uid)
    node = pacs_node_for(orthanc)
    # Two archived files go missing from storage (a disk fault): they cannot be sent.
    lost = list(Instance.objects.filter(series__study=archived_study).order_by("pk")[3:5])
    for instance in lost:
        shutil.move(instance.file.path, tmp_path / instance.sop_instance_uid)

    job = push_start(node=node, study=archived_study, requested_by=clerk)
    push_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == PushJob.Status.PARTIAL
    assert (job.total, job.sent, job.failed) == (9, 7, 2)
    assert job.error == "2 images were not accepted by the PACS."
    results = results_of(job)
    failed = {uid for uid, r in results.items() if r.outcome == "failure"}
    assert failed == {i.sop_instance_uid for i in lost}
    assert {results[uid].detail for uid in failed} == {
        "The archived file could not be read or sent"}
    assert len(orthanc.instance_ids(archived_study.study_instance_uid)) == 7
    sent_first = {uid: r.sent_at for uid, r in results.items() if r.outcome == "success"}

    for instance in lost:
        shutil.move(tmp_path / instance.sop_instance_uid, instance.file.path)
    job = push_retry(job=job, requested_by=clerk)
    assert job.status == PushJob.Status.QUEUED
    push_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == PushJob.Status.COMPLETE
    assert (job.sent, job.failed) == (9, 0)
    results = results_of(job)
    assert {r.outcome for r in results.values()} == {"success"}
    # The seven that had arrived were not sent again.
    for uid, sent_at in sent_first.items():
        assert results[uid].sent_at == sent_at
    assert all(results[uid].sent_at > max(sent_first.values()) for uid in failed)
    assert len(orthanc.instance_ids(archived_study.study_instance_uid)) == 9


def test_a_push_runs_through_the_worker_and_its_page_shows_the_outcome(
        orthanc, pacs_node_for, archived_study, clerk, celery_worker, client):
    from tests.conftest import sign_in

    orthanc.delete_study(archived_study.study_instance_uid)
    node = pacs_node_for(orthanc)
    sign_in(client, clerk)
    response = client.post(f"/clerk/pacs/send/{archived_study.pk}/", {"node": node.pk})
    job = PushJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/clerk/pacs/pushes/{job.pk}/"

    def done():
        job.refresh_from_db()
        return job.is_finished
    assert wait_for(done, timeout=60)
    assert job.status == PushJob.Status.COMPLETE
    page = client.get(f"/clerk/pacs/pushes/{job.pk}/").content.decode()
    assert "The PACS accepted the study: all 9 images." in page
    assert "hx-trigger" not in page
    assert len(orthanc.instance_ids(archived_study.study_instance_uid)) == 9


def test_a_push_to_a_pacs_that_is_down_fails_after_bounded_retries(
        pacs_node_for, archived_study, clerk, transactional_db, tmp_path):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    worker = start_worker(tmp_path, "push-worker")
    try:
        started = time.monotonic()
        job = push_start(node=pacs_node_for(Closed), study=archived_study, requested_by=clerk)

        def done():
            job.refresh_from_db()
            return job.is_finished
        assert wait_for(done, timeout=60)
    finally:
        stop_worker(worker)
    assert time.monotonic() - started < 30
    assert job.status == PushJob.Status.FAILED
    assert job.attempts == 4
    assert job.error == f"The PACS at 127.0.0.1:{Closed.port} refused the connection"
    assert job.sent == 0


@pytest.fixture
def picky_orthanc(tmp_path):
    """An Orthanc that takes images only uncompressed or in JPEG Lossless (its
    ``AcceptedTransferSyntaxes``), as some PACS are set up: JPEG-LS, JPEG 2000 and RLE
    images are refused at negotiation."""
    root = tmp_path / "picky-orthanc"
    root.mkdir()
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "picky", "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "Plugins": [], "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAet": "PICKY", "DicomPort": dicom_port,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                     "1.2.840.10008.1.2.2", JPEG_LOSSLESS_SV1],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log_path = root / "orthanc.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log,
                                stderr=subprocess.STDOUT, env=PEER_ENV, start_new_session=True)
    try:
        wait_for_port(dicom_port, proc, log_path)
        wait_for_port(http_port, proc, log_path)
        yield OrthancPeer(ae_title="PICKY", port=dicom_port,
                          http=f"http://127.0.0.1:{http_port}", process=proc)
    finally:
        stop_process(proc)


def test_images_a_pacs_refuses_in_their_syntax_fail_plainly_and_are_never_recompressed(
        picky_orthanc, pacs_node_for, archived_study, clerk, transactional_db):
    node = pacs_node_for(picky_orthanc)
    job = push_start(node=node, study=archived_study, requested_by=clerk)
    push_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == PushJob.Status.PARTIAL
    results = results_of(job)
    refused = {i.sop_instance_uid: i.transfer_syntax_uid for i in Instance.objects.filter(
        series__study=archived_study, transfer_syntax_uid__in=[JPEG_LS, JPEG_2000_LOSSLESS, RLE])}
    assert len(refused) == 4
    assert {uid for uid, r in results.items() if r.outcome == "failure"} == set(refused)
    for uid, syntax in refused.items():
        assert results[uid].status is None
        assert results[uid].detail.startswith("The PACS does not accept this kind of image")
        assert syntax in results[uid].detail
    assert job.failed == 4
    stored = picky_orthanc.instance_ids(archived_study.study_instance_uid)
    assert set(stored) == set(results) - set(refused)
    # The refused ones were not converted to something the PACS takes.
    assert {picky_orthanc.transfer_syntax(orthanc_id) for orthanc_id in stored.values()} <= {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", JPEG_LOSSLESS_SV1}


def test_asking_twice_to_send_a_study_joins_the_live_push(orthanc, pacs_node_for,
                                                         archived_study, clerk,
                                                         transactional_db):
    node = pacs_node_for(orthanc)
    first = push_start(node=node, study=archived_study, requested_by=clerk)
    assert push_start(node=node, study=archived_study, requested_by=clerk).pk == first.pk
    PushJob.objects.filter(pk=first.pk).update(status=PushJob.Status.COMPLETE)
    assert push_start(node=node, study=archived_study, requested_by=clerk).pk != first.pk
