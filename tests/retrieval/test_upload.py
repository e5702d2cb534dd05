"""The upload portal over HTTP: a real patient CD arrives byte for byte, what is not an
image is listed with the reason, a resumed upload sends only what is missing, the
disc's DICOMDIR names what did not arrive, limits answer plainly, and the request
moves from sent to received (or declined) with every step audited."""

import datetime
import hashlib
import io
import json

import pytest
from django.test import Client
from django.utils import timezone

from dicomgw.models import Instance
from pockethealth.models import AuditEvent
from retrieval.models import RecordRequest, RequestStudy, Upload, UploadedFile
from retrieval.services import request_cancel
from retrieval.upload import (
    RetrievalError,
    SentFile,
    UploadIncomplete,
    files_receive,
    request_open_by_pin,
    upload_open,
)

from .conftest import request_patient
from .uploading import CD, DiscFile, Uploader, folder_files

JAPANESE_NAME = "ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地"
IMAGES_ON_THE_DISC = 67


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def disc(testdata_dir) -> list[DiscFile]:
    files = folder_files(testdata_dir / CD)
    assert len(files) == 249
    return files


@pytest.fixture
def made(record_request):
    """A request for the patient of the CD, as the requesting clerk makes it."""
    return record_request(patient=request_patient(name=JAPANESE_NAME,
                                                  birth_date=datetime.date(1975, 3, 29)),
                          details="MRI of the lumbar spine, January 2018")


def uploader_for(made) -> Uploader:
    uploader = Uploader(made.request.facility.short_name)
    uploader.begin(made.pin)
    return uploader


def test_the_patient_cd_arrives_byte_for_byte_and_the_rest_is_listed(made, disc, facility):
    uploader = uploader_for(made)
    outcomes = uploader.send(disc)

    dicom = [f for f in disc if f.is_dicom and not f.path.endswith("/DICOMDIR")]
    assert len(dicom) == IMAGES_ON_THE_DISC
    assert {outcomes[f.path] for f in dicom} == {"stored"}
    assert outcomes[f"{CD}/DICOMDIR"] == "skipped"
    others = [f for f in disc if not f.is_dicom]
    assert len(others) == 181 and {outcomes[f.path] for f in others} == {"skipped"}

    upload = Upload.objects.get(request=made.request)
    for disc_file in dicom:
        row = UploadedFile.objects.get(upload=upload, path=disc_file.path)
        with row.instance.file.open("rb") as fh:
            assert sha256(fh.read()) == sha256(disc_file.source.read_bytes()) == row.sha256
    assert Instance.objects.filter(facility=facility).count() == IMAGES_ON_THE_DISC
    reasons = dict(UploadedFile.objects.filter(upload=upload).values_list("path", "reason"))
    assert reasons[f"{CD}/README.TXT"] == "not DICOM: it looks like a text file"
    assert reasons[f"{CD}/AUTORUN.INF"] == "not DICOM: it looks like a text file"
    assert reasons[f"{CD}/LBLPRINT.JPG"] == "not DICOM: it looks like a JPEG picture"
    assert reasons[f"{CD}/DICOMDIR"].startswith("the disc's index (DICOMDIR), which lists 67")
    # The JPEGs, the text and the autorun file were never sent, only announced.
    assert not UploadedFile.objects.filter(upload=upload, outcome="skipped",
                                           sha256__gt="").exclude(path__endswith="DICOMDIR")

    review = uploader.client.get(f"{uploader.base}/review")
    page = review.content.decode()
    assert "ﾌﾙﾊｼ, ﾀｲﾁ (古橋, 大地)" in page
    for name in ("README.TXT", "AUTORUN.INF", "LBLPRINT.JPG", "IHE_PDI/IMAGE/D0000001.JPG"):
        assert f"{CD}/{name}" in page
    assert "T2 SAG" in page and "STIR SAG" in page
    assert "did not arrive" not in page and "These images give the date of birth" not in page

    response = uploader.client.post(f"{uploader.base}/confirm")
    assert response.status_code == 303 and response["Location"].endswith("/done")
    done = uploader.client.get(response["Location"])
    assert "Success! Your upload is processing" in done.content.decode()
    made.request.refresh_from_db()
    assert made.request.status == RecordRequest.Status.RECEIVED
    assert made.request.received_at is not None
    studies = RequestStudy.objects.filter(request=made.request)
    assert [s.study.num_instances for s in studies] == [IMAGES_ON_THE_DISC]
    confirm = AuditEvent.objects.get(action="request.upload.confirm")
    assert confirm.actor_type == AuditEvent.ActorType.UPLOAD_SESSION
    assert confirm.detail["images"] == 67 and confirm.detail["skipped"] == 182


