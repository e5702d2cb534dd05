"""Fulfilling a request inside the platform: the asked facility (here "Palm Beach MRI",
``other_facility``) sees the request of St. Anthony's (``facility``) among its incoming
requests and answers it from its own archive or from its PACS (a real Orthanc, C-MOVE
into our storage SCP); a real Celery worker copies the studies into St. Anthony's
archive, byte for byte. Or it declines."""

import datetime
import re

import pytest
from django.utils.html import escape

from dicomgw.models import Instance, RetrieveJob, Study
from dicomgw.services import ingest_file
from pockethealth.models import AuditEvent
from retrieval.fulfil import request_fulfil, request_incoming_decline
from retrieval.models import FulfilmentStudy, RecordRequest, RequestFulfilment, RequestStudy
from retrieval.services import RetrievalError, request_cancel
from tests.conftest import make_staff, sign_in
from tests.dicomgw.conftest import orthanc, pacs_node_for, scp_port, scp_server  # noqa: F401
from tests.dicomgw.pacs_helpers import ct_files, make_patient, make_study, wait_for

from .conftest import outside_facility, request_patient

TS_FOLDER = "transfer_syntaxes_siemens_trio"
# The patient of the Siemens files, as the requester knows them.
STC = {"name": "STC_TEST^", "birth_date": datetime.date(1980, 7, 7), "mrn": "SAM-9001"}


@pytest.fixture(autouse=True)
def _empty_queue():
    from pockethealth.celery import app

    app.control.purge()
    yield
    app.control.purge()


@pytest.fixture
def asked(record_request, other_facility):
    """A request of St. Anthony's addressed to Palm Beach, which runs on the platform."""

    def make(**patient):
        made, pin, _token = record_request(
            target=outside_facility(name=other_facility.name, facility=other_facility),
            patient=request_patient(**patient))
        return made, pin

    return make


@pytest.fixture
def their_study(other_facility, testdata_dir) -> Study:
    """The Siemens study in Palm Beach's archive."""
    for path in sorted((testdata_dir / TS_FOLDER).glob("*.dcm")):
        assert ingest_file(facility=other_facility, path=path, source="import").ok
    return Study.objects.get(facility=other_facility)


def digests(facility, study_uid: str) -> dict[str, str]:
    return dict(Instance.objects.filter(facility=facility,
                                        series__study__study_instance_uid=study_uid)
                .values_list("sop_instance_uid", "sha256"))


def finished(fulfilment: RequestFulfilment, timeout: float = 120) -> RequestFulfilment:
    def done():
        fulfilment.refresh_from_db()
        return fulfilment.is_finished

    assert wait_for(done, timeout=timeout, interval=0.2), (fulfilment.status,
                                                           fulfilment.error)
    return fulfilment


def without_tokens(html: str) -> str:
    return re.sub(r'name="csrfmiddlewaretoken" value="[^"]*"', "", html)


def test_the_asked_facility_sees_the_request_but_no_pin_and_no_upload(
        client, asked, other_clerk, clerk, their_study, facility):
    record_request, pin = asked(**STC)
    sign_in(client, other_clerk)

    listing = client.get("/clerk/requests/incoming/")
    assert listing.status_code == 200
    assert "STC_TEST" in listing.content.decode()
    assert escape(facility.name) in listing.content.decode()

    page = client.get(f"/clerk/requests/incoming/{record_request.pk}/")
    html = without_tokens(page.content.decode())
    assert page.status_code == 200
    assert "Chest X-ray, 2019 to 2021" in html
    assert "1980/07/07" in html and "SAM-9001" in html
    # Their own study of that patient is offered, ready to tick.
    assert f'name="studies" value="{their_study.pk}"' in html
    assert pin not in html
    assert "/upload/" not in html
    assert AuditEvent.objects.filter(action="request.incoming.view",
                                     actor_user=other_clerk).exists()

    # Neither the requester nor a third facility sees it as incoming.
    client.logout()
    sign_in(client, clerk)
    assert client.get(f"/clerk/requests/incoming/{record_request.pk}/").status_code == 404
    assert "STC_TEST" not in client.get("/clerk/requests/incoming/").content.decode()
    from pockethealth.models import Facility

    third = Facility.objects.create(name="Third Clinic", short_name="third")
    client.logout()
    sign_in(client, make_staff(third, "third"))
    assert client.get(f"/clerk/requests/incoming/{record_request.pk}/").status_code == 404
    assert client.post(f"/clerk/requests/incoming/{record_request.pk}/answer/",
                       {"studies": [their_study.pk]}).status_code == 404


def test_an_answer_from_the_archive_delivers_the_studies_to_the_requester(
        client, asked, other_clerk, clerk, their_study, facility, other_facility,
        celery_worker):
    record_request, _pin = asked(**STC)
    sign_in(client, other_clerk)

    response = client.post(f"/clerk/requests/incoming/{record_request.pk}/answer/",
                           {"studies": [their_study.pk]})
    assert response.status_code == 302
    fulfilment = finished(RequestFulfilment.objects.get(request=record_request))

    assert fulfilment.status == RequestFulfilment.Status.COMPLETE, fulfilment.error
    assert (fulfilment.total, fulfilment.copied) == (9, 9)
    uid = their_study.study_instance_uid
    ours = digests(facility, uid)
    assert ours == digests(other_facility, uid) and len(ours) == 9
    for instance in Instance.objects.filter(facility=facility):
        with instance.file.open("rb") as mine:
            source = Instance.objects.get(facility=other_facility,
                                          sop_instance_uid=instance.sop_instance_uid)
            with source.file.open("rb") as theirs:
                assert mine.read() == theirs.read()
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.RECEIVED
    [request_study] = RequestStudy.objects.filter(request=record_request)
    assert request_study.study.facility == facility
    assert request_study.study.study_instance_uid == uid

    events = {(e.action, e.facility_id, e.outcome) for e in AuditEvent.objects.filter(
        object_type="retrieval.recordrequest", object_id=str(record_request.pk))}
    assert ("request.fulfil.start", other_facility.pk, "success") in events
    assert ("request.fulfil.finish", other_facility.pk, "success") in events
    assert ("request.receive", facility.pk, "success") in events

    # The requester sees the study on the request's page, ready to reconcile.
    client.logout()
    sign_in(client, clerk)
    studies = client.get(f"/clerk/requests/{record_request.pk}/studies/").content.decode()
    assert f"/clerk/archive/studies/{request_study.study_id}/" in studies
    assert f"/studies/{request_study.pk}/reconcile/" in studies


