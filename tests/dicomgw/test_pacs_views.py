"""The clerk's PACS pages: search, retrieve, status and push pages, the Verify button and
the admin's Verify action; who may see what, and that criteria never reach a URL."""

import datetime
import re

import pytest
from django.utils import timezone

from dicomgw.models import PacsNode, PushJob, RetrieveJob, Study
from dicomgw.services import ingest_file
from pockethealth.models import AuditEvent
from tests.conftest import sign_in

from .conftest import free_port
from .pacs_helpers import ct_files, make_patient, make_study

HX = {"HTTP_HX_REQUEST": "true"}
PATIENT = make_patient("Kowalczyk-Brandt", "Zofia", "VW-777001", datetime.date(1949, 8, 9))
STUDY = make_study("vw-ct", PATIENT, accession="VWACC0001", description="CT HEAD WO")


@pytest.fixture(autouse=True)
def _empty_queue():
    from pockethealth.celery import app

    app.control.purge()
    yield
    app.control.purge()


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
    return ct_files(tmp_path_factory.mktemp("vw"), STUDY, slices=4)


@pytest.fixture(scope="module")
def loaded_orthanc(orthanc, study_files):
    for path in study_files:
        orthanc.upload(path)
    return orthanc


def urls_in(html: str) -> list[str]:
    return re.findall(r'(?:href|action|hx-get|hx-post)="([^"]*)"', html)


def test_a_search_is_posted_kept_in_the_session_and_never_put_in_a_url(
        loaded_orthanc, pacs_node_for, clerk_client):
    node = pacs_node_for(loaded_orthanc)
    criteria = {"node": node.pk, "patient_name": "kowalczyk", "patient_id": "",
                "birth_date": "1949-08-09", "accession_number": "", "date_from": "",
                "date_to": "", "modality": "CT"}

    response = clerk_client.post("/clerk/pacs/", criteria, **HX)

    html = response.content.decode()
    assert response.status_code == 200
    assert "KOWALCZYK-BRANDT, Zofia" in html
    assert "VW-777001" in html and "1949/08/09" in html and "CT HEAD WO" in html
    assert "1 study found" in html
    assert 'name="study_uids"' in html
    for url in urls_in(html):
        assert "owalczyk" not in url.lower() and "777001" not in url and "1949" not in url
    saved = clerk_client.session["pacs_search"]
    assert saved["patient_name"] == "kowalczyk" and saved["birth_date"] == "1949-08-09"

    # Without htmx: redirect to the bare page, which runs the saved search.
    response = clerk_client.post("/clerk/pacs/", criteria)
    assert response.status_code == 302 and response["Location"] == "/clerk/pacs/"
    page = clerk_client.get("/clerk/pacs/").content.decode()
    assert "KOWALCZYK-BRANDT, Zofia" in page
    assert 'value="kowalczyk"' in page
    for url in urls_in(page):
        assert "owalczyk" not in url.lower()
    event = AuditEvent.objects.filter(action="pacs.search").latest("time")
    assert event.detail == {"results": 1}
    assert "owalczyk" not in str(event.detail).lower()

    page = clerk_client.get("/clerk/pacs/?clear=1").content.decode()
    assert "KOWALCZYK" not in page
    assert "pacs_search" not in clerk_client.session


def test_a_search_needs_something_to_match(loaded_orthanc, pacs_node_for, clerk_client):
    node = pacs_node_for(loaded_orthanc)
    response = clerk_client.post("/clerk/pacs/", {"node": node.pk, "modality": "CT"}, **HX)
    assert "Enter a name, MRN, date of birth, accession or study dates." in (
        response.content.decode())
    response = clerk_client.post("/clerk/pacs/", {
        "node": node.pk, "date_from": "2024-05-02", "date_to": "2024-05-01"}, **HX)
    assert "The end of the range is before its start." in response.content.decode()


def test_a_pacs_error_is_shown_in_plain_words(pacs_node_for, clerk_client):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    node = pacs_node_for(Closed)
    response = clerk_client.post("/clerk/pacs/", {"node": node.pk, "patient_id": "1"}, **HX)
    assert f"The PACS at 127.0.0.1:{Closed.port} refused the connection" in (
        response.content.decode())


