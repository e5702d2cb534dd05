"""What one file of a disc costs the server, and that the cheaper way a file is received
still checks the session as every other page of the portal does."""

import datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from dicomgw.models import Instance
from retrieval.models import RecordRequest, UploadedFile

from .conftest import request_patient
from .uploading import CD, DiscFile, Uploader, folder_files

# Per request of files of one series already indexed, however many files it holds: the
# files' rows, their request (with its facility), the archive's look-up, the
# series, the savepoint around the index, the instances, two counters, its release;
# the rows still pending (locked, in a savepoint) and their outcomes.
QUERIES_PER_REQUEST = 13


@pytest.fixture
def images(testdata_dir) -> list[DiscFile]:
    return [f for f in folder_files(testdata_dir / CD)
            if f.is_dicom and not f.path.endswith("/DICOMDIR")]


@pytest.fixture
def uploader(record_request) -> Uploader:
    made = record_request(patient=request_patient(name="ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地",
                                                  birth_date=datetime.date(1975, 3, 29)))
    uploader = Uploader(made.request.facility.short_name)
    uploader.begin(made.pin)
    uploader.request = made.request
    return uploader


def test_a_request_of_many_files_costs_the_queries_of_one(uploader, images):
    series = sorted((f for f in images if "/DCMDT/" in f.path), key=lambda f: f.path)[:11]
    uploader.announce(series)
    assert uploader.batch([(f.path, f.source.read_bytes()) for f in series[:1]]
                          ).status_code == 200
    for group in (series[1:2], series[2:11]):  # the disc's first series: 11 images
        with CaptureQueriesContext(connection) as queries:
            response = uploader.batch([(f.path, f.source.read_bytes()) for f in group])
        assert [f["outcome"] for f in response.json()["files"]] == ["stored"] * len(group)
        assert len(queries) <= QUERIES_PER_REQUEST, [q["sql"][:80] for q in queries]
    assert Instance.objects.count() == 11


def test_a_session_whose_request_has_a_new_request_page_sends_no_file(uploader, images):
    uploader.announce(images[:1])
    RecordRequest.objects.filter(pk=uploader.request.pk).update(pin_hash="renewed")
    response = uploader.put(images[0].path, images[0].source.read_bytes())
    assert response.status_code == 401 and response.json()["signin"] == uploader.base
    assert "new Request Page" in response.json()["error"]
    assert UploadedFile.objects.get().outcome == "pending"
    assert not Instance.objects.exists()


def test_a_cancelled_request_takes_no_more_files(uploader, images):
    uploader.announce(images[:1])
    RecordRequest.objects.filter(pk=uploader.request.pk).update(
        status=RecordRequest.Status.CANCELLED)
    response = uploader.put(images[0].path, images[0].source.read_bytes())
    assert response.status_code == 401 and "cancelled" in response.json()["error"]
    assert not Instance.objects.exists()


def test_a_file_sent_again_once_settled_keeps_its_first_outcome(uploader, images):
    uploader.announce(images[:1])
    data = images[0].source.read_bytes()
    assert uploader.put(images[0].path, data).json()["outcome"] == "stored"
    assert uploader.put(images[0].path, data).json()["outcome"] == "stored"
    assert Instance.objects.count() == 1
