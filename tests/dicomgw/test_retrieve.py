"""Searching a PACS and retrieving studies from it into the archive, against real peers:
Orthanc and dcmtk's dcmqrscp as PACS, our storage SCP as the C-MOVE destination, real
Celery workers on Redis, plain sockets for a PACS that is down or silent."""

import datetime
import socket
import threading
import time
from pathlib import Path

import pytest
from django.utils import timezone

from dicomgw import dimse
from dicomgw.models import Instance, InstanceConflict, RetrieveJob, Study
from dicomgw.retrieve import (
    SearchCriteria,
    jobs_recover_stale,
    pacs_search,
    patient_name_query,
    retrieve_retry,
    retrieve_run,
    retrieve_start,
)
from dicomgw.services import DicomGatewayError
from pockethealth.models import AuditEvent

from .conftest import free_port
from .pacs_helpers import (
    ct_files,
    kill_worker,
    make_patient,
    make_study,
    mr_files,
    start_worker,
    stop_worker,
    study_date_of,
    wait_for,
)

ROSALIND = make_patient("Vasquez-Lindqvist", "Rosalind", "RT-100001",
                        datetime.date(1958, 2, 3))
ROSS = make_patient("Vasquez", "Ross", "RT-100002", datetime.date(1982, 11, 30), sex="M")
ROSALIND_CT = make_study("rt-search-ct", ROSALIND, modality="CT", days_ago=40,
                         accession="RTACC0001")
ROSALIND_MR = make_study("rt-search-mr", ROSALIND, modality="MR", days_ago=400,
                         accession="RTACC0002")
ROSS_CT = make_study("rt-search-ross", ROSS, modality="CT", days_ago=5, accession="RTACC0003")


@pytest.fixture(autouse=True)
def _empty_queue():
    """Tasks queued by a test with no worker running must not reach a later test's."""
    from pockethealth.celery import app

    app.control.purge()
    yield
    app.control.purge()


@pytest.fixture(scope="module")
def search_studies(orthanc, tmp_path_factory):
    """Three studies of two test patients on Orthanc, for the search tests."""
    out = tmp_path_factory.mktemp("search-studies")
    for files in (ct_files(out, ROSALIND_CT, slices=3), mr_files(out, ROSALIND_MR, slices=2),
                  ct_files(out, ROSS_CT, slices=4)):
        for path in files:
            orthanc.upload(path)
    return orthanc


def uids_of(paths: list[Path]) -> set[str]:
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def study_uid(paths: list[Path]) -> str:
    from pydicom import dcmread

    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def upload(orthanc, paths: list[Path]) -> set[str]:
    for path in paths:
        orthanc.upload(path)
    return uids_of(paths)


@pytest.fixture
def fast_worker(transactional_db, tmp_path):
    """A real Celery worker like ``celery_worker``, with the shortened retry backoff and
    stale-job time of ``pacs_worker_settings`` (which ``celery_worker`` cannot take)."""
    proc = start_worker(tmp_path, "worker")
    yield proc
    stop_worker(proc)


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    class Peer:
        ae_title, host, port = "SILENT", "127.0.0.1", server.getsockname()[1]

    yield Peer
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


# --- Search ---------------------------------------------------------------------------


def test_a_bare_name_matches_as_a_prefix_and_a_comma_separates_the_given_name():
    assert patient_name_query("vasquez") == "vasquez*"
    assert patient_name_query("Vasquez, Ro") == "Vasquez^Ro*"
    assert patient_name_query("vas?uez*") == "vas?uez*"
    assert patient_name_query("") == ""


