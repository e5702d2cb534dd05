"""Our storage SCP against real senders: dcmtk's storescu and echoscu, our own C-STORE
client, pynetdicom associations from the wrong address, and ``manage.py runscp`` as a
process."""

import hashlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from django.db.models import Sum
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import MRImageStorage, Verification

from dicomgw import dimse, services
from dicomgw.models import Instance, Study
from dicomgw.scp import OUT_OF_RESOURCES, IngestPool, StorageSCP
from dicomgw.services import ingest_file
from pockethealth.models import AuditEvent

from .conftest import (
    PEER_ENV,
    dataset_bytes,
    dicom_files,
    free_port,
    sop_instance_uid,
    stop_process,
    storescu_batches,
)

TS_FOLDER = "transfer_syntaxes_siemens_trio"


class Sender:
    """An outside modality or workstation, as a PacsNode sees it."""

    def __init__(self, ae_title: str, host: str = "127.0.0.1", port: int = 104):
        self.ae_title, self.host, self.port = ae_title, host, port


def storescu(scp, files, *, calling: str = "STORESCU",
             called: str | None = None) -> subprocess.CompletedProcess:
    """dcmtk's storescu, one association per transfer syntax, each file proposed in its
    own syntax. Returns the last failure, else the last result."""
    results = []
    for options, batch in storescu_batches(files):
        results.append(subprocess.run(
            ["storescu", "-aet", calling, "-aec", called or scp.ae_title, *options,
             scp.host, str(scp.port), *map(str, batch)],
            env=PEER_ENV, capture_output=True, text=True, timeout=120,
        ))
    return next((r for r in results if r.returncode), results[-1])


def archived_bytes(instance: Instance) -> bytes:
    with instance.file.open("rb") as fh:
        return fh.read()


def wait_for_audit(count: int, timeout: float = 10) -> list[AuditEvent]:
    deadline = time.monotonic() + timeout
    while True:
        events = list(AuditEvent.objects.filter(action="dicom.association", outcome="denied")
                      .order_by("id"))
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


# --- Receiving -----------------------------------------------------------------------


