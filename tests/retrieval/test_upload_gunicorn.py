"""The patient CD sent in batches to gunicorn as deployed, which hands the files' bytes
over straight from its socket (``pockethealth.body``): every image archived byte for
byte, several batches on one kept-alive connection, and a batch cut off midway keeps
the files that arrived whole while the server carries on."""

import hashlib
import http.client
import json
import socket

import pytest
from django.conf import settings

from retrieval.models import Upload, UploadedFile
from tests.servers import WebServer

from .conftest import request_patient
from .uploading import CD, Uploader, folder_files


@pytest.fixture
def gunicorn_server(transactional_db, tmp_path):
    server = WebServer(tmp_path, gunicorn=True)
    server.start()
    yield server
    server.stop()


def batch_request(files, *, facility: str, cookies: dict[str, str]) -> tuple[bytes, dict]:
    manifest = json.dumps({"files": [{"path": f.path, "size": f.size} for f in files]}).encode()
    body = manifest + b"".join(f.source.read_bytes() for f in files)
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
               "X-CSRFToken": cookies["csrftoken"], "Accept": "application/json",
               "Content-Type": "application/octet-stream",
               "X-Upload-Manifest-Length": str(len(manifest))}
    return body, headers


def test_a_disc_sent_to_gunicorn_in_batches_is_archived_byte_for_byte(
        gunicorn_server, record_request, testdata_dir):
    made = record_request(patient=request_patient(name="ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地"))
    facility = made.request.facility.short_name
    files = folder_files(testdata_dir / CD)
    images = [f for f in files if f.is_dicom and not f.path.endswith("/DICOMDIR")]
    assert len(images) == 67
    # The PIN and the announcements in process; the files to gunicorn, in the same
    # session (kept in the database and the shared cache).
    uploader = Uploader(facility)
    uploader.begin(made.pin)
    assert uploader.client.get(f"/upload/{facility}/files").status_code == 200
    assert uploader.announce(images).status_code == 200
    cookies = {name: morsel.value for name, morsel in uploader.client.cookies.items()}
    assert settings.UPLOAD_SESSION_COOKIE_NAME in cookies and "csrftoken" in cookies

    # The last batch is cut off after its first two files and a half.
    cut_batch = images[-6:]
    body, headers = batch_request(cut_batch, facility=facility, cookies=cookies)
    manifest_length = int(headers["X-Upload-Manifest-Length"])
    cut_at = manifest_length + cut_batch[0].size + cut_batch[1].size + cut_batch[2].size // 2
    with socket.create_connection(("127.0.0.1", gunicorn_server.port), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST /upload/{facility}/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body[:cut_at])
        sock.shutdown(socket.SHUT_WR)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        data = answer.read()
    assert answer.status == 400, data[:300]
    assert b"did not arrive whole" in data
    settled = dict(UploadedFile.objects.filter(
        path__in=[f.path for f in cut_batch]).values_list("path", "outcome"))
    assert [settled[f.path] for f in cut_batch] == ["stored", "stored"] + ["pending"] * 4

    # Then the whole disc, 20 files to a request, on one connection: the files stored
    # already are answered as such, without being stored again.
    connection = http.client.HTTPConnection("127.0.0.1", gunicorn_server.port, timeout=60)
    outcomes = {}
    try:
        for start in range(0, len(images), 20):
            group = images[start:start + 20]
            body, headers = batch_request(group, facility=facility, cookies=cookies)
            connection.request("POST", f"/upload/{facility}/batch", body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            assert response.status == 200, data[:500]
            for sent, result in zip(group, json.loads(data)["files"], strict=True):
                assert result["path"] == sent.path
                outcomes[sent.path] = result["outcome"]
    finally:
        connection.close()
    assert set(outcomes.values()) == {"stored"}

    upload = Upload.objects.get(request=made.request)
    stored = {row.path: row for row in UploadedFile.objects.filter(
        upload=upload, instance__isnull=False).select_related("instance")}
    assert set(stored) == {f.path for f in images}
    for image in images:
        row = stored[image.path]
        with row.instance.file.open("rb") as fh:
            archived = hashlib.sha256(fh.read()).hexdigest()
        assert archived == hashlib.sha256(image.source.read_bytes()).hexdigest() \
            == row.instance.sha256