def test_ticked_studies_become_retrieves_labelled_with_what_the_pacs_said(
        loaded_orthanc, pacs_node_for, clerk_client, study_files, facility):
    from pydicom import dcmread

    study_uid = str(dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
    node = pacs_node_for(loaded_orthanc)
    clerk_client.post("/clerk/pacs/", {"node": node.pk, "patient_id": "VW-777001"}, **HX)

    # A UID that the search did not show cannot be asked for.
    response = clerk_client.post("/clerk/pacs/retrieve/", {"study_uids": ["1.2.3.4"]})
    assert response.status_code == 302 and response["Location"] == "/clerk/pacs/"
    assert not RetrieveJob.objects.exists()

    response = clerk_client.post("/clerk/pacs/retrieve/", {"study_uids": [study_uid]})
    job = RetrieveJob.objects.get()
    assert response["Location"] == f"/clerk/pacs/retrieves/{job.pk}/"
    assert (job.facility, job.node, job.study_instance_uid) == (facility, node, study_uid)
    assert job.patient_name == "Kowalczyk-Brandt^Zofia"
    assert job.description == "CT HEAD WO" and job.modalities == "CT"
    page = clerk_client.get(job_url(job)).content.decode()
    assert "KOWALCZYK-BRANDT, Zofia" in page
    listing = clerk_client.get("/clerk/pacs/retrieves/").content.decode()
    assert "KOWALCZYK-BRANDT, Zofia" in listing and "CT HEAD WO" in listing


def job_url(job) -> str:
    return f"/clerk/pacs/retrieves/{job.pk}/"


def make_job(node, **fields) -> RetrieveJob:
    return RetrieveJob.objects.create(facility=node.facility, node=node,
                                      study_instance_uid="1.2.840.99.1", **fields)


def test_the_progress_fragment_polls_while_running_and_stops_when_finished(
        pacs_node_for, clerk_client, facility, testdata_dir):
    class Peer:
        ae_title, host, port = "PACS", "127.0.0.1", 104

    node = pacs_node_for(Peer)
    job = make_job(node, status="running", expected=40, remaining=30, completed=10, archived=0,
                   started_at=timezone.now())
    fragment = clerk_client.get(job_url(job), **HX).content.decode()
    assert 'hx-trigger="every 1s"' in fragment
    assert 'aria-valuenow="25"' in fragment
    assert "<html" not in fragment

    path = next((testdata_dir / "transfer_syntaxes_siemens_trio").glob("*.dcm"))
    ingest_file(facility=facility, path=path, source="import")
    study = Study.objects.get(facility=facility)
    RetrieveJob.objects.filter(pk=job.pk).update(
        status="complete", remaining=0, completed=40, archived=40, study=study,
        finished_at=timezone.now())
    fragment = clerk_client.get(job_url(job), **HX).content.decode()
    assert "hx-trigger" not in fragment
    assert "The study is in the archive: all 40 images." in fragment
    assert f'href="/clerk/archive/studies/{study.pk}/"' in fragment


def test_a_partial_retrieve_lists_what_is_missing_and_offers_a_retry(
        pacs_node_for, clerk_client, clerk):
    class Peer:
        ae_title, host, port = "PACS", "127.0.0.1", 104

    job = make_job(pacs_node_for(Peer), status="partial", expected=9, archived=7, failed=2,
                   completed=7, remaining=0, missing=["1.2.3.4.5", "1.2.3.4.6"],
                   error="2 images did not arrive from the PACS.", attempts=1,
                   finished_at=timezone.now())
    page = clerk_client.get(job_url(job)).content.decode()
    assert "2 images did not arrive from the PACS." in page
    assert "<code>1.2.3.4.5</code>" in page and "<code>1.2.3.4.6</code>" in page
    assert "Retry the missing images" in page

    response = clerk_client.post(f"{job_url(job)}retry/")
    assert response["Location"] == job_url(job)
    job.refresh_from_db()
    assert (job.status, job.attempts, job.error) == ("queued", 0, "")
    assert AuditEvent.objects.filter(action="pacs.retrieve.retry", object_id=str(job.pk),
                                     actor_user=clerk).exists()


def test_times_are_shown_in_the_facility_time_zone(pacs_node_for, clerk_client):
    class Peer:
        ae_title, host, port = "PACS", "127.0.0.1", 104

    job = make_job(pacs_node_for(Peer), status="failed", error="x",
                   finished_at=datetime.datetime(2025, 1, 15, 3, 30, tzinfo=datetime.UTC))
    page = clerk_client.get(job_url(job)).content.decode()
    assert "Finished 2025/01/14 at 22:30" in page  # Toronto, UTC-5


def test_another_facility_sees_none_of_our_nodes_jobs_or_studies(
        pacs_node_for, client, other_clerk, facility, testdata_dir):
    class Peer:
        ae_title, host, port = "PACS", "127.0.0.1", 104

    node = pacs_node_for(Peer)
    job = make_job(node, status="partial", missing=["1.2.3"])
    path = next((testdata_dir / "transfer_syntaxes_siemens_trio").glob("*.dcm"))
    ingest_file(facility=facility, path=path, source="import")
    study = Study.objects.get(facility=facility)
    push = PushJob.objects.create(facility=facility, node=node, study=study, status="failed")

    sign_in(client, other_clerk)
    assert client.get(job_url(job)).status_code == 404
    assert client.get(job_url(job), **HX).status_code == 404
    assert client.post(f"{job_url(job)}retry/").status_code == 404
    assert client.get(f"/clerk/pacs/pushes/{push.pk}/").status_code == 404
    assert client.post(f"/clerk/pacs/pushes/{push.pk}/retry/").status_code == 404
    assert client.get(f"/clerk/pacs/send/{study.pk}/").status_code == 404
    assert client.post("/clerk/pacs/verify/", {"node": node.pk}).status_code == 404
    for page in ("/clerk/pacs/retrieves/", "/clerk/pacs/pushes/"):
        assert "1.2.840.99.1" not in client.get(page).content.decode()
    search = client.get("/clerk/pacs/").content.decode()
    assert node.name not in search
    response = client.post("/clerk/pacs/", {"node": node.pk, "patient_id": "1"}, **HX)
    assert "Select a valid choice" in response.content.decode()
    job.refresh_from_db()
    assert job.status == "partial"
    assert not AuditEvent.objects.filter(action="pacs.search").exists()


def test_a_clerk_checks_the_connection_and_reads_why_it_failed(pacs_node_for, clerk_client,
                                                              orthanc):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    node = pacs_node_for(Closed)
    response = clerk_client.post("/clerk/pacs/verify/", {"node": node.pk}, **HX)
    html = response.content.decode()
    assert "verify-failed" in html
    assert f"The PACS at 127.0.0.1:{Closed.port} refused the connection" in html
    node.refresh_from_db()
    assert node.last_verified_at is not None
    assert "refused" in node.last_verify_result

    good = pacs_node_for(orthanc)
    html = clerk_client.post("/clerk/pacs/verify/", {"node": good.pk}, **HX).content.decode()
    assert "verify-ok" in html and "The PACS answered the verification (C-ECHO)" in html


def test_the_admin_verify_action_stores_and_says_what_failed(pacs_node_for, client,
                                                             support_user, orthanc):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    down = pacs_node_for(Closed)
    up = pacs_node_for(orthanc)
    sign_in(client, support_user)
    response = client.post("/admin/dicomgw/pacsnode/", {
        "action": "verify", "_selected_action": [down.pk, up.pk]}, follow=True)
    html = response.content.decode()
    assert f"{down.name}: The PACS at 127.0.0.1:{Closed.port} refused the connection" in html
    assert f"{up.name}: The PACS answered the verification (C-ECHO) in" in html
    down.refresh_from_db()
    up.refresh_from_db()
    assert down.last_verified_at and up.last_verified_at
    assert "refused" in down.last_verify_result
    assert up.last_verify_result.startswith("The PACS answered")


def test_the_admin_verify_action_names_a_rejected_ae_title(pacs_node_for, client,
                                                           support_user, dcmqrscp):
    wrong = pacs_node_for(dcmqrscp, ae_title="NOTDCMQR")
    sign_in(client, support_user)
    html = client.post("/admin/dicomgw/pacsnode/", {
        "action": "verify", "_selected_action": [wrong.pk]}, follow=True).content.decode()
    wrong.refresh_from_db()
    assert "NOTDCMQR" in wrong.last_verify_result
    assert wrong.last_verify_result in html


def test_a_study_is_sent_to_a_pacs_from_its_archive_page(pacs_node_for, clerk_client,
                                                         facility, testdata_dir, orthanc):
    for path in (testdata_dir / "transfer_syntaxes_siemens_trio").glob("*.dcm"):
        ingest_file(facility=facility, path=path, source="import")
    study = Study.objects.get(facility=facility)
    page = clerk_client.get(f"/clerk/archive/studies/{study.pk}/").content.decode()
    assert f'href="/clerk/pacs/send/{study.pk}/"' in page

    node = pacs_node_for(orthanc)
    PacsNode.objects.create(facility=node.facility, name="Off", ae_title="OFF",
                            host="127.0.0.1", is_active=False)
    page = clerk_client.get(f"/clerk/pacs/send/{study.pk}/").content.decode()
    assert node.name in page and ">Off<" not in page
    response = clerk_client.post(f"/clerk/pacs/send/{study.pk}/", {"node": node.pk})
    push = PushJob.objects.get()
    assert response["Location"] == f"/clerk/pacs/pushes/{push.pk}/"
    assert (push.total, push.status) == (9, "queued")
    fragment = clerk_client.get(f"/clerk/pacs/pushes/{push.pk}/", **HX).content.decode()
    assert 'hx-trigger="every 1s"' in fragment