def test_images_of_another_birth_date_are_pointed_out_before_confirming(record_request,
                                                                        disc):
    other = record_request(patient=request_patient(name=JAPANESE_NAME,
                                                   birth_date=datetime.date(1976, 1, 1)))
    uploader = uploader_for(other)
    uploader.send([f for f in disc if f.is_dicom][:3])
    page = uploader.client.get(f"{uploader.base}/review").content.decode()
    assert ("These images give the date of birth 1975/03/29, but the request is for a "
            "patient born 1976/01/01.") in page


def test_the_request_moves_from_sent_to_opened_uploading_and_received(made, disc):
    assert made.request.status == "sent"
    uploader = Uploader(made.request.facility.short_name)
    uploader.enter_pin(made.pin)
    made.request.refresh_from_db()
    assert made.request.status == "opened" and made.request.opened_at is not None
    uploader.client.post(f"{uploader.base}/start")
    uploader.send([f for f in disc if f.is_dicom][:1])
    made.request.refresh_from_db()
    assert made.request.status == "uploading"
    uploader.client.post(f"{uploader.base}/confirm")
    made.request.refresh_from_db()
    assert made.request.status == "received"
    actions = list(AuditEvent.objects.filter(object_type__startswith="retrieval")
                   .order_by("id").values_list("action", flat=True))
    assert actions[-3:] == ["request.open", "request.upload.start", "request.upload.confirm"]


def test_a_resumed_upload_sends_only_what_has_not_arrived(made, disc):
    images = [f for f in disc if f.is_dicom]  # the 67 images and the DICOMDIR
    first = Uploader(made.request.facility.short_name)
    first.begin(made.pin)
    first.send(images[:30])

    # Another browser, later, with the same PIN, the whole folder chosen again.
    second = uploader_for(made)
    answer = second.announce(disc).json()["files"]
    pending = [r["path"] for r in answer if r["outcome"] == "pending"]
    assert sorted(pending) == sorted(f.path for f in images[30:])
    sent_before = {f.path for f in images[:30]}
    assert {r["outcome"] for r in answer if r["path"] in sent_before} == {"stored"}

    # A file sent again anyway is not read or archived again.
    again = second.put(images[0].path, images[0].source.read_bytes())
    assert again.json()["outcome"] == UploadedFile.objects.get(path=images[0].path).outcome
    assert Upload.objects.filter(request=made.request).count() == 1
    assert second.send(images[30:]) and Instance.objects.count() == IMAGES_ON_THE_DISC


def test_the_disc_index_names_the_files_that_did_not_arrive(made, disc):
    uploader = uploader_for(made)
    images = [f for f in disc if f.is_dicom and not f.path.endswith("DICOMDIR")]
    uploader.send([f for f in disc if f.path.endswith("DICOMDIR")] + images[:60])
    page = uploader.client.get(f"{uploader.base}/review").content.decode()
    assert "lists 7 files that did not arrive" in page
    for missing in images[60:]:
        assert missing.path in page
    # Confirming what arrived is still possible.
    uploader.client.post(f"{uploader.base}/confirm")
    assert Upload.objects.get(request=made.request).status == Upload.Status.CONFIRMED


def test_damaged_dicom_is_listed_with_the_reason_and_not_kept(made, disc, tmp_path):
    image = next(f for f in disc if f.is_dicom and "DCMDT" in f.path)
    cut = tmp_path / "CUT"
    cut.write_bytes(image.source.read_bytes()[:200_000])
    uploader = uploader_for(made)
    outcomes = uploader.send([DiscFile("DISC/DCMDT/CUT", cut)])
    assert outcomes == {"DISC/DCMDT/CUT": "invalid"}
    row = UploadedFile.objects.get(path="DISC/DCMDT/CUT")
    assert "incomplete or damaged" in row.reason and row.instance is None
    assert not Instance.objects.exists()
    page = uploader.client.get(f"{uploader.base}/review").content.decode()
    assert "DISC/DCMDT/CUT" in page and "incomplete or damaged" in page
    # Nothing to confirm.
    response = uploader.client.post(f"{uploader.base}/confirm", follow=True)
    assert "No DICOM images have arrived yet" in response.content.decode()