def test_storescu_files_are_archived_in_the_syntax_they_were_sent(
        scp_server, pacs_node_for, facility, testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    files = dicom_files(testdata_dir / TS_FOLDER)
    result = storescu(scp_server, files)
    assert result.returncode == 0, result.stdout + result.stderr

    archived = scp_server.wait_for_archived(facility, {sop_instance_uid(f) for f in files})
    for path in files:
        original = path.read_bytes()
        instance = archived[sop_instance_uid(path)]
        sent_syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        # JPEG-LS, JPEG 2000, RLE, JPEG lossless, big endian: kept as sent.
        assert instance.transfer_syntax_uid == sent_syntax
        stored = archived_bytes(instance)
        assert dataset_bytes(stored) == dataset_bytes(original)
        assert instance.sha256 == hashlib.sha256(stored).hexdigest()
        assert instance.source == "scp"
        assert instance.facility == facility
    assert not any(scp_server.scp.pool.rejected.iterdir())


def test_echoscu_from_a_known_node_is_answered(scp_server, pacs_node_for):
    pacs_node_for(Sender("ECHOSCU"))
    result = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", scp_server.ae_title,
                             scp_server.host, str(scp_server.port)],
                            env=PEER_ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_several_associations_at_once_all_land(scp_server, pacs_node_for, facility,
                                               testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    files = dicom_files(testdata_dir / "cd_ihe_pdi_hitachi_mr_jp" / "DCMDT")[:24]
    batches = [files[i::4] for i in range(4)]
    results = []
    threads = [threading.Thread(target=lambda b=b: results.append(storescu(scp_server, b)))
               for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    scp_server.wait_for_archived(facility, {sop_instance_uid(f) for f in files})
    assert Instance.objects.filter(facility=facility).count() == len(files)


# --- Who may send ----------------------------------------------------------------------


def test_unknown_calling_ae_title_is_rejected_and_audited(scp_server, pacs_node_for,
                                                         facility, testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    files = dicom_files(testdata_dir / TS_FOLDER)[:1]
    result = storescu(scp_server, files, calling="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr

    [event] = wait_for_audit(1)
    assert event.actor_type == "system"
    assert event.facility is None
    assert event.detail == {"calling_ae": "INTRUDER", "called_ae": scp_server.ae_title,
                            "peer_address": "127.0.0.1",
                            "reason": "unknown calling AE title"}
    assert not Instance.objects.exists()


def test_known_ae_title_from_the_wrong_address_is_rejected_and_audited(
        scp_server, pacs_node_for, facility):
    pacs_node_for(Sender("MODALITY"))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    # Loopback answers on all of 127.0.0.0/8: the node is 127.0.0.1, we come from .2.
    assoc = ae.associate(scp_server.host, scp_server.port, ae_title=scp_server.ae_title,
                         bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.result == 0x01  # permanent
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE not recognised

    [event] = wait_for_audit(1)
    assert event.facility == facility
    assert event.detail["peer_address"] == "127.0.0.2"
    assert event.detail["reason"] == "calling AE title from an address not configured for it"

    # The same AE title from the right address is welcome.
    assoc = ae.associate(scp_server.host, scp_server.port, ae_title=scp_server.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_called_ae_title_that_is_not_ours_is_rejected(scp_server, pacs_node_for,
                                                       testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    result = storescu(scp_server, dicom_files(testdata_dir / TS_FOLDER)[:1],
                      called="SOMEONEELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    [event] = wait_for_audit(1)
    assert event.detail["reason"] == "called AE title not ours"


def test_our_client_reports_a_rejection_in_plain_words(scp_server, pacs_node_for):
    node = pacs_node_for(scp_server, calling_ae_title="STRANGER")
    with pytest.raises(dimse.DimseError) as caught:
        dimse.echo(node)
    assert caught.value.kind == "rejected"
    assert str(caught.value) == ("The PACS rejected our AE title STRANGER "
                                 "(calling AE not recognised)")


def test_a_node_that_may_not_send_is_rejected(scp_server, pacs_node_for):
    pacs_node_for(Sender("QUIET"), may_send=False)
    ae = AE(ae_title="QUIET")
    ae.add_requested_context(Verification)
    assoc = ae.associate(scp_server.host, scp_server.port, ae_title=scp_server.ae_title)
    assert assoc.is_rejected


# --- Status codes and durability -----------------------------------------------------


@pytest.fixture
def full_disk_scp(transactional_db, settings):
    """Our SCP convinced the disk is full: it needs more free space than any disk has."""
    scp = StorageSCP(host="127.0.0.1", port=0, min_free_bytes=2**62, node_refresh_seconds=1)
    scp.start()
    yield scp
    scp.stop(grace=5)


def test_out_of_space_answers_a700_and_keeps_nothing(full_disk_scp, pacs_node_for, facility,
                                                      testdata_dir):
    path = dicom_files(testdata_dir / TS_FOLDER)[0]
    instance = ingest_file(facility=facility, path=path, source="import").instance
    node = pacs_node_for(full_disk_scp)
    full_disk_scp.directory.refresh()
    results = []
    counts = dimse.store(node, instances=[instance],
                         on_result=lambda *args: results.append(args))
    assert counts == {"success": 0, "warning": 0, "failure": 1}
    [(sent, status, outcome, detail)] = results
    assert sent == instance
    assert status == OUT_OF_RESOURCES
    assert outcome == "failure"
    assert detail == "status 0xA700"
    assert not list((full_disk_scp.spool_root / "incoming").iterdir())


def test_files_left_in_the_spool_are_ingested_at_start(transactional_db, settings, facility,
                                                       testdata_dir):
    files = dicom_files(testdata_dir / TS_FOLDER)[:3]
    spool_root = Path(settings.SPOOL_DIR) / "scp"
    incoming = spool_root / "incoming"
    work = spool_root / "work"
    incoming.mkdir(parents=True)
    work.mkdir(parents=True)
    # What a killed SCP leaves: a received file, one claimed by an ingest thread, and a
    # file it was still writing (never acknowledged, so never counted as received).
    shutil.copy(files[0], incoming / f"f{facility.pk}-a.dcm")
    shutil.copy(files[1], work / f"f{facility.pk}-b.dcm")
    (incoming / f"f{facility.pk}-c.part").write_bytes(files[2].read_bytes()[:1000])

    scp = StorageSCP(host="127.0.0.1", port=0, node_refresh_seconds=1)
    scp.start()
    try:
        deadline = time.monotonic() + 30
        while scp.pool.pending and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scp.stop(grace=5)
    archived = set(Instance.objects.filter(facility=facility)
                   .values_list("sop_instance_uid", flat=True))
    assert archived == {sop_instance_uid(files[0]), sop_instance_uid(files[1])}
    assert not list(incoming.iterdir())
    assert not list(work.iterdir())


def wait_for(pool: IngestPool, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while pool.pending and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_ingest_threads_take_waiting_files_together(transactional_db, settings, facility,
                                                        other_facility, testdata_dir,
                                                        monkeypatch):
    """Files waiting in the spool are indexed several at once, those of each facility
    together; a file ingest refuses and one of no known facility are set aside; files
    whose indexing failed stay in the spool and are indexed on the next try."""
    files = dicom_files(testdata_dir / TS_FOLDER)
    assert len(files) >= 6
    spool_root = Path(settings.SPOOL_DIR) / "scp"
    pool = IngestPool(spool_root, workers=1, retry_seconds=0.1)
    for number, path in enumerate(files):
        owner = facility if number % 3 else other_facility
        shutil.copy(path, pool.incoming / f"f{owner.pk}-{number:02d}.dcm")
    (pool.incoming / f"f{facility.pk}-bad.dcm").write_bytes(b"not DICOM at all" * 20)
    shutil.copy(files[0], pool.incoming / "f999999-lost.dcm")
    batches = []
    real_ingest_files = services.ingest_files

    def ingest_files_failing_once(**kwargs):
        batches.append(len(kwargs["paths"]))
        if len(batches) == 1:
            raise RuntimeError("database went away")
        return real_ingest_files(**kwargs)

    monkeypatch.setattr("dicomgw.scp.ingest_files", ingest_files_failing_once)
    pool.recover()  # queues every waiting file before the thread starts
    pool.start()
    try:
        wait_for(pool)
    finally:
        pool.stop()

    # One facility's files together, which failed; then each facility's files again.
    assert batches[0] > 1 and sum(batches[1:]) == len(files) + 1 and len(batches) == 3
    mine = {sop_instance_uid(p) for n, p in enumerate(files) if n % 3}
    theirs = {sop_instance_uid(p) for n, p in enumerate(files) if not n % 3}
    assert set(Instance.objects.filter(facility=facility).values_list(
        "sop_instance_uid", flat=True)) == mine
    assert set(Instance.objects.filter(facility=other_facility).values_list(
        "sop_instance_uid", flat=True)) == theirs
    for study in Study.objects.all():
        assert study.num_instances == study.series.aggregate(n=Sum("num_instances"))["n"]
    assert sorted(p.name for p in pool.rejected.iterdir()) == [
        f"f{facility.pk}-bad.dcm", "f999999-lost.dcm"]
    assert not list(pool.incoming.iterdir()) and not list(pool.work.iterdir())


# --- The process -------------------------------------------------------------------


def test_runscp_with_several_processes_receives_and_indexes(scp_process, pacs_node_for,
                                                             facility, testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    port = free_port()
    proc = scp_process(port, "--processes", "2")
    scp = Sender("EXCHANGE", "127.0.0.1", port)
    files = dicom_files(testdata_dir / "cd_ihe_pdi_hitachi_mr_jp" / "DCMDT")[:12]
    results = []
    threads = [threading.Thread(target=lambda b=b: results.append(storescu(scp, b)))
               for b in (files[0::3], files[1::3], files[2::3])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    wanted = {sop_instance_uid(f) for f in files}
    deadline = time.monotonic() + 60
    while Instance.objects.filter(facility=facility, sop_instance_uid__in=wanted).count() < 12:
        assert time.monotonic() < deadline, proc.log_path.read_text()
        time.sleep(0.1)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.log_path.read_text()
    stop_process(proc)


# --- The upper layer under stress ----------------------------------------------------


def _associate_raw(scp, calling: str = "STORESCU") -> socket.socket:
    """Open an association by hand (PS3.8 9.3.2), one MR storage context, Explicit VR
    Little Endian, and return the socket once accepted."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = calling
    request.called_ae_title = scp.ae_title
    context = build_context(MRImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
    request.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    sock = socket.create_connection((scp.host, scp.port), timeout=10)
    sock.sendall(pdu.encode())
    assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    sock.recv(65536)
    return sock


def _store_command(sop_instance: str) -> bytes:
    def element(number, value):
        return struct.pack("<HHI", 0, number, len(value)) + value

    def ui(text):
        data = text.encode()
        return data + b"\0" if len(data) % 2 else data

    body = b"".join([
        element(0x0002, ui(MRImageStorage)), element(0x0100, struct.pack("<H", 0x0001)),
        element(0x0110, struct.pack("<H", 7)), element(0x0700, struct.pack("<H", 0)),
        element(0x0800, struct.pack("<H", 0x0000)), element(0x1000, ui(sop_instance)),
    ])
    command = element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def test_a_sender_that_vanishes_mid_image_leaves_nothing_behind(scp_server, pacs_node_for,
                                                                facility, testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    path = dicom_files(testdata_dir / TS_FOLDER)[0]
    data = dataset_bytes(path.read_bytes())
    sock = _associate_raw(scp_server)
    sock.sendall(_store_command(sop_instance_uid(path)))
    half = data[: len(data) // 2]
    pdv = struct.pack(">IBB", len(half) + 2, 1, 0x00) + half  # data, not the last piece
    sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    sock.close()

    deadline = time.monotonic() + 10
    while scp_server.scp.open_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(scp_server.scp.spool.directory.iterdir())
    # The server is none the worse: the same image, sent whole, is stored.
    assert storescu(scp_server, [path]).returncode == 0
    scp_server.wait_for_archived(facility, {sop_instance_uid(path)})


def test_garbage_on_the_port_is_dropped_and_service_goes_on(scp_server, pacs_node_for,
                                                            facility, testdata_dir):
    pacs_node_for(Sender("STORESCU"))
    with socket.create_connection((scp_server.host, scp_server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(100)
    assert reply[:1] in (b"\x07", b"")  # A-ABORT, or just closed
    path = dicom_files(testdata_dir / TS_FOLDER)[0]
    assert storescu(scp_server, [path]).returncode == 0
    scp_server.wait_for_archived(facility, {sop_instance_uid(path)})


def test_associations_beyond_the_maximum_are_turned_away_for_now(transactional_db, settings,
                                                                  pacs_node_for):
    pacs_node_for(Sender("STORESCU"))
    scp = StorageSCP(host="127.0.0.1", port=0, max_associations=1, node_refresh_seconds=1)
    scp.start()
    try:
        held = _associate_raw(scp)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(scp.host, scp.port, ae_title=scp.ae_title)
        assert assoc.is_rejected
        response = assoc.acceptor.primitive
        # Transient, presentation related, local limit exceeded (PS3.8 9.3.4).
        assert (response.result, response.result_source, response.diagnostic) == (2, 3, 2)
        held.close()
    finally:
        scp.stop(grace=5)
