"""The DICOMweb endpoints the viewer reads (PS3.18): searches, metadata, instances,
frames and bulk data, for a recipient's session (/view/dicomweb) and a clerk
(/clerk/dicomweb); nothing outside the visitor's scope, in any form."""

import datetime
import io
import re
from importlib import import_module
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from django.conf import settings
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.uid import generate_uid

import sharing.recipient_views as recipient_views
import viewer.services as viewer_services
from dicomgw.models import Instance, Study
from pockethealth.models import AuditEvent
from sharing.services import share_revoke
from tests.conftest import make_staff, sign_in
from viewer.scopes import CLERK, RECIPIENT, dicomweb_root

from .conftest import (
    ADA,
    archive,
    ct_slices,
    live_session,
    recipient_cookie,
    stored_bytes,
    unlocked,
)

VIEW = "/view/dicomweb"
CLERK_ROOT = "/clerk/dicomweb"
# What OHIF's image loader (cornerstone's WADO-RS loader) sends for every frame.
OHIF_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def multipart(response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer (RFC 2046 5.1.1),
    from Django's test client or from requests."""
    headers = response.headers
    boundary = re.search(r"boundary=([^;\s]+)", headers["Content-Type"]).group(1).encode()
    streaming = getattr(response, "streaming", False)
    body = b"".join(response.streaming_content) if streaming else response.content
    assert int(headers["Content-Length"]) == len(body)
    closing = b"--" + boundary + b"--\r\n"
    assert body.endswith(closing)
    parts = []
    for chunk in body[:-len(closing)].split(b"--" + boundary + b"\r\n")[1:]:
        head, _sep, data = chunk.partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        content_type = head.decode().removeprefix("Content-Type: ")
        parts.append((content_type, data[:-2]))
    return parts


def series_of(study: Study):
    return study.series.get()


def instance_path(root: str, instance: Instance) -> str:
    series = instance.series
    return (f"{root}/studies/{series.study.study_instance_uid}/series/"
            f"{series.series_instance_uid}/instances/{instance.sop_instance_uid}")


def every_url(root: str, study: str, series: str, sop: str) -> list[str]:
    instance = f"{root}/studies/{study}/series/{series}/instances/{sop}"
    return [
        f"{root}/studies/{study}", f"{root}/studies/{study}/metadata",
        f"{root}/studies/{study}/series", f"{root}/studies/{study}/instances",
        f"{root}/studies/{study}/series/{series}",
        f"{root}/studies/{study}/series/{series}/metadata",
        f"{root}/studies/{study}/series/{series}/instances",
        instance, f"{instance}/metadata", f"{instance}/frames/1",
        f"{instance}/bulkdata/7FE00010",
    ]


def comparable(response) -> tuple:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    headers = {k.lower(): v for k, v in response.headers.items()}
    return response.status_code, body, headers


def native_frame(path, number: int) -> bytes:
    ds = dcmread(path)
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return ds.PixelData[(number - 1) * size:number * size]


# --- The recipient's scope --------------------------------------------------------------


def test_a_recipient_reads_the_share_with_dicomweb_client(live_server, ada_share, ada_archive,
                                                          recipient):
    session = live_session(settings.RECIPIENT_SESSION_COOKIE_NAME, recipient_cookie(recipient))
    client = DICOMwebClient(f"{live_server.url}{VIEW}", session=session)

    found = client.search_for_studies()
    assert {s["0020000D"]["Value"][0] for s in found} == {
        ada_archive.ct.study_instance_uid, ada_archive.mr.study_instance_uid}
    # The viewer looking for the patient's other studies finds the shared ones only.
    by_patient = client.search_for_studies(search_filters={"PatientID": ADA["PatientID"]})
    assert len(by_patient) == 2

    ct = ada_archive.ct
    series = series_of(ct)
    [found_series] = client.search_for_series(ct.study_instance_uid)
    assert found_series["0020000E"]["Value"] == [series.series_instance_uid]
    assert found_series["00201209"]["Value"] == [3]
    instances = client.search_for_instances(ct.study_instance_uid, series.series_instance_uid)
    assert len(instances) == 3

    metadata = client.retrieve_series_metadata(ct.study_instance_uid, series.series_instance_uid)
    assert len(metadata) == 3
    first = next(m for m in metadata if m["00200013"]["Value"] == [1])
    instance = Instance.objects.get(sop_instance_uid=first["00080018"]["Value"][0])
    assert first["00100010"]["Value"] == [{"Alphabetic": "LOVELACE^ADA"}]
    assert first["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    # Absolute, on the host the client named (dicomweb-client sends Host without the port).
    assert first["7FE00010"] == {
        "vr": "OW",
        "BulkDataURI": f"http://localhost{instance_path(VIEW, instance)}/bulkdata/7FE00010"}
    [as_named] = session.get(f"{live_server.url}{instance_path(VIEW, instance)}/metadata").json()
    assert as_named["7FE00010"]["BulkDataURI"] == (
        f"{live_server.url}{instance_path(VIEW, instance)}/bulkdata/7FE00010")

    retrieved = client.retrieve_instance(ct.study_instance_uid, series.series_instance_uid,
                                         instance.sop_instance_uid)
    assert retrieved.SOPInstanceUID == instance.sop_instance_uid
    raw = session.get(f"{live_server.url}{instance_path(VIEW, instance)}",
                      headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert raw.headers["Cache-Control"] == "no-store"
    assert multipart(raw) == [("application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                               stored_bytes(instance))]

    [frame] = client.retrieve_instance_frames(
        ct.study_instance_uid, series.series_instance_uid, instance.sop_instance_uid, [1],
        media_types=(("application/octet-stream", "*"),))
    assert frame == dcmread(instance.file.path).PixelData

    mr = ada_archive.mr
    mr_instance = Instance.objects.get(series__study=mr)
    frames = client.retrieve_instance_frames(
        mr.study_instance_uid, series_of(mr).series_instance_uid, mr_instance.sop_instance_uid,
        [1, 10, 3], media_types=(("application/octet-stream", "*"),))
    stored_frames = list(generate_frames(dcmread(mr_instance.file.path).PixelData,
                                         number_of_frames=10))
    assert frames == [stored_frames[0], stored_frames[9], stored_frames[2]]


def test_the_exact_frame_request_of_ohif_gets_the_stored_jpeg_ls_frame(recipient, ada_archive):
    instance = Instance.objects.get(series__study=ada_archive.mr)
    response = recipient.get(f"{instance_path(VIEW, instance)}/frames/4",
                             HTTP_ACCEPT=OHIF_FRAMES_ACCEPT)
    assert response.status_code == 200
    assert response["Content-Type"].startswith('multipart/related; type="image/jls"')
    [(content_type, data)] = multipart(response)
    # cornerstone reads the transfer syntax from the part's Content-Type.
    assert content_type == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    expected = list(generate_frames(dcmread(instance.file.path).PixelData,
                                    number_of_frames=10))[3]
    assert data == expected


def test_a_recipient_gets_nothing_of_another_share_and_cannot_tell_it_exists(
        recipient, ada_archive, charles_share):
    """Every URL with the UIDs of Charles's study (same facility, another share) and of
    Ada's unshared study answers exactly as URLs with UIDs that exist nowhere."""
    leaks = []
    for foreign in (ada_archive.charles, ada_archive.old):
        series = series_of(foreign)
        sop = series.instances.first().sop_instance_uid
        urls = every_url(VIEW, foreign.study_instance_uid, series.series_instance_uid, sop)
        ghosts = every_url(VIEW, generate_uid(), generate_uid(), generate_uid())
        for url, ghost in zip(urls, ghosts, strict=True):
            answer, nothing = comparable(recipient.get(url)), comparable(recipient.get(ghost))
            if answer[0] not in (200, 404) or (answer[0] == 200 and answer[1] != b"[]"):
                leaks.append(url)
            if answer != nothing:
                leaks.append(f"{url} differs from a UID that does not exist")
    for query in (f"PatientID={ada_archive.charles.patient.patient_id}",
                  "PatientName=BABBAGE*",
                  f"StudyInstanceUID={ada_archive.charles.study_instance_uid}",
                  f"StudyInstanceUID={ada_archive.old.study_instance_uid}",
                  "AccessionNumber=B-1", "StudyDate=20190101-20191231",
                  "ModalitiesInStudy=MR&StudyDescription=MR%20BRAIN"):
        for path in ("studies", "series", "instances"):
            response = recipient.get(f"{VIEW}/{path}?{query}")
            if response.status_code != 200 or response.content != b"[]":
                leaks.append(f"{path}?{query}")
    shared = {ada_archive.ct.study_instance_uid, ada_archive.mr.study_instance_uid}
    every_series = recipient.get(f"{VIEW}/series").json()
    every_instance = recipient.get(f"{VIEW}/instances").json()
    assert {s["0020000D"]["Value"][0] for s in every_series + every_instance} == shared
    assert leaks == []


def test_without_a_session_every_url_answers_401_as_json_and_never_redirects(
        ada_archive, clerk):
    study = ada_archive.ct
    series = series_of(study)
    sop = series.instances.first().sop_instance_uid
    anonymous = Client()
    password_only = Client()
    response = password_only.post("/account/login/", {"username": clerk.username,
                                                      "password": "correct-horse-battery-staple"})
    assert response.status_code == 302
    for root, visitor in ((VIEW, anonymous), (CLERK_ROOT, anonymous),
                          (CLERK_ROOT, password_only)):
        for url in [*every_url(root, study.study_instance_uid, series.series_instance_uid,
                               sop), f"{root}/studies", f"{root}/series"]:
            response = visitor.get(url)
            assert response.status_code == 401, url
            assert response["Content-Type"] == "application/json"
            assert "error" in response.json()
            assert b"LOVELACE" not in response.content


def test_an_ended_session_answers_401_and_frames_never_write_the_session(
        monkeypatch, ada_share, ada_archive):
    now = timezone.now()
    monkeypatch.setattr(recipient_views, "_now", lambda: now)
    client = unlocked(Client(), ada_share.code, "1981/08/29")
    key = recipient_cookie(client)
    instance = Instance.objects.get(series__study=ada_archive.mr)
    url = f"{instance_path(VIEW, instance)}/frames/"
    engine = import_module(settings.RECIPIENT_SESSION_ENGINE)
    before = engine.SessionStore(key).load()

    for second in range(0, 50):
        moment = now + datetime.timedelta(seconds=second)
        monkeypatch.setattr(recipient_views, "_now", lambda moment=moment: moment)
        response = client.get(url + str(second % 10 + 1), HTTP_ACCEPT=OHIF_FRAMES_ACCEPT)
        assert response.status_code == 200
        assert settings.RECIPIENT_SESSION_COOKIE_NAME not in response.cookies
    assert engine.SessionStore(key).load() == before

    later = now + datetime.timedelta(seconds=recipient_views.SEEN_GRANULARITY + 5)
    monkeypatch.setattr(recipient_views, "_now", lambda: later)
    assert client.get(url + "1", HTTP_ACCEPT=OHIF_FRAMES_ACCEPT).status_code == 200
    assert engine.SessionStore(key).load()["seen"] == later.timestamp()

    idle = later + datetime.timedelta(seconds=settings.RECIPIENT_SESSION_IDLE_SECONDS)
    monkeypatch.setattr(recipient_views, "_now", lambda: idle)
    response = client.get(url + "1", HTTP_ACCEPT=OHIF_FRAMES_ACCEPT)
    assert response.status_code == 401 and response["Cache-Control"] == "no-store"
    # The inbox then says why, as for any ended session.
    assert "without activity" in client.get("/view").content.decode()


def test_frames_after_the_metadata_do_not_look_instances_up_again_but_the_share_is(
        recipient, ada_share, ada_archive, facility, clerk):
    """A viewer reads a series' metadata, then asks for every frame: the instances it
    found come from the cache (no query on the archive index), while the share is checked
    every time, so a revoked share ends at once; an image not found yet is found as soon
    as it arrives."""
    ct = ada_archive.ct
    series = series_of(ct)
    metadata = recipient.get(f"{VIEW}/studies/{ct.study_instance_uid}/series/"
                             f"{series.series_instance_uid}/metadata")
    assert len(metadata.json()) == 3
    for instance in series.instances.all():
        url = f"{instance_path(VIEW, instance)}/frames/1"
        with CaptureQueriesContext(connection) as frame_queries:
            response = recipient.get(url, HTTP_ACCEPT=OHIF_FRAMES_ACCEPT)
        assert response.status_code == 200
        assert multipart(response) == [
            ("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
             native_frame(instance.file.path, 1))]
        tables = " ".join(query["sql"] for query in frame_queries.captured_queries)
        assert "sharing_share" in tables and "dicomgw_instance" not in tables

    [late] = ct_slices(study_uid=ct.study_instance_uid, count=1, who=ADA)
    late_sop = dcmread(io.BytesIO(late)).SOPInstanceUID
    late_series = dcmread(io.BytesIO(late)).SeriesInstanceUID
    late_url = (f"{VIEW}/studies/{ct.study_instance_uid}/series/{late_series}/instances/"
                f"{late_sop}/frames/1")
    assert recipient.get(late_url, HTTP_ACCEPT=OHIF_FRAMES_ACCEPT).status_code == 404
    archive(facility, [late])
    assert recipient.get(late_url, HTTP_ACCEPT=OHIF_FRAMES_ACCEPT).status_code == 200

    share_revoke(share=ada_share.share, by=clerk)
    for address in (url, late_url):
        response = recipient.get(address, HTTP_ACCEPT=OHIF_FRAMES_ACCEPT)
        assert response.status_code == 401 and b"LOVELACE" not in response.content


# --- The clerk's scope --------------------------------------------------------------------


def test_a_clerk_sees_the_whole_facility_archive_and_nothing_of_another(
        ada_archive, clerk_client, other_facility):
    other = make_staff(other_facility, "elsewhere")
    elsewhere = Client()
    sign_in(elsewhere, other)
    theirs = archive(other_facility, [get_testdata_file("CT_small.dcm")])[0]

    mine = clerk_client.get(f"{CLERK_ROOT}/studies")
    assert mine.status_code == 200 and mine["Cache-Control"] == "private"
    assert len(mine.json()) == 4
    assert clerk_client.get(f"{CLERK_ROOT}/studies?PatientName=babbage*").json()[0][
        "00100020"]["Value"] == ["SMH-1791"]

    seen_there = elsewhere.get(f"{CLERK_ROOT}/studies").json()
    assert [s["0020000D"]["Value"][0] for s in seen_there] == [
        theirs.series.study.study_instance_uid]
    for study in (ada_archive.ct, ada_archive.charles):
        series = series_of(study)
        urls = every_url(CLERK_ROOT, study.study_instance_uid, series.series_instance_uid,
                         series.instances.first().sop_instance_uid)
        for url in urls:
            response = elsewhere.get(url)
            assert response.status_code in (200, 404), url
            if response.status_code == 200:
                assert response.content == b"[]", url
    assert clerk_client.get(instance_path(CLERK_ROOT, theirs) + "/metadata").status_code == 404


TESTDATA = Path(settings.TESTDATA_DICOM_DIR)
FRAME_FILES = [
    TESTDATA / "transfer_syntaxes_siemens_trio/1.dcm",  # Explicit VR Little Endian
    TESTDATA / "transfer_syntaxes_siemens_trio/4.dcm",  # RLE
    TESTDATA / "transfer_syntaxes_siemens_trio/5.dcm",  # JPEG Lossless SV1
    TESTDATA / "transfer_syntaxes_siemens_trio/7.dcm",  # JPEG-LS
    TESTDATA / "transfer_syntaxes_siemens_trio/9.dcm",  # JPEG 2000 lossless
    TESTDATA / "encapsulation_variants/multi-frame/CT0012.fragmented_no_bot_jpeg_ls.80.dcm",
    TESTDATA / "encapsulation_variants/multi-frame/IM00001.fragmented_no_bot_jpeg_baseline.50.dcm",
    TESTDATA / "encapsulation_variants/single-frame/CT1_UNC.fragmented_bot_jpeg_ls.80.dcm",
    TESTDATA / "private_tags_agfa_renaming/Siemens/011-0001.img",  # 25 native frames
    get_testdata_file("emri_small_jpeg_ls_lossless.dcm"),
    get_testdata_file("MR_small_jp2klossless.dcm"),
    get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"),
    TESTDATA / "encapsulation_variants/deflate/image_dfl",
]
MEDIA_TYPES = {"1.2.840.10008.1.2.5": "image/dicom-rle", "1.2.840.10008.1.2.4.70": "image/jpeg",
               "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.80": "image/jls",
               "1.2.840.10008.1.2.4.90": "image/jp2"}


def stored_frames(path) -> list[bytes]:
    """The frames of a stored file as a full read with pydicom finds them."""
    ds = dcmread(path)
    count = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(count)]


def test_every_frame_leaves_as_stored_whatever_the_transfer_syntax(live_server, facility,
                                                                   clerk_session):
    instances = archive(facility, FRAME_FILES)
    client = DICOMwebClient(f"{live_server.url}{CLERK_ROOT}", session=clerk_session)
    checked = 0
    for instance in instances:
        series = instance.series
        expected = stored_frames(instance.file.path)
        assert len(expected) == instance.number_of_frames
        numbers = list(range(1, instance.number_of_frames + 1))
        got = client.retrieve_instance_frames(
            series.study.study_instance_uid, series.series_instance_uid,
            instance.sop_instance_uid, numbers, media_types=(("application/octet-stream", "*"),))
        assert got == expected, instance.transfer_syntax_uid
        checked += len(got)
        response = clerk_session.get(f"{live_server.url}{instance_path(CLERK_ROOT, instance)}"
                                     "/frames/1", headers={"Accept": OHIF_FRAMES_ACCEPT})
        assert response.headers["Cache-Control"] == "private"
        media_type = MEDIA_TYPES.get(instance.transfer_syntax_uid, "application/octet-stream")
        syntax = (instance.transfer_syntax_uid if media_type != "application/octet-stream"
                  else "1.2.840.10008.1.2.1")
        assert f"Content-Type: {media_type}; transfer-syntax={syntax}\r\n".encode() in (
            response.content)
    assert checked == 1 + 1 + 1 + 1 + 1 + 2 + 8 + 1 + 25 + 10 + 1 + 1 + 1


def test_a_single_frame_fragmented_without_offset_table_is_all_its_fragments(
        facility, clerk_client):
    path = TESTDATA / "encapsulation_variants/single-frame/CT1_UNC.fragmented_no_bot_jpeg_ls.80.dcm"
    [instance] = archive(facility, [path])
    fragments = list(generate_fragments(dcmread(path).PixelData))
    assert len(fragments) > 1
    response = clerk_client.get(f"{instance_path(CLERK_ROOT, instance)}/frames/1",
                                HTTP_ACCEPT="multipart/related; type=image/jls")
    [(_type, data)] = multipart(response)
    assert data == b"".join(fragments)


def test_big_endian_frames_are_sent_little_endian(facility, clerk_client):
    little, big = archive(facility, [TESTDATA / "transfer_syntaxes_siemens_trio/1.dcm",
                                     TESTDATA / "transfer_syntaxes_siemens_trio/3.dcm"])
    assert big.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    response = clerk_client.get(f"{instance_path(CLERK_ROOT, big)}/frames/1")
    [(content_type, data)] = multipart(response)
    assert content_type == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert data == native_frame(little.file.path, 1)


def test_instances_leave_byte_for_byte_at_every_level(recipient, ada_archive):
    study = ada_archive.ct
    response = recipient.get(f"{VIEW}/studies/{study.study_instance_uid}")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    assert response["Content-Type"].startswith('multipart/related; type="application/dicom"')
    parts = multipart(response)
    stored = {stored_bytes(i) for i in Instance.objects.filter(series__study=study)}
    assert {data for _type, data in parts} == stored and len(parts) == 3
    assert {t for t, _data in parts} == {
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}
    instance = Instance.objects.get(series__study=ada_archive.mr)
    single = recipient.get(instance_path(VIEW, instance), HTTP_ACCEPT="application/dicom")
    assert single["Content-Type"] == "application/dicom"
    assert b"".join(single.streaming_content) == stored_bytes(instance)


# --- Content negotiation --------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "status"), [
    (OHIF_FRAMES_ACCEPT, 200),
    ('multipart/related; type="image/jls"', 200),
    ("multipart/related; type=image/jls; transfer-syntax=1.2.840.10008.1.2.4.80", 200),
    ('multipart/related; type="*/*"', 200),
    ("*/*", 200),
    ("image/jls", 200),  # one frame: a single part
    # Uncompressed frames are not made of compressed ones.
    ('multipart/related; type="application/octet-stream"', 406),
    ("multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
     406),
    ("multipart/related; type=image/jp2", 406),
    ("image/jls;q=0, application/octet-stream", 406),
])
def test_frames_honour_accept(recipient, ada_archive, accept, status):
    instance = Instance.objects.get(series__study=ada_archive.mr)
    response = recipient.get(f"{instance_path(VIEW, instance)}/frames/2", HTTP_ACCEPT=accept)
    assert response.status_code == status, response.content[:200]
    if status == 406:
        assert response["Cache-Control"] == "no-store" and "error" in response.json()


def test_other_answers_honour_accept_and_say_what_is_wrong(recipient, ada_archive):
    ct = Instance.objects.filter(series__study=ada_archive.ct).first()
    study = ada_archive.ct.study_instance_uid
    assert recipient.get(f"{VIEW}/studies/{study}/metadata",
                         HTTP_ACCEPT='multipart/related; type="application/dicom+xml"'
                         ).status_code == 406
    assert recipient.get(f"{VIEW}/studies", HTTP_ACCEPT="application/json").status_code == 200
    assert recipient.get(f"{VIEW}/studies", HTTP_ACCEPT="text/html").status_code == 406
    dicom = 'multipart/related; type="application/dicom"; transfer-syntax='
    jpeg_2000, as_stored = dicom + "1.2.840.10008.1.2.4.90", dicom + "1.2.840.10008.1.2.1"
    assert recipient.get(instance_path(VIEW, ct), HTTP_ACCEPT=jpeg_2000).status_code == 406
    assert recipient.get(instance_path(VIEW, ct), HTTP_ACCEPT=as_stored).status_code == 200
    assert recipient.get(f"{instance_path(VIEW, ct)}/frames/0").status_code == 400
    assert recipient.get(f"{instance_path(VIEW, ct)}/frames/1,x").status_code == 400
    assert recipient.get(f"{instance_path(VIEW, ct)}/frames/2").status_code == 404
    assert recipient.post(f"{VIEW}/studies").status_code == 405


# --- Search ------------------------------------------------------------------------------------


def uids(response) -> set[str]:
    assert response.status_code == 200, response.content[:300]
    return {item["0020000D"]["Value"][0] for item in response.json()}


def test_studies_are_matched_as_ps3_4_says(ada_archive, clerk_client):
    ct, mr, old, charles = (ada_archive.ct.study_instance_uid, ada_archive.mr.study_instance_uid,
                            ada_archive.old.study_instance_uid,
                            ada_archive.charles.study_instance_uid)

    def search(query: str) -> set[str]:
        return uids(clerk_client.get(f"{CLERK_ROOT}/studies?{query}"))

    assert search("PatientName=lovelace*") == {ct, mr, old}
    assert search("PatientName=*ADA") == {ct, mr, old}
    assert search("PatientName=LOVELACE^AD?") == {ct, mr, old}
    assert search("PatientName=LOVELACE") == set()
    assert search("00100020=SMH-1791") == {charles}
    assert search("PatientID=SMH-18*") == {ct, mr, old}
    assert search("StudyDate=20240102") == {ct, charles}
    assert search("StudyDate=20200101-20231231") == {mr}
    assert search("StudyDate=-20200101") == {old}
    assert search("StudyDate=20230101-") == {ct, mr, charles}
    assert search("ModalitiesInStudy=MR") == {mr, old}
    assert search("ModalitiesInStudy=MR,CT") == {ct, mr, old, charles}
    assert search("AccessionNumber=A-2") == {mr}
    assert search(f"StudyInstanceUID={ct},{charles}") == {ct, charles}
    assert search("StudyDescription=mr*&fuzzymatching=true") == {mr, old}
    assert search("StudyDescription=mr*") == set()
    assert search("PatientName=&includefield=all") == {ct, mr, old, charles}

    newest_first = clerk_client.get(f"{CLERK_ROOT}/studies?limit=2").json()
    assert [s["0020000D"]["Value"][0] for s in newest_first] in ([ct, charles], [charles, ct])
    assert uids(clerk_client.get(f"{CLERK_ROOT}/studies?offset=2&limit=10")) == {mr, old}

    series = clerk_client.get(f"{CLERK_ROOT}/series?Modality=MR&PatientID=SMH-1815").json()
    assert {s["0020000D"]["Value"][0] for s in series} == {mr, old}
    instances = clerk_client.get(f"{CLERK_ROOT}/instances?InstanceNumber=2").json()
    assert {i["0020000D"]["Value"][0] for i in instances} == {ct, charles}

    for bad in ("StudyDate=2024-01-02", "limit=-1", "StudyInstanceUID=1.2.abc",
                "NoSuchAttribute=1", "InstanceNumber=two"):
        level = "instances" if "Instance" in bad else "studies"
        response = clerk_client.get(f"{CLERK_ROOT}/{level}?{bad}")
        assert response.status_code == 400, bad
        assert response.json()["error"]
    ignored = clerk_client.get(f"{CLERK_ROOT}/studies?StudyTime=101500")
    assert ignored.status_code == 200 and len(ignored.json()) == 4
    assert "StudyTime" in ignored["Warning"] and ignored["Warning"].startswith("299 ")


def test_names_in_other_scripts_are_found_and_kept(facility, clerk_client):
    [instance] = archive(facility, [TESTDATA / "cd_ihe_pdi_hitachi_mr_jp/DCMDT/D0000001"])
    study = instance.series.study.study_instance_uid
    assert uids(clerk_client.get(f"{CLERK_ROOT}/studies", {"PatientName": "古橋*"})) == {study}
    [metadata] = clerk_client.get(f"{instance_path(CLERK_ROOT, instance)}/metadata").json()
    assert metadata["00100010"]["Value"] == [{"Alphabetic": "ﾌﾙﾊｼ^ﾀｲﾁ",
                                              "Ideographic": "古橋^大地"}]
    assert metadata["00080005"]["Value"] == ["ISO_IR 192"]


# --- Metadata and bulk data -------------------------------------------------------------


def test_metadata_leaves_large_values_as_bulk_data_that_can_be_fetched(facility, clerk_client):
    siemens, waveform, ge = archive(facility, [
        TESTDATA / "transfer_syntaxes_siemens_trio/1.dcm",
        TESTDATA / "encapsulation_variants/deflate/wave_dfl",
        TESTDATA / "mr_vendor_series/ge_signa_pioneer_dwi/i22.MRDC.1"])

    [metadata] = clerk_client.get(f"{instance_path(CLERK_ROOT, siemens)}/metadata").json()
    csa = metadata["00291020"]
    assert csa["vr"] == "OB" and "InlineBinary" not in csa
    response = clerk_client.get(csa["BulkDataURI"].removeprefix("http://testserver"))
    [(content_type, data)] = multipart(response)
    assert content_type == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert data == dcmread(siemens.file.path)[0x00291020].value
    single = clerk_client.get(csa["BulkDataURI"].removeprefix("http://testserver"),
                              HTTP_ACCEPT="application/octet-stream")
    assert single.content == data

    [metadata] = clerk_client.get(f"{instance_path(CLERK_ROOT, waveform)}/metadata").json()
    samples = metadata["54000100"]["Value"][0]["54001010"]
    assert samples["BulkDataURI"].endswith("/bulkdata/54000100/0/54001010")
    [(_type, data)] = multipart(clerk_client.get(
        samples["BulkDataURI"].removeprefix("http://testserver")))
    assert data == dcmread(waveform.file.path).WaveformSequence[0].WaveformData

    # A private DS that holds text cannot be a JSON number: it goes as its stored bytes.
    [metadata] = clerk_client.get(f"{instance_path(CLERK_ROOT, ge)}/metadata").json()
    assert metadata["00431080"]["vr"] == "UN" and metadata["00431080"]["InlineBinary"]
    assert clerk_client.get(
        f"{instance_path(CLERK_ROOT, ge)}/bulkdata/00100010").status_code == 404


def test_series_metadata_is_read_from_the_files_once(monkeypatch, recipient, ada_archive,
                                                     clerk):
    series = series_of(ada_archive.ct)
    url = f"{VIEW}/studies/{ada_archive.ct.study_instance_uid}/series/" \
          f"{series.series_instance_uid}/metadata"
    first = recipient.get(url)
    assert first.status_code == 200 and first["Content-Type"] == "application/dicom+json"

    def unread(instance):
        raise AssertionError("read a file again")

    monkeypatch.setattr(viewer_services, "_metadata_of_file", unread)
    again = recipient.get(url)
    assert again.content == first.content
    clerk_view = Client()
    sign_in(clerk_view, clerk)
    as_clerk = clerk_view.get(url.replace(VIEW, CLERK_ROOT)).json()
    assert all(m["7FE00010"]["BulkDataURI"].startswith(f"http://testserver{CLERK_ROOT}/")
               for m in as_clerk)


def test_opening_a_study_is_audited_once_however_much_is_fetched(recipient, ada_archive,
                                                                 ada_share, clerk_client):
    study = ada_archive.mr
    instance = Instance.objects.get(series__study=study)
    series = series_of(study).series_instance_uid
    recipient.get(f"{VIEW}/studies/{study.study_instance_uid}/series")
    recipient.get(f"{VIEW}/studies/{study.study_instance_uid}/series/{series}/metadata")
    recipient.get(f"{VIEW}/studies/{study.study_instance_uid}/metadata")
    for number in range(1, 11):
        recipient.get(f"{instance_path(VIEW, instance)}/frames/{number}")
    [event] = AuditEvent.objects.filter(action="viewer.study.open")
    assert event.actor_type == "share_session" and event.actor_ref == str(ada_share.share.pk)
    assert event.detail["study"] == study.pk

    clerk_client.get(f"{CLERK_ROOT}/studies/{study.study_instance_uid}/metadata")
    clerk_client.get(f"{CLERK_ROOT}/studies/{study.study_instance_uid}/series/{series}/metadata")
    clerk_event = AuditEvent.objects.filter(action="viewer.study.open").exclude(pk=event.pk)
    assert clerk_event.count() == 1
    assert clerk_event.get().actor_user.username == "clerk"


def test_the_roots_are_what_the_viewer_is_configured_with():
    assert dicomweb_root(RECIPIENT) == VIEW
    assert dicomweb_root(CLERK) == CLERK_ROOT


def without_binary(value):
    """DICOM JSON without binary values (inline or bulk), group lengths or the character
    set, which the metadata renders its own way."""
    if isinstance(value, list):
        return [without_binary(v) for v in value]
    if not isinstance(value, dict):
        return value
    return {key: without_binary(item) for key, item in value.items()
            if not (isinstance(item, dict) and ({"InlineBinary", "BulkDataURI"} & item.keys()))
            and not key.endswith("0000") and key != "00080005"
            # An empty value is left out (PS3.18 F.2.5); pydicom writes "Value": [].
            and not (key == "Value" and item == [])}


@pytest.mark.parametrize("path", [
    TESTDATA / "transfer_syntaxes_siemens_trio/2.dcm",  # implicit VR
    TESTDATA / "transfer_syntaxes_siemens_trio/3.dcm",  # big endian
    TESTDATA / "cd_ihe_pdi_hitachi_mr_jp/DCMDT/D0000003",  # ISO 2022 names
    TESTDATA / "mr_vendor_series/enhanced_multiframe/siemens_vida_xa10/6_1.dcm",  # nested
    TESTDATA / "mr_vendor_series/uih_umr770_dti/00000001.dcm",  # UTF-8
], ids=lambda p: p.name)
def test_metadata_says_what_pydicom_reads_from_the_file(facility, clerk_client, path):
    [instance] = archive(facility, [path])
    [metadata] = clerk_client.get(f"{instance_path(CLERK_ROOT, instance)}/metadata").json()
    expected = dcmread(path, stop_before_pixels=True).to_json_dict()
    assert without_binary(metadata) == without_binary(
        {**expected, "00083002": {"vr": "UI", "Value": [instance.transfer_syntax_uid]}})
