"""Received studies of a request: collected once, reconciled with the requester's own
record of the patient, and imported into a real Orthanc by C-STORE under the local MRN,
with the archived files left exactly as received."""

import datetime
import hashlib
import io
from pathlib import Path

import pytest
from django.utils import timezone
from pydicom import dcmread

from dicomgw import dimse
from dicomgw.models import Instance, Study
from pockethealth.models import AuditEvent
from retrieval.imports import (
    apply_identity,
    reconcile_initial,
    request_import_retry,
    request_import_run,
    request_import_start,
    request_studies_collect,
    request_study_reconcile,
)
from retrieval.models import (
    RecordRequest,
    RequestImport,
    RequestStudy,
    Upload,
    UploadedFile,
)
from retrieval.services import RetrievalError, request_cancel
from sharing.recipient import archive_purge
from tests.conftest import make_staff, sign_in
from tests.dicomgw.conftest import free_port, orthanc, pacs_node_for, scp_port  # noqa: F401
from tests.dicomgw.pacs_helpers import wait_for

CD = "cd_ihe_pdi_hitachi_mr_jp"
CD_PATIENT_ID = "0000110231"
TS_FOLDER = "transfer_syntaxes_siemens_trio"
LOCAL_MRN = "SAM-4471"
LOCAL_NAME = "FURUHASHI^Taichi"
# Elements the copy sent to the PACS may differ in; everything else must be the same.
IDENTITY_KEYWORDS = {"PatientID", "PatientName", "AccessionNumber", "IssuerOfPatientID",
                     "OtherPatientIDsSequence"}


@pytest.fixture(autouse=True)
def _empty_queue():
    from pockethealth.celery import app

    app.control.purge()
    yield
    app.control.purge()


@pytest.fixture
def cd_images(testdata_dir) -> list[Path]:
    return sorted((testdata_dir / CD / "DCMDT").iterdir())


@pytest.fixture
def syntax_images(testdata_dir) -> list[Path]:
    return sorted((testdata_dir / TS_FOLDER).glob("*.dcm"))


def stored_digests(study: Study) -> dict[str, str]:
    digests = {}
    for instance in Instance.objects.filter(series__study=study):
        with instance.file.open("rb") as fh:
            digests[instance.sop_instance_uid] = hashlib.sha256(fh.read()).hexdigest()
    return digests


def reconcile(request_study: RequestStudy, clerk, **changes) -> RequestStudy:
    values = {"local_patient_id": LOCAL_MRN, "local_patient_name": LOCAL_NAME,
              "local_accession_number": "SAMACC77"}
    values.update(changes)
    return request_study_reconcile(request_study=request_study, by=clerk, **values)


def finished(job: RequestImport, timeout: float = 120) -> RequestImport:
    def done():
        job.refresh_from_db()
        return job.is_finished

    assert wait_for(done, timeout=timeout, interval=0.2), (job.status, job.error)
    return job


# --- Collect and reconcile --------------------------------------------------------------


def test_collect_lists_each_study_of_confirmed_uploads_once(received_request, syntax_images,
                                                             cd_images, facility):
    record_request, studies = received_request(syntax_images)
    assert len(studies) == 1
    assert studies[0].study.num_instances == 9
    # A second upload still open brings a second study, listed only once confirmed.
    upload = Upload.objects.create(request=record_request)
    from dicomgw.services import ingest_file

    outcome = ingest_file(facility=facility, path=cd_images[0], source="upload")
    UploadedFile.objects.create(upload=upload, path="DCMDT/D0000000", size=1,
                                outcome=UploadedFile.Outcome.STORED, instance=outcome.instance)
    assert len(request_studies_collect(record_request=record_request)) == 1
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.CONFIRMED)
    again = request_studies_collect(record_request=record_request)
    assert len(again) == 2
    assert len(request_studies_collect(record_request=record_request)) == 2
    assert RequestStudy.objects.filter(request=record_request).count() == 2