def test_search_by_name_with_a_wildcard_finds_every_study_of_both_patients(
        search_studies, pacs_node_for):
    node = pacs_node_for(search_studies)
    hits = pacs_search(node=node, criteria=SearchCriteria(patient_name="vasquez"))
    assert len(hits) == 3
    by_accession = {hit.accession_number: hit for hit in hits}
    ct = by_accession["RTACC0001"]
    assert ct.patient_name == "Vasquez-Lindqvist^Rosalind"
    assert ct.patient_id == "RT-100001"
    assert ct.birth_date == datetime.date(1958, 2, 3)
    assert ct.study_date == study_date_of(ROSALIND_CT)
    assert ct.modalities == ("CT",)
    assert (ct.num_series, ct.num_instances) == (1, 3)
    mr = by_accession["RTACC0002"]
    assert mr.modalities == ("MR",)
    assert (mr.num_series, mr.num_instances) == (3, 6)
    # Newest first.
    assert [hit.accession_number for hit in hits] == ["RTACC0003", "RTACC0001", "RTACC0002"]
    assert all(hit.archive_state == "" for hit in hits)

    hits = pacs_search(node=node, criteria=SearchCriteria(patient_name="Vasquez-L*nd?vist^*"))
    assert {hit.accession_number for hit in hits} == {"RTACC0001", "RTACC0002"}


def test_search_by_mrn_birth_date_accession_date_range_and_modality(search_studies,
                                                                    pacs_node_for):
    node = pacs_node_for(search_studies)

    def found(**criteria):
        hits = pacs_search(node=node, criteria=SearchCriteria(**criteria))
        return sorted(hit.accession_number for hit in hits)

    assert found(patient_id="RT-100001") == ["RTACC0001", "RTACC0002"]
    assert found(patient_id="RT-100001", modality="MR") == ["RTACC0002"]
    assert found(birth_date=datetime.date(1982, 11, 30)) == ["RTACC0003"]
    assert found(accession_number="RTACC0002") == ["RTACC0002"]
    ct_day = study_date_of(ROSALIND_CT)
    assert found(patient_name="vasquez", date_from=ct_day - datetime.timedelta(days=1),
                 date_to=ct_day + datetime.timedelta(days=1)) == ["RTACC0001"]
    assert found(patient_name="vasquez", date_from=ct_day) == ["RTACC0001", "RTACC0003"]
    assert found(patient_name="vasquez", date_to=ct_day) == ["RTACC0001", "RTACC0002"]
    assert found(patient_name="vasquez", modality="CT") == ["RTACC0001", "RTACC0003"]
    assert found(patient_name="nobody-by-this-name") == []


def test_search_says_which_studies_are_already_in_the_archive(search_studies, pacs_node_for,
                                                              facility, tmp_path):
    from dicomgw.services import ingest_file

    node = pacs_node_for(search_studies)
    files = ct_files(tmp_path, ROSALIND_CT, slices=3)
    for path in files[:2]:
        ingest_file(facility=facility, path=path, source="import")
    hits = {h.accession_number: h for h in pacs_search(
        node=node, criteria=SearchCriteria(patient_id="RT-100001"))}
    assert hits["RTACC0001"].archive_state == "partial"
    assert hits["RTACC0001"].archived_instances == 2
    assert hits["RTACC0002"].archive_state == ""
    ingest_file(facility=facility, path=files[2], source="import")
    hits = {h.accession_number: h for h in pacs_search(
        node=node, criteria=SearchCriteria(patient_id="RT-100001"))}
    assert hits["RTACC0001"].archive_state == "complete"
    assert hits["RTACC0001"].archive_study_id == Study.objects.get(facility=facility).pk


def test_a_search_the_pacs_cannot_answer_in_time_is_cut_short_with_a_clear_message(
        silent_peer, pacs_node_for, settings):
    node = pacs_node_for(silent_peer, acse_timeout=2)
    started = time.monotonic()
    with pytest.raises(DicomGatewayError) as caught:
        pacs_search(node=node, criteria=SearchCriteria(patient_name="x"))
    assert time.monotonic() - started < 5
    assert str(caught.value) == "No answer from the PACS within 2 s"