def test_a_body_cut_short_is_not_kept_and_the_file_stays_to_send(made, disc):
    image = next(f for f in disc if f.is_dicom and "DCMDT" in f.path)
    uploader = uploader_for(made)
    uploader.announce([image])
    data = image.source.read_bytes()
    with pytest.raises(UploadIncomplete):
        files_receive(record_request=made.request, files=[SentFile(image.path, len(data))],
                      stream=io.BytesIO(data[:100_000]), now=timezone.now())
    row = UploadedFile.objects.get(path=image.path)
    assert row.outcome == "pending" and row.instance is None
    assert not Instance.objects.exists()
    assert uploader.put(image.path, data).json()["outcome"] == "stored"


def test_a_request_of_several_files_settles_each_and_refuses_only_the_wrong_ones(made, disc):
    """Files not announced, changed since, or settled before are answered each on its
    own, their bytes read past: every file after them arrives whole."""
    images = sorted((f for f in disc if f.is_dicom and "DCMDT" in f.path),
                    key=lambda f: f.path)[:6]
    uploader = uploader_for(made)
    uploader.announce(images[1:])
    assert uploader.send(images[1:2]) == {images[1].path: "stored"}
    data = {f.path: f.source.read_bytes() for f in images}
    response = uploader.batch([
        (images[0].path, data[images[0].path]),            # not announced
        (images[1].path, data[images[1].path]),            # settled before
        (images[2].path, data[images[2].path]),
        (images[3].path, data[images[3].path][:-2]),       # changed since
        (images[4].path, data[images[4].path]),
        ("DISC/README.TXT", b"not announced either"),
        (images[5].path, data[images[5].path]),
    ])
    assert response.status_code == 200
    answers = response.json()["files"]
    assert "not announced" in answers[0]["error"] and "not announced" in answers[5]["error"]
    assert "changed" in answers[3]["error"]
    assert [answers[i]["outcome"] for i in (1, 2, 4, 6)] == ["stored"] * 4
    for image in (images[1], images[2], images[4], images[5]):
        row = UploadedFile.objects.get(path=image.path)
        assert row.outcome == "stored" and row.received_at is not None
        with row.instance.file.open("rb") as fh:
            assert fh.read()[128:] == data[image.path][128:]
    assert UploadedFile.objects.get(path=images[3].path).outcome == "pending"
    assert Instance.objects.count() == 4


def test_a_request_of_several_files_cut_short_keeps_the_files_that_arrived(made, disc):
    images = [f for f in disc if f.is_dicom and "DCMDT" in f.path][:3]
    uploader = uploader_for(made)
    uploader.announce(images)
    data = [f.source.read_bytes() for f in images]
    body = data[0] + data[1] + data[2][:5000]
    with pytest.raises(UploadIncomplete):
        files_receive(record_request=made.request,
                      files=[SentFile(f.path, len(d)) for f, d in zip(images, data, strict=True)],
                      stream=io.BytesIO(body), now=timezone.now())
    outcomes = {row.path: row.outcome for row in UploadedFile.objects.all()}
    assert outcomes == {images[0].path: "stored", images[1].path: "stored",
                        images[2].path: "pending"}
    assert Instance.objects.count() == 2
    assert uploader.send(images) == {images[0].path: "stored", images[1].path: "stored",
                                     images[2].path: "stored"}