def test_reconcile_starts_from_the_request_and_records_each_element_that_changes(
        received_request, cd_images, clerk):
    record_request, [request_study] = received_request(cd_images[:3])
    assert reconcile_initial(request_study) == {
        "local_patient_id": "SAM-4471", "local_patient_name": "ANTHONY^Ryan",
        "local_accession_number": ""}

    request_study = reconcile(request_study, clerk)

    assert request_study.is_reconciled and request_study.reconciled_by == clerk
    assert request_study.changes == [
        {"tag": "(0010,0020)", "keyword": "PatientID", "old": CD_PATIENT_ID, "new": LOCAL_MRN},
        {"tag": "(0010,0010)", "keyword": "PatientName", "old": "ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地",
         "new": LOCAL_NAME},
        {"tag": "(0008,0050)", "keyword": "AccessionNumber", "old": "", "new": "SAMACC77"},
        {"tag": "(0010,1002)", "keyword": "OtherPatientIDsSequence", "old": "",
         "new": CD_PATIENT_ID},
    ]
    assert reconcile_initial(request_study)["local_accession_number"] == "SAMACC77"
    event = AuditEvent.objects.get(action="request.reconcile")
    assert event.object_id == str(record_request.pk) and event.actor_user == clerk
    assert event.detail["changed"] == ["PatientID", "PatientName", "AccessionNumber",
                                       "OtherPatientIDsSequence"]


@pytest.mark.parametrize("values, message", [
    ({"local_patient_id": ""}, "Enter the patient's MRN"),
    ({"local_patient_name": "^"}, "Enter the patient's name"),
    ({"local_patient_id": "A\\B"}, "Backslashes"),
    ({"local_accession_number": "X" * 17}, "at most 16 characters"),
])
def test_reconcile_refuses_values_a_dicom_element_cannot_hold(received_request, cd_images,
                                                              clerk, values, message):
    _record_request, [request_study] = received_request(cd_images[:1])
    with pytest.raises(RetrievalError, match=message):
        reconcile(request_study, clerk, **values)
    request_study.refresh_from_db()
    assert not request_study.is_reconciled


def test_a_local_name_outside_the_files_character_set_turns_the_copy_into_utf8(cd_images):
    ds = dcmread(cd_images[0])
    institution = ds.InstitutionName
    apply_identity(ds, {"PatientID": LOCAL_MRN, "PatientName": "MÜLLER^Jörg"})
    out = io.BytesIO()
    ds.save_as(out)
    copy = dcmread(io.BytesIO(out.getvalue()))
    assert copy.SpecificCharacterSet == "ISO_IR 192"
    assert str(copy.PatientName) == "MÜLLER^Jörg"
    assert copy.InstitutionName == institution
    assert copy.OtherPatientIDsSequence[0].PatientID == CD_PATIENT_ID
    assert b"\x1b$B" not in out.getvalue()  # no ISO 2022 escape left


# --- Import ------------------------------------------------------------------------------


def test_import_sends_copies_under_the_local_mrn_and_leaves_the_archive_as_received(
        orthanc, pacs_node_for, celery_worker, received_request, cd_images, clerk):  # noqa: F811
    record_request, [request_study] = received_request(cd_images)
    study = request_study.study
    assert study.num_instances == 67
    orthanc.delete_study(study.study_instance_uid)
    before = stored_digests(study)
    assert before == {i.sop_instance_uid: i.sha256
                      for i in Instance.objects.filter(series__study=study)}
    node = pacs_node_for(orthanc)
    reconcile(request_study, clerk)

    [job] = request_import_start(record_request=record_request, node=node, by=clerk)
    finished(job)

    assert job.status == RequestImport.Status.COMPLETE, job.error
    assert (job.total, job.sent, job.failed, job.attempts) == (67, 67, 0, 1)
    assert set(job.results.values_list("status", "outcome")) == {(0, "success")}
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.IMPORTED
    assert record_request.imported_at is not None

    # C-FIND finds the study under the local MRN, and no longer under the outside one.
    found = dimse.find(node, level="STUDY", query={
        "PatientID": LOCAL_MRN, "StudyInstanceUID": None, "PatientName": None,
        "AccessionNumber": None})
    assert [str(ds.StudyInstanceUID) for ds in found] == [study.study_instance_uid]
    assert str(found[0].PatientName) == LOCAL_NAME
    assert found[0].AccessionNumber == "SAMACC77"
    assert dimse.find(node, level="STUDY", query={"PatientID": CD_PATIENT_ID,
                                                  "StudyInstanceUID": None}) == []

    # Each copy differs from the archived file in the identity only: pixel data and
    # every other element as received, the outside ID kept as an other patient ID.
    in_orthanc = orthanc.instance_ids(study.study_instance_uid)
    assert len(in_orthanc) == 67
    for instance in Instance.objects.filter(series__study=study):
        copy = dcmread(io.BytesIO(orthanc.file(in_orthanc[instance.sop_instance_uid])))
        with instance.file.open("rb") as fh:
            archived = dcmread(fh)
        assert copy.PixelData == archived.PixelData
        assert copy.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
        assert copy.PatientID == LOCAL_MRN and str(copy.PatientName) == LOCAL_NAME
        assert [(item.PatientID, item.TypeOfPatientID)
                for item in copy.OtherPatientIDsSequence] == [(CD_PATIENT_ID, "TEXT")]
        for element in archived:
            if element.keyword not in IDENTITY_KEYWORDS and element.keyword != "PixelData":
                assert copy[element.tag].value == element.value, element.keyword
    assert stored_digests(study) == before
    assert str(Study.objects.get(pk=study.pk).patient.patient_id) == CD_PATIENT_ID

    actions = list(AuditEvent.objects.filter(object_id=str(record_request.pk))
                   .values_list("action", "outcome"))
    assert ("request.import.start", "success") in actions
    assert ("request.import.finish", "success") in actions
    assert ("request.imported", "success") in actions