def test_an_answer_from_the_pacs_retrieves_the_studies_first(
        client, asked, other_clerk, other_facility, facility, orthanc, scp_server,  # noqa: F811
        pacs_node_for, celery_worker, tmp_path):  # noqa: F811
    patient = make_patient("Okafor", "Chidi", "PB-77120", datetime.date(1971, 3, 9), "M")
    study = make_study("fulfil-ct", patient, modality="CT", description="CT CHEST")
    files = ct_files(tmp_path / "files", study, slices=6)
    uids = orthanc.upload_study(files[0].parent)
    assert len(uids) == 6
    node = pacs_node_for(orthanc, facility=other_facility)
    record_request, _pin = asked(name="OKAFOR^Chidi", birth_date=datetime.date(1971, 3, 9),
                                 mrn="SAM-5120")
    sign_in(client, other_clerk)

    found = client.post(f"/clerk/requests/incoming/{record_request.pk}/pacs/", {
        "node": node.pk, "patient_name": "Okafor", "birth_date": "1971-03-09"},
        HTTP_HX_REQUEST="true")
    html = found.content.decode()
    assert found.status_code == 200
    [study_uid] = re.findall(r'name="study_uids" value="([^"]+)"', html)
    answer = client.post(f"/clerk/requests/incoming/{record_request.pk}/answer/",
                         {"study_uids": [study_uid]})
    assert answer.status_code == 302

    fulfilment = finished(RequestFulfilment.objects.get(request=record_request))
    assert fulfilment.status == RequestFulfilment.Status.COMPLETE, fulfilment.error
    [row] = FulfilmentStudy.objects.filter(fulfilment=fulfilment)
    assert row.retrieve.status == RetrieveJob.Status.COMPLETE
    assert set(digests(other_facility, study_uid)) == uids
    assert digests(facility, study_uid) == digests(other_facility, study_uid)
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.RECEIVED
    assert RequestStudy.objects.get(request=record_request).study.num_instances == 6


def test_declining_from_the_platform_ends_the_request_with_the_reason(
        client, asked, other_clerk, clerk, their_study):
    record_request, _pin = asked(**STC)
    sign_in(client, other_clerk)
    url = f"/clerk/requests/incoming/{record_request.pk}/decline/"

    assert client.post(url, {"reason": "  "}).status_code == 302
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.SENT

    client.post(url, {"reason": "No records  for this patient"})
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.DECLINED
    assert record_request.decline_reason == "No records for this patient"
    event = AuditEvent.objects.get(action="request.decline")
    assert event.actor_user == other_clerk and event.object_id == str(record_request.pk)
    with pytest.raises(RetrievalError, match="declined"):
        request_fulfil(record_request=record_request, facility=other_clerk.facility,
                       by=other_clerk, studies=[their_study])

    client.logout()
    sign_in(client, clerk)
    page = client.get(f"/clerk/requests/{record_request.pk}/").content.decode()
    assert "No records for this patient" in page


def test_a_cancelled_request_cannot_be_answered_nor_declined(asked, other_clerk, clerk,
                                                            their_study, client):
    record_request, _pin = asked(**STC)
    request_cancel(record_request=record_request, by=clerk)
    with pytest.raises(RetrievalError, match="cancelled"):
        request_fulfil(record_request=record_request, facility=other_clerk.facility,
                       by=other_clerk, studies=[their_study])
    with pytest.raises(RetrievalError, match="cancelled"):
        request_incoming_decline(record_request=record_request,
                                 facility=other_clerk.facility, by=other_clerk,
                                 reason="No records")
    sign_in(client, other_clerk)
    page = client.get(f"/clerk/requests/incoming/{record_request.pk}/").content.decode()
    assert "cancelled this request" in page
    assert "/answer/" not in page
    assert not RequestFulfilment.objects.exists()


def test_only_the_asked_facility_answers_and_only_from_its_own_archive(
        asked, clerk, other_clerk, their_study, facility, testdata_dir):
    record_request, _pin = asked(**STC)
    with pytest.raises(RetrievalError, match="not addressed to your facility"):
        request_fulfil(record_request=record_request, facility=facility, by=clerk,
                       studies=[their_study])
    path = sorted((testdata_dir / "cd_ihe_pdi_hitachi_mr_jp" / "DCMDT").iterdir())[0]
    mine = ingest_file(facility=facility, path=path, source="import").instance.series.study
    with pytest.raises(RetrievalError, match="not in your facility's archive"):
        request_fulfil(record_request=record_request, facility=other_clerk.facility,
                       by=other_clerk, studies=[mine])
    with pytest.raises(RetrievalError, match="Tick at least one exam"):
        request_fulfil(record_request=record_request, facility=other_clerk.facility,
                       by=other_clerk)