@pytest.mark.parametrize("case", ["unreadable", "too long", "too short", "lengths", "many"])
def test_a_request_of_several_files_with_a_wrong_manifest_stores_nothing(made, disc,
                                                                         settings, case):
    settings.UPLOAD_BATCH_FILES = 3
    images = [f for f in disc if f.is_dicom and "DCMDT" in f.path][:4]
    uploader = uploader_for(made)
    uploader.announce(images)
    files = [(f.path, f.source.read_bytes()) for f in images[:2]]
    if case == "unreadable":
        response = uploader.batch(files, manifest=b"{not json")
    elif case == "too long":
        response = uploader.batch(files, length=10**9)
    elif case == "too short":
        response = uploader.batch(files, length=0)
    elif case == "lengths":
        manifest = json.dumps({"files": [{"path": p, "size": len(d) + 1}
                                         for p, d in files]}).encode()
        response = uploader.batch(files, manifest=manifest)
    else:
        response = uploader.batch([(f.path, f.source.read_bytes()) for f in images])
    assert response.status_code == 400
    assert response.json()["error"] == "The list of files sent could not be read."
    assert not Instance.objects.exists()
    assert set(UploadedFile.objects.values_list("outcome", flat=True)) == {"pending"}


def test_files_not_announced_or_changed_since_are_refused(made, disc):
    image = next(f for f in disc if f.is_dicom and "DCMDT" in f.path)
    uploader = uploader_for(made)
    response = uploader.put(image.path, image.source.read_bytes())
    assert response.status_code == 409 and "not announced" in response.json()["error"]
    uploader.announce([image])
    response = uploader.put(image.path, image.source.read_bytes()[:-2])
    assert response.status_code == 409 and "changed" in response.json()["error"]


def test_limits_answer_plainly(made, disc, settings):
    settings.UPLOAD_MAX_FILES = 100
    uploader = uploader_for(made)
    response = uploader.announce(disc[:10], total_files=249)
    assert response.status_code == 413
    assert response.json()["error"].startswith("One upload takes at most 100 files, and this "
                                               "folder holds 249.")
    assert not UploadedFile.objects.exists()

    settings.UPLOAD_MAX_FILE_BYTES = 500_000
    images = [f for f in disc if f.is_dicom and "DCMDT" in f.path][:2]
    answer = uploader.announce(images).json()["files"]
    assert [r["outcome"] for r in answer] == ["refused", "refused"]
    assert answer[0]["reason"] == "it is larger than the 488.3\xa0KB allowed for one file"


def test_the_upload_page_holds_the_script_and_its_settings(made):
    uploader = uploader_for(made)
    page = uploader.client.get(f"{uploader.base}/files").content.decode()
    assert "webkitdirectory" in page and "retrieval/upload.js" in page
    assert '"parallel": 4' in page and '"batch": 1000' in page


def test_the_uploader_sees_only_their_request(made, record_request, facility, other_facility,
                                              other_clerk, disc):
    uploader = uploader_for(made)
    other = record_request(facility=other_facility, created_by=other_clerk)
    # The session opened for one request does not open another facility's portal.
    response = uploader.client.get(f"/upload/{other_facility.short_name}/request")
    assert response.status_code == 303
    assert response["Location"] == f"/upload/{other_facility.short_name}"
    response = uploader.client.post(f"/upload/{other_facility.short_name}/announce",
                                    content_type="application/json",
                                    headers={"Accept": "application/json"}, data={"files": []})
    assert response.status_code == 401
    page = uploader.client.get(f"{uploader.base}/request").content.decode()
    assert "ﾌﾙﾊｼ, ﾀｲﾁ (古橋, 大地)" in page and "1975/03/29" in page
    assert "MRI of the lumbar spine, January 2018" in page
    assert made.request.patient_mrn not in page and other.request.patient_name not in page

    stranger = Client()
    response = stranger.put(f"{uploader.base}/file", data=b"x",
                            content_type="application/octet-stream",
                            headers={"X-Upload-Path": "a", "Accept": "application/json"})
    assert response.status_code == 401


def test_the_session_has_its_own_cookie_under_upload(made):
    client = Client()
    response = client.post(f"/upload/{made.request.facility.short_name}", {"pin": made.pin})
    cookie = response.cookies["upload_session"]
    assert cookie["path"] == "/upload" and cookie["httponly"] and cookie["samesite"] == "Lax"
    assert "sessionid" not in response.cookies
    assert response["Cache-Control"] == "no-store"