def test_every_transfer_syntax_is_sent_as_stored_with_only_the_identity_changed(
        orthanc, pacs_node_for,  # noqa: F811
        received_request, syntax_images, clerk, transactional_db):
    record_request, [request_study] = received_request(syntax_images)
    study = request_study.study
    orthanc.delete_study(study.study_instance_uid)
    node = pacs_node_for(orthanc)
    reconcile(request_study, clerk, local_accession_number="")

    [job] = request_import_start(record_request=record_request, node=node, by=clerk)
    assert request_import_run(import_id=job.pk) is None

    job.refresh_from_db()
    assert job.status == RequestImport.Status.COMPLETE, job.error
    assert job.identity == {"PatientID": LOCAL_MRN, "PatientName": LOCAL_NAME}
    in_orthanc = orthanc.instance_ids(study.study_instance_uid)
    syntaxes = set()
    for instance in Instance.objects.filter(series__study=study):
        orthanc_id = in_orthanc[instance.sop_instance_uid]
        # Compressed images stay compressed, in their own syntax: nothing was decoded.
        assert orthanc.transfer_syntax(orthanc_id) == instance.transfer_syntax_uid
        syntaxes.add(instance.transfer_syntax_uid)
        copy = dcmread(io.BytesIO(orthanc.file(orthanc_id)))
        with instance.file.open("rb") as fh:
            archived = dcmread(fh)
        assert copy.PixelData == archived.PixelData
        assert copy.PatientID == LOCAL_MRN
        assert copy.AccessionNumber == archived.AccessionNumber  # empty keeps it
    assert len(syntaxes) == 7