@pytest.fixture
def slow_pacs():
    """A query SCP that takes 30 s over every search, answering C-CANCEL as PS3.4 C.4.1.2.3
    asks (a PACS chewing on a query for a common name over years of studies)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    def handle_find(event):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            time.sleep(0.05)
        yield 0x0000, None

    ae = AE("SLOWPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, handle_find)])

    class Peer:
        ae_title, host, port = "SLOWPACS", "127.0.0.1", server.server_address[1]

    yield Peer
    server.shutdown()


def test_a_search_running_past_the_search_time_limit_is_cancelled(slow_pacs, pacs_node_for,
                                                                  settings):
    settings.PACS_SEARCH_TIMEOUT = 1
    node = pacs_node_for(slow_pacs)
    started = time.monotonic()
    with pytest.raises(DicomGatewayError) as caught:
        pacs_search(node=node, criteria=SearchCriteria(patient_name="smith"))
    assert time.monotonic() - started < 4
    assert str(caught.value) == "The PACS did not answer within 1 s; narrow the search."


def test_a_search_of_a_closed_port_says_the_pacs_refused(pacs_node_for):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    with pytest.raises(DicomGatewayError) as caught:
        pacs_search(node=pacs_node_for(Closed), criteria=SearchCriteria(patient_name="x"))
    assert "refused the connection" in str(caught.value)


def test_more_hits_than_the_limit_are_cut_and_flagged(search_studies, pacs_node_for,
                                                      settings):
    settings.PACS_SEARCH_LIMIT = 2
    hits = pacs_search(node=pacs_node_for(search_studies),
                       criteria=SearchCriteria(patient_name="vasquez"))
    assert len(hits) == 2
    assert hits.truncated


# --- Retrieve -------------------------------------------------------------------------


def archived_uids(facility, study_uid: str) -> list[str]:
    return list(Instance.objects.filter(
        facility=facility, series__study__study_instance_uid=study_uid,
    ).values_list("sop_instance_uid", flat=True))


def finished(job: RetrieveJob, timeout: float = 120) -> RetrieveJob:
    def done():
        job.refresh_from_db()
        return job.is_finished
    assert wait_for(done, timeout=timeout, interval=0.2), (job.status, job.error)
    return job


def test_a_study_is_retrieved_through_the_worker_into_the_archive(
        orthanc, scp_server, celery_worker, pacs_node_for, facility, clerk, tmp_path):
    study = make_study("rt-worker-ct", make_patient("Okonkwo", "Ada", "RT-200001"))
    files = ct_files(tmp_path / "files", study, slices=12)
    uids = upload(orthanc, files)
    node = pacs_node_for(orthanc)
    expected = dimse.find_instance_uids(node, study_uid=study_uid(files))
    assert expected == uids

    job = retrieve_start(node=node, study_instance_uid=study_uid(files), requested_by=clerk)
    finished(job)

    assert job.status == RetrieveJob.Status.COMPLETE, job.error
    assert (job.expected, job.archived, job.completed, job.failed) == (12, 12, 12, 0)
    assert job.missing == []
    assert job.attempts == 1
    got = archived_uids(facility, study_uid(files))
    assert sorted(got) == sorted(expected)  # each once: none missing, none twice
    assert job.study == Study.objects.get(facility=facility)
    assert job.study.num_instances == 12
    assert not InstanceConflict.objects.exists()
    actions = list(AuditEvent.objects.filter(object_id=str(job.pk)).order_by("time")
                   .values_list("action", "outcome", "detail"))
    assert actions[0][:2] == ("pacs.retrieve.start", "success")
    assert actions[-1] == ("pacs.retrieve.finish", "success", {
        "node": node.pk, "status": "complete", "expected": 12, "archived": 12, "missing": 0,
        "failed": 0, "attempts": 1})


def test_asking_twice_for_a_study_joins_the_live_retrieve(orthanc, pacs_node_for, clerk,
                                                          transactional_db):
    node = pacs_node_for(orthanc)
    first = retrieve_start(node=node, study_instance_uid="1.2.3.4", requested_by=clerk)
    again = retrieve_start(node=node, study_instance_uid="1.2.3.4", requested_by=clerk)
    assert again.pk == first.pk
    RetrieveJob.objects.filter(pk=first.pk).update(status=RetrieveJob.Status.COMPLETE)
    third = retrieve_start(node=node, study_instance_uid="1.2.3.4", requested_by=clerk)
    assert third.pk != first.pk


def test_a_rerun_fetches_only_what_the_archive_lacks(orthanc, scp_server, pacs_node_for,
                                                     facility, clerk, tmp_path):
    """The run itself, in this process (the worker adds nothing here): after a complete
    retrieve, one whole series and part of another are deleted from the archive; the
    re-run asks the PACS for exactly those (a SERIES-level and an IMAGE-level C-MOVE)
    and leaves the rest untouched."""
    study = make_study("rt-rerun-mr", make_patient("Haddad", "Samir", "RT-300001"),
                       modality="MR")
    files = mr_files(tmp_path / "files", study, slices=6)
    upload(orthanc, files)
    node = pacs_node_for(orthanc)
    uid = study_uid(files)
    job = retrieve_start(node=node, study_instance_uid=uid, requested_by=clerk)
    assert retrieve_run(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.COMPLETE
    assert job.completed == 18

    series = list(Study.objects.get(facility=facility).series.order_by("series_number"))
    gone = list(series[0].instances.all()) + list(series[1].instances.order_by("pk")[:2])
    gone_uids = {i.sop_instance_uid for i in gone}
    kept = {i.sop_instance_uid: (i.pk, i.received_at) for i in Instance.objects.filter(
        facility=facility).exclude(sop_instance_uid__in=gone_uids)}
    for instance in gone:
        instance.file.delete(save=False)
        instance.delete()

    job = retrieve_retry(job=job, requested_by=clerk)  # a COMPLETE job is not re-run
    assert job.status == RetrieveJob.Status.COMPLETE
    again = retrieve_start(node=node, study_instance_uid=uid, requested_by=clerk)
    assert retrieve_run(job_id=again.pk) is None
    again.refresh_from_db()
    assert again.status == RetrieveJob.Status.COMPLETE, again.error
    # The PACS was asked for the 8 missing images only and sent 8.
    assert (again.expected, again.completed, again.failed, again.archived) == (18, 8, 0, 18)
    assert set(archived_uids(facility, uid)) == uids_of(files)
    assert len(archived_uids(facility, uid)) == 18
    for sop_uid, (pk, received_at) in kept.items():
        instance = Instance.objects.get(facility=facility, sop_instance_uid=sop_uid)
        assert (instance.pk, instance.received_at) == (pk, received_at)

    # Nothing missing: the run moves nothing at all.
    third = retrieve_start(node=node, study_instance_uid=uid, requested_by=clerk)
    retrieve_run(job_id=third.pk)
    third.refresh_from_db()
    assert third.status == RetrieveJob.Status.COMPLETE
    assert third.completed == 0 and third.remaining == 0


def test_a_claimed_job_is_not_run_twice(orthanc, pacs_node_for, clerk, transactional_db):
    node = pacs_node_for(orthanc)
    job = retrieve_start(node=node, study_instance_uid="1.2.3.5", requested_by=clerk)
    RetrieveJob.objects.filter(pk=job.pk).update(status=RetrieveJob.Status.RUNNING,
                                                 updated_at=timezone.now())
    # Another run holds it: this one does nothing and comes back once it would be stale.
    retry_in = retrieve_run(job_id=job.pk)
    assert 290 < retry_in <= 301
    job.refresh_from_db()
    assert (job.status, job.attempts) == (RetrieveJob.Status.RUNNING, 0)
    RetrieveJob.objects.filter(pk=job.pk).update(status=RetrieveJob.Status.COMPLETE)
    assert retrieve_run(job_id=job.pk) is None
    assert retrieve_run(job_id=987654321) is None


def test_stale_jobs_are_queued_again_and_worn_out_ones_failed(orthanc, pacs_node_for, clerk,
                                                              transactional_db):
    node = pacs_node_for(orthanc)
    long_ago = timezone.now() - datetime.timedelta(minutes=10)
    stale = retrieve_start(node=node, study_instance_uid="1.2.3.6", requested_by=clerk)
    worn = retrieve_start(node=node, study_instance_uid="1.2.3.7", requested_by=clerk)
    fresh = retrieve_start(node=node, study_instance_uid="1.2.3.8", requested_by=clerk)
    RetrieveJob.objects.filter(pk=stale.pk).update(status="running", attempts=1,
                                                   updated_at=long_ago)
    RetrieveJob.objects.filter(pk=worn.pk).update(status="running", attempts=4,
                                                  updated_at=long_ago)
    RetrieveJob.objects.filter(pk=fresh.pk).update(status="running", attempts=1)

    recovered = jobs_recover_stale(older_than=datetime.timedelta(minutes=5))

    assert recovered == [("retrieve", stale.pk)]
    stale.refresh_from_db()
    worn.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == "queued"
    assert worn.status == "failed"
    assert "stopped 4 times" in worn.error
    assert fresh.status == "running"
    assert jobs_recover_stale(older_than=datetime.timedelta(minutes=5)) == []


def test_a_pacs_that_refuses_connections_fails_after_bounded_retries(
        fast_worker, pacs_node_for, clerk, client):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    node = pacs_node_for(Closed)
    started = time.monotonic()
    job = retrieve_start(node=node, study_instance_uid="1.2.3.9", requested_by=clerk)
    finished(job, timeout=60)
    elapsed = time.monotonic() - started

    assert job.status == RetrieveJob.Status.FAILED
    assert job.attempts == 4
    assert job.error == f"The PACS at 127.0.0.1:{Closed.port} refused the connection"
    # Backoff 0.5 s, 1 s, 2 s between the four attempts.
    assert 3.5 <= elapsed < 30

    from tests.conftest import sign_in

    sign_in(client, clerk)
    page = client.get(f"/clerk/pacs/retrieves/{job.pk}/").content.decode()
    assert "refused the connection" in page
    assert "Retry" in page


def test_a_silent_pacs_times_out_and_fails_without_hanging_the_worker(
        fast_worker, silent_peer, orthanc, scp_server, pacs_node_for, facility, clerk,
        tmp_path):
    node = pacs_node_for(silent_peer, acse_timeout=2, dimse_timeout=2, network_timeout=2)
    started = time.monotonic()
    job = retrieve_start(node=node, study_instance_uid="1.2.3.10", requested_by=clerk)
    finished(job, timeout=60)
    elapsed = time.monotonic() - started
    assert job.status == RetrieveJob.Status.FAILED
    assert job.attempts == 4
    assert job.error == "No answer from the PACS within 2 s"
    # Four 2 s timeouts and 3.5 s of backoff.
    assert 11 <= elapsed < 30

    # The worker is free for the next job straight away.
    study = make_study("rt-after-silent", make_patient("Brennan", "Tom", "RT-400001"))
    files = ct_files(tmp_path / "files", study, slices=3)
    upload(orthanc, files)
    job = retrieve_start(node=pacs_node_for(orthanc), study_instance_uid=study_uid(files),
                         requested_by=clerk)
    assert finished(job, timeout=30).status == RetrieveJob.Status.COMPLETE


def test_a_worker_killed_mid_move_leaves_a_job_that_a_new_worker_completes_exactly(
        orthanc, scp_server, pacs_node_for, facility, clerk, tmp_path, transactional_db):
    study = make_study("rt-kill-ct", make_patient("Lindgren", "Eva", "RT-500001"))
    files = ct_files(tmp_path / "files", study, slices=300)
    upload(orthanc, files)
    node = pacs_node_for(orthanc)
    uid = study_uid(files)
    expected = dimse.find_instance_uids(node, study_uid=uid)
    assert len(expected) == 300

    worker = start_worker(tmp_path, "first-worker")
    try:
        job = retrieve_start(node=node, study_instance_uid=uid, requested_by=clerk)

        def moving():
            job.refresh_from_db()
            return job.status == "running" and 50 <= job.completed

        assert wait_for(moving, timeout=60, interval=0.02), (job.status, job.completed)
        kill_worker(worker)
    finally:
        stop_worker(worker)
    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.RUNNING
    assert 50 <= job.completed < 300

    # The dead run's row stops moving; a new worker finds it stale when it starts.
    time.sleep(5)
    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.RUNNING
    scp_server.wait_idle()
    before_rerun = len(archived_uids(facility, uid))
    worker = start_worker(tmp_path, "second-worker")
    try:
        finished(job, timeout=120)
    finally:
        stop_worker(worker)

    assert job.status == RetrieveJob.Status.COMPLETE, job.error
    assert job.attempts == 2
    got = archived_uids(facility, uid)
    assert len(got) == len(set(got)) == 300
    assert set(got) == expected
    assert job.missing == []
    # The second run asked only for what the first had not delivered.
    assert job.completed == 300 - before_rerun
    assert not InstanceConflict.objects.exists()


def test_a_pacs_that_reports_failed_sub_operations_gives_a_partial_retrieve(
        dcmqrscp, scp_server, pacs_node_for, facility, clerk, tmp_path):
    """dcmqrscp indexes files it stored; two of them are then lost from its disk. Its
    C-FIND still lists them, its C-MOVE reports them as failed sub-operations: the
    retrieve is PARTIAL and names exactly those two."""
    from pydicom import dcmread

    study = make_study("rt-partial-mr", make_patient("Moreau", "Luc", "RT-600001"),
                       modality="MR")
    files = mr_files(tmp_path / "files", study, slices=3)
    uids = dcmqrscp.load(files)
    stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in dcmqrscp.storage.rglob("*") if p.is_file() and p.name != "index.dat"}
    lost = sorted(uids)[:2]
    for sop_uid in lost:
        stored[sop_uid].unlink()
    node = pacs_node_for(dcmqrscp)
    job = retrieve_start(node=node, study_instance_uid=study_uid(files), requested_by=clerk)

    retrieve_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.PARTIAL
    assert (job.expected, job.archived, job.completed, job.failed) == (9, 7, 7, 2)
    assert job.missing == lost
    assert job.error == "2 images did not arrive from the PACS."
    assert set(archived_uids(facility, study_uid(files))) == uids - set(lost)
    event = AuditEvent.objects.get(action="pacs.retrieve.finish", object_id=str(job.pk))
    assert event.outcome == "failure"
    assert event.detail["missing"] == 2


def test_a_pacs_that_does_not_know_our_destination_fails_with_the_reason(
        orthanc, scp_server, pacs_node_for, facility, clerk, tmp_path):
    study = make_study("rt-no-dest", make_patient("Ferreira", "Ines", "RT-700001"))
    files = ct_files(tmp_path / "files", study, slices=2)
    upload(orthanc, files)
    node = pacs_node_for(orthanc, move_destination="NOTKNOWN")
    job = retrieve_start(node=node, study_instance_uid=study_uid(files), requested_by=clerk)

    assert retrieve_run(job_id=job.pk) is None  # not worth retrying

    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.FAILED
    assert job.attempts == 1
    # Orthanc answers 0xC000 rather than 0xA801 (PS3.4 C.4.2.1.4.1) for a destination it
    # does not know; either way the clerk reads what the PACS said, not "done".
    assert job.error.startswith("The PACS") and "retrieve" in job.error
    assert job.missing == sorted(uids_of(files))


def test_a_study_is_retrieved_by_c_get_where_the_pacs_offers_it(
        orthanc, pacs_node_for, facility, clerk, tmp_path, transactional_db):
    study = make_study("rt-cget-mr", make_patient("Nakamura", "Kenji", "RT-800001"),
                       modality="MR")
    files = mr_files(tmp_path / "files", study, slices=2)
    upload(orthanc, files)
    node = pacs_node_for(orthanc, supports_c_get=True)
    job = retrieve_start(node=node, study_instance_uid=study_uid(files), requested_by=clerk)

    retrieve_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == RetrieveJob.Status.COMPLETE, job.error
    assert (job.expected, job.archived, job.completed) == (6, 6, 6)
    assert set(archived_uids(facility, study_uid(files))) == uids_of(files)
    assert set(Instance.objects.values_list("source", flat=True)) == {"retrieve"}