def test_the_link_of_the_qr_code_opens_the_request_and_leaves_the_address_bar(made):
    client = Client()
    base = f"/upload/{made.request.facility.short_name}"
    response = client.get(f"{base}?t={made.link_token}")
    assert response.status_code == 303 and response["Location"] == f"{base}/request"
    assert AuditEvent.objects.get(action="request.open").detail == {"via": "link"}

    wrong = Client().get(f"{base}?t=not-the-token", follow=True)
    assert "That link does not open a request here" in wrong.content.decode()
    assert AuditEvent.objects.filter(action="retrieval.link.failed").count() == 1


def test_a_closed_request_says_so_to_a_link_and_ends_a_session(made, clerk, disc):
    uploader = uploader_for(made)
    uploader.announce(disc[:3])
    request_cancel(record_request=made.request, by=clerk)
    response = uploader.put(disc[0].path, disc[0].source.read_bytes())
    assert response.status_code == 401
    assert "cancelled this request" in response.json()["error"]
    page = Client().get(f"{uploader.base}?t={made.link_token}")
    assert page.status_code == 410 and "This request is closed" in page.content.decode()
    # The PIN of a closed request is just a wrong PIN.
    assert Uploader(made.request.facility.short_name).enter_pin(made.pin).status_code == 403


def test_declining_needs_a_reason_and_ends_the_request(made, disc):
    uploader = uploader_for(made)
    uploader.send([f for f in disc if f.is_dicom][:2])
    response = uploader.client.post(f"{uploader.base}/decline", {"choice": "other", "note": ""})
    assert response.status_code == 400
    assert "Say why the records cannot be sent." in response.content.decode()

    response = uploader.client.post(f"{uploader.base}/decline",
                                    {"choice": "No records for this patient", "note": ""})
    assert response.status_code == 303 and response["Location"].endswith("/declined")
    thanks = uploader.client.get(response["Location"]).content.decode()
    assert "St. Anthony&#x27;s Memorial Hospital has been told" in thanks
    made.request.refresh_from_db()
    assert made.request.status == "declined"
    assert made.request.decline_reason == "No records for this patient"
    assert Upload.objects.get(request=made.request).status == Upload.Status.ABANDONED
    event = AuditEvent.objects.get(action="request.decline")
    assert event.actor_type == AuditEvent.ActorType.UPLOAD_SESSION
    # The session is over; the PIN no longer opens anything.
    assert uploader.client.get(f"{uploader.base}/request").status_code == 303
    assert Uploader(made.request.facility.short_name).enter_pin(made.pin).status_code == 403


def test_a_request_confirmed_cannot_be_declined_but_takes_more_files(made, disc):
    uploader = uploader_for(made)
    images = [f for f in disc if f.is_dicom and "DCMDT" in f.path]
    uploader.send(images[:5])
    uploader.client.post(f"{uploader.base}/confirm")
    response = uploader.client.post(f"{uploader.base}/decline",
                                    {"choice": "No records for this patient"})
    assert "can no longer be declined" in response.content.decode()
    uploader.client.post(f"{uploader.base}/start")
    uploader.send(images[5:8])
    uploader.client.post(f"{uploader.base}/confirm")
    assert list(Upload.objects.filter(request=made.request).values_list("status", flat=True)
                ) == ["confirmed", "confirmed"]
    assert RequestStudy.objects.get(request=made.request).study.num_instances == 8


def test_a_request_still_opens_a_year_later(made):
    later = timezone.now() + datetime.timedelta(days=366)
    opened = request_open_by_pin(facility=made.request.facility, pin=made.pin,
                                 address="192.0.2.10", now=later)
    assert opened.pk == made.request.pk and opened.is_open
    upload = upload_open(record_request=opened, address="192.0.2.10", now=later)
    assert upload.status == Upload.Status.OPEN


def test_a_file_of_a_finished_upload_is_refused(made, disc):
    uploader = uploader_for(made)
    uploader.send([f for f in disc if f.is_dicom][:2])
    Upload.objects.filter(request=made.request).update(status=Upload.Status.CONFIRMED)
    with pytest.raises(RetrievalError, match="This upload is finished"):
        files_receive(record_request=made.request, files=[SentFile(uploader.base, 1)],
                      stream=io.BytesIO(b"x"), now=timezone.now())