def test_an_import_into_a_pacs_that_is_down_fails_clearly_and_a_retry_delivers(
        orthanc, pacs_node_for, received_request, syntax_images, clerk, settings,  # noqa: F811
        transactional_db):
    record_request, [request_study] = received_request(syntax_images)
    orthanc.delete_study(request_study.study.study_instance_uid)
    closed_port = free_port()
    node = pacs_node_for(orthanc, port=closed_port)
    reconcile(request_study, clerk)
    [job] = request_import_start(record_request=record_request, node=node, by=clerk)

    # While attempts last, an association failure puts the job back in the queue.
    delay = request_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert delay == 30 and job.status == RequestImport.Status.QUEUED
    assert job.error == f"The PACS at 127.0.0.1:{closed_port} refused the connection"

    settings.PACS_JOB_MAX_ATTEMPTS = 2
    assert request_import_run(import_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == RequestImport.Status.FAILED
    assert job.error == f"The PACS at 127.0.0.1:{closed_port} refused the connection"
    assert job.sent == 0
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.RECEIVED
    assert AuditEvent.objects.get(action="request.import.finish").outcome == "failure"

    # The PACS is back (here: the node set right): Retry delivers everything.
    node.port = orthanc.port
    node.save()
    job = request_import_retry(request_import=job, by=clerk)
    assert job.status == RequestImport.Status.QUEUED and job.attempts == 0
    request_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert job.status == RequestImport.Status.COMPLETE, job.error
    assert (job.sent, job.failed) == (9, 0)
    assert len(orthanc.instance_ids(request_study.study.study_instance_uid)) == 9
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.IMPORTED


def test_import_waits_until_every_study_is_reconciled(
        orthanc, pacs_node_for,  # noqa: F811
        received_request, cd_images, syntax_images, clerk):
    record_request, _studies = received_request(cd_images[:2])
    extra = Upload.objects.create(request=record_request, status=Upload.Status.CONFIRMED)
    from dicomgw.services import ingest_file

    outcome = ingest_file(facility=record_request.facility, path=syntax_images[0],
                          source="upload")
    UploadedFile.objects.create(upload=extra, path="1.dcm", size=1, instance=outcome.instance,
                                outcome=UploadedFile.Outcome.STORED)
    first, second = request_studies_collect(record_request=record_request)
    node = pacs_node_for(orthanc)
    reconcile(first, clerk)
    with pytest.raises(RetrievalError, match="1 study is not reconciled yet"):
        request_import_start(record_request=record_request, node=node, by=clerk)
    assert not RequestImport.objects.exists()


def test_only_a_pacs_of_the_requesting_facility_is_accepted(
        orthanc, pacs_node_for,  # noqa: F811
        received_request, cd_images, clerk, other_facility):
    record_request, [request_study] = received_request(cd_images[:1])
    reconcile(request_study, clerk)
    theirs = pacs_node_for(orthanc, facility=other_facility)
    with pytest.raises(RetrievalError, match="Choose one of your facility's PACS"):
        request_import_start(record_request=record_request, node=theirs, by=clerk)


def test_an_imported_or_cancelled_request_cannot_be_imported_again(
        orthanc, pacs_node_for, received_request, syntax_images, cd_images, clerk,  # noqa: F811
        transactional_db):
    record_request, [request_study] = received_request(syntax_images)
    orthanc.delete_study(request_study.study.study_instance_uid)
    node = pacs_node_for(orthanc)
    reconcile(request_study, clerk)
    [job] = request_import_start(record_request=record_request, node=node, by=clerk)
    request_import_run(import_id=job.pk)
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.IMPORTED
    with pytest.raises(RetrievalError, match="imported already"):
        request_import_start(record_request=record_request, node=node, by=clerk)
    with pytest.raises(RetrievalError, match="imported already"):
        reconcile(request_study, clerk)
    with pytest.raises(RetrievalError):
        request_cancel(record_request=record_request, by=clerk)

    cancelled, [cancelled_study] = received_request(cd_images[:1])
    reconcile(cancelled_study, clerk)
    request_cancel(record_request=cancelled, by=clerk)
    with pytest.raises(RetrievalError, match="cancelled"):
        request_import_start(record_request=cancelled, node=node, by=clerk)
    assert RequestImport.objects.count() == 1


def test_a_request_stays_open_with_its_studies_a_year_later(received_request, cd_images,
                                                            clerk, settings):
    record_request, [request_study] = received_request(cd_images[:4])
    a_year_later = timezone.now() + datetime.timedelta(days=366)
    # Nothing holds the study but the request: the archive purge keeps it all the same.
    report = archive_purge(now=a_year_later)
    assert report.studies == 0
    assert Instance.objects.filter(series__study=request_study.study).count() == 4
    record_request.refresh_from_db()
    assert record_request.status == RecordRequest.Status.RECEIVED and record_request.is_open
    request_study = request_study_reconcile(
        request_study=request_study, by=clerk, local_patient_id=LOCAL_MRN,
        local_patient_name=LOCAL_NAME, now=a_year_later)
    assert request_study.reconciled_at == a_year_later

    # Once the request ends, its studies go with the ordinary retention.
    request_cancel(record_request=record_request, by=clerk, now=timezone.now())
    report = archive_purge(now=a_year_later)
    assert report.studies == 1
    assert not Study.objects.filter(pk=request_study.study_id).exists()


# --- Pages -------------------------------------------------------------------------------


def test_the_request_page_lists_received_studies_and_reconcile_previews_the_changes(
        client, clerk, received_request, cd_images):
    record_request, [request_study] = received_request(cd_images[:2])
    sign_in(client, clerk)

    page = client.get(f"/clerk/requests/{record_request.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="received-studies"' in html
    assert f"/clerk/archive/studies/{request_study.study_id}/" in html
    assert f"/clerk/requests/{record_request.pk}/studies/{request_study.pk}/reconcile/" in html

    url = f"/clerk/requests/{record_request.pk}/studies/{request_study.pk}/reconcile/"
    form = client.get(url)
    assert form.status_code == 200
    assert 'value="SAM-4471"' in form.content.decode()
    assert "古橋" in form.content.decode()

    preview = client.post(url, {"preview": "1", "local_patient_id": "L-1",
                                "family_name": "Furuhashi", "given_name": "Taichi",
                                "local_accession_number": ""}, HTTP_HX_REQUEST="true")
    assert preview.status_code == 200
    text = preview.content.decode()
    assert "(0010,0020)" in text and "L-1" in text and "Furuhashi^Taichi" in text
    request_study.refresh_from_db()
    assert not request_study.is_reconciled

    saved = client.post(url, {"local_patient_id": "L-1", "family_name": "Furuhashi",
                              "given_name": "Taichi", "local_accession_number": "A1"})
    assert saved.status_code == 302
    request_study.refresh_from_db()
    assert (request_study.local_patient_id, request_study.local_patient_name,
            request_study.local_accession_number) == ("L-1", "Furuhashi^Taichi", "A1")

    bad = client.post(url, {"local_patient_id": "", "family_name": "X^Y"})
    assert bad.status_code == 200
    assert "Leave out the characters" in bad.content.decode()


def test_import_is_started_from_the_request_page_and_shows_dimse_statuses(
        client, clerk, received_request, syntax_images, orthanc, pacs_node_for,  # noqa: F811
        transactional_db):
    record_request, [request_study] = received_request(syntax_images)
    orthanc.delete_study(request_study.study.study_instance_uid)
    node = pacs_node_for(orthanc)
    sign_in(client, clerk)
    start = f"/clerk/requests/{record_request.pk}/import/"

    refused = client.post(start, {"node": node.pk}, follow=True)
    assert "1 study is not reconciled yet" in refused.content.decode()
    reconcile(request_study, clerk)
    response = client.post(start, {"node": node.pk})
    assert response.status_code == 302
    job = RequestImport.objects.get()
    assert job.status == RequestImport.Status.QUEUED and job.total == 9
    polled = client.get(f"/clerk/requests/{record_request.pk}/studies/", HTTP_HX_REQUEST="true")
    assert 'hx-trigger="every 1s"' in polled.content.decode()

    request_import_run(import_id=job.pk)
    detail = client.get(f"/clerk/requests/{record_request.pk}/imports/{job.pk}/")
    html = detail.content.decode()
    assert detail.status_code == 200
    assert "0x0000" in html and "all 9 images" in html
    assert "every 1s" not in html


def test_another_facility_sees_nothing_of_a_request_it_did_not_make(
        client, other_facility, received_request, cd_images):
    record_request, [request_study] = received_request(cd_images[:1])
    stranger = make_staff(other_facility, "stranger")
    sign_in(client, stranger)
    for url in (f"/clerk/requests/{record_request.pk}/studies/",
                f"/clerk/requests/{record_request.pk}/studies/{request_study.pk}/reconcile/"):
        assert client.get(url).status_code == 404
    assert client.post(f"/clerk/requests/{record_request.pk}/import/").status_code == 404


def test_a_stale_import_is_queued_again_and_a_worn_out_one_failed(
        orthanc, pacs_node_for,  # noqa: F811
        received_request, cd_images, clerk, settings):
    from retrieval.imports import request_jobs_recover_stale

    record_request, [request_study] = received_request(cd_images[:1])
    reconcile(request_study, clerk)
    [job] = request_import_start(record_request=record_request, node=pacs_node_for(orthanc),
                                 by=clerk)
    long_ago = timezone.now() - datetime.timedelta(hours=1)
    RequestImport.objects.filter(pk=job.pk).update(status=RequestImport.Status.RUNNING,
                                                   attempts=1, updated_at=long_ago)
    # Another run holds it: this one does nothing until the hold counts as stale.
    RequestImport.objects.filter(pk=job.pk).update(updated_at=timezone.now())
    assert request_import_run(import_id=job.pk) > 0
    job.refresh_from_db()
    assert (job.status, job.attempts) == (RequestImport.Status.RUNNING, 1)

    RequestImport.objects.filter(pk=job.pk).update(updated_at=long_ago)
    assert request_jobs_recover_stale() == [("import", job.pk)]
    job.refresh_from_db()
    assert job.status == RequestImport.Status.QUEUED

    settings.PACS_JOB_MAX_ATTEMPTS = 1
    RequestImport.objects.filter(pk=job.pk).update(status=RequestImport.Status.RUNNING,
                                                   updated_at=long_ago)
    assert request_jobs_recover_stale() == []
    job.refresh_from_db()
    assert job.status == RequestImport.Status.FAILED
    assert "given up" in job.error
    [given_up] = AuditEvent.objects.filter(action="request.import.finish")
    assert (given_up.outcome, given_up.object_id) == ("failure", str(record_request.pk))
    assert given_up.detail == {"import": job.pk, "status": "failed", "reason": "stale",
                               "attempts": 1}
    # A finished job is left alone by a late or duplicated task message.
    assert request_import_run(import_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == RequestImport.Status.FAILED
