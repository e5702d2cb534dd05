"""The DICOM client against real peers: Orthanc and dcmtk's dcmqrscp as PACS, our SCP
as the C-MOVE destination, plain sockets for a closed port and a silent peer."""

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from pydicom import dcmread

from dicomgw import dimse
from dicomgw.dimse import DimseError, SubOperations
from dicomgw.models import Instance, PacsNode, Study
from dicomgw.services import ingest_file

from .conftest import (
    dataset_bytes,
    dicom_files,
    free_port,
    make_certificates,
    sop_instance_uid,
)

JP_CD = "cd_ihe_pdi_hitachi_mr_jp/DCMDT"
JP_STUDY = "1.2.392.200036.9123.100.12.12.20110.90180107110521403805821752"
TS_FOLDER = "transfer_syntaxes_siemens_trio"


def study_uid_of(folder: Path) -> str:
    return str(dcmread(dicom_files(folder)[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def orthanc_loaded(orthanc):
    """Orthanc holding the Japanese CD and the transfer-syntax series."""
    testdata = Path(settings.TESTDATA_DICOM_DIR)
    orthanc.upload_study(testdata / JP_CD)
    orthanc.upload_study(testdata / TS_FOLDER)
    return orthanc


# --- C-ECHO and failures to connect -------------------------------------------------


def test_echo_against_orthanc_succeeds(orthanc, pacs_node_for):
    dimse.echo(pacs_node_for(orthanc))


def test_echo_against_dcmqrscp_succeeds(dcmqrscp, pacs_node_for):
    dimse.echo(pacs_node_for(dcmqrscp))


def test_closed_port_is_refused_quickly(pacs_node_for):
    class Closed:
        ae_title, host, port = "NOBODY", "127.0.0.1", free_port()

    node = pacs_node_for(Closed)
    started = time.monotonic()
    with pytest.raises(DimseError) as caught:
        dimse.echo(node)
    assert caught.value.kind == "refused"
    assert time.monotonic() - started < 3
    assert str(caught.value) == f"The PACS at 127.0.0.1:{Closed.port} refused the connection"
    with pytest.raises(DimseError) as caught:
        dimse.find(node, level="STUDY", query={"PatientName": "A*"})
    assert caught.value.kind == "refused"


@pytest.fixture
def silent_peer():
    """A TCP socket that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

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


def test_silent_peer_times_out_within_the_association_timeout(silent_peer, pacs_node_for):
    node = pacs_node_for(silent_peer, acse_timeout=2)
    for call in (lambda: dimse.echo(node),
                 lambda: dimse.find(node, level="STUDY", query={"PatientID": "1"})):
        started = time.monotonic()
        with pytest.raises(DimseError) as caught:
            call()
        elapsed = time.monotonic() - started
        assert caught.value.kind == "timeout"
        assert 1.5 < elapsed < 4
        assert str(caught.value) == "No answer from the PACS within 2 s"


# --- C-FIND on Orthanc ---------------------------------------------------------------


def test_find_at_patient_level_round_trips_a_japanese_name(orthanc_loaded, pacs_node_for):
    node = pacs_node_for(orthanc_loaded)
    [patient] = dimse.find(node, level="PATIENT",
                           query={"PatientID": "0000110231", "PatientName": None,
                                  "PatientBirthDate": None})
    assert patient.SpecificCharacterSet == "ISO_IR 192"
    # Orthanc 1.10 itself decodes the half-width katakana group of this ISO 2022 name
    # but not the kanji one (its REST API shows the same); the answer carries exactly
    # what Orthanc holds, decoded through the answer's character set.
    alphabetic, ideographic = str(patient.PatientName).split("=")
    assert alphabetic == "ﾌﾙﾊｼ^ﾀｲﾁ"
    assert ideographic == orthanc_loaded.patient_name("0000110231").split("=")[1]
    # A wildcard search on a non-ASCII name, sent as UTF-8 (ISO_IR 192).
    matches = dimse.find(node, level="PATIENT", query={"PatientName": "ﾌﾙﾊｼ*",
                                                       "PatientID": None})
    assert [str(m.PatientID) for m in matches] == ["0000110231"]


def test_find_at_study_level_reports_counts(orthanc_loaded, pacs_node_for, testdata_dir):
    node = pacs_node_for(orthanc_loaded)
    [study] = dimse.find(node, level="STUDY", query={
        "StudyInstanceUID": JP_STUDY, "StudyDate": None, "StudyDescription": None,
        "ModalitiesInStudy": None, "NumberOfStudyRelatedSeries": None,
        "NumberOfStudyRelatedInstances": None, "PatientName": None})
    assert int(study.NumberOfStudyRelatedSeries) == 5
    assert int(study.NumberOfStudyRelatedInstances) == 67
    assert study.ModalitiesInStudy == "MR"
    # Wildcards and ranges pass through.
    ts_study = study_uid_of(testdata_dir / TS_FOLDER)
    found = {str(s.StudyInstanceUID) for s in dimse.find(
        node, level="STUDY", query={"StudyDate": "19000101-", "StudyInstanceUID": None,
                                    "PatientName": "*"})}
    assert {JP_STUDY, ts_study} <= found


def test_find_at_series_and_image_level(orthanc_loaded, pacs_node_for, testdata_dir):
    node = pacs_node_for(orthanc_loaded)
    series = dimse.find(node, level="SERIES", query={
        "StudyInstanceUID": JP_STUDY, "SeriesInstanceUID": None, "SeriesDescription": None,
        "NumberOfSeriesRelatedInstances": None, "Modality": None})
    assert len(series) == 5
    assert sorted(int(s.NumberOfSeriesRelatedInstances) for s in series) == [11, 11, 11, 17, 17]

    files = dicom_files(testdata_dir / JP_CD)
    assert dimse.find_instance_uids(node, study_uid=JP_STUDY) == {
        sop_instance_uid(f) for f in files}
    limited = dimse.find(node, level="IMAGE", query={"StudyInstanceUID": JP_STUDY,
                                                     "SOPInstanceUID": None}, limit=3)
    assert len(limited) == 3


# --- A slow PACS ----------------------------------------------------------------------


@pytest.fixture
def slow_find_peer():
    """A pynetdicom Q/R SCP that answers one match every half second for a minute and
    records whether it was cancelled (PS3.7 9.1.2.1.1: C-CANCEL)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    seen = {"cancelled": False}

    def handle_find(event):
        for number in range(120):
            if event.is_cancelled:
                seen["cancelled"] = True
                yield 0xFE00, None
                return
            match = dimse.build_identifier("STUDY", {"StudyInstanceUID": f"1.2.3.{number}"})
            yield 0xFF00, match
            time.sleep(0.5)

    ae = AE(ae_title="SLOWPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, handle_find)])

    class Peer:
        ae_title, host, port = "SLOWPACS", "127.0.0.1", server.server_address[1]
        state = seen

    yield Peer
    server.shutdown()


def test_a_search_past_its_time_limit_is_cancelled(slow_find_peer, pacs_node_for):
    node = pacs_node_for(slow_find_peer)
    started = time.monotonic()
    with pytest.raises(DimseError) as caught:
        dimse.find(node, level="STUDY", query={"PatientName": "A*",
                                               "StudyInstanceUID": None}, timeout=1.5)
    elapsed = time.monotonic() - started
    assert caught.value.kind == "timeout"
    assert "took longer than 1.5 s" in str(caught.value)
    assert elapsed < 4
    assert slow_find_peer.state["cancelled"]


# --- C-MOVE from Orthanc into our SCP ---------------------------------------------------


def test_move_from_orthanc_archives_every_instance_byte_for_byte(
        orthanc_loaded, scp_server, pacs_node_for, facility, testdata_dir):
    node = pacs_node_for(orthanc_loaded)
    study_uid = study_uid_of(testdata_dir / TS_FOLDER)
    in_orthanc = orthanc_loaded.instance_ids(study_uid)
    assert len(in_orthanc) == 9
    progress: list[SubOperations] = []

    result = dimse.move(node, study_uid=study_uid, destination_ae=scp_server.ae_title,
                        on_progress=progress.append)

    assert result.status == 0x0000
    assert (result.completed, result.failed, result.warning) == (9, 0, 0)
    assert progress[-1] == result
    # Pending responses count down as the images go out (PS3.4 C.4.2.3.1).
    remaining = [p.remaining for p in progress[:-1]]
    assert remaining and remaining == sorted(remaining, reverse=True) and remaining[-1] < 9
    archived = scp_server.wait_for_archived(facility, in_orthanc)
    for sop_uid, orthanc_id in in_orthanc.items():
        theirs = orthanc_loaded.file(orthanc_id)
        with archived[sop_uid].file.open("rb") as fh:
            ours = fh.read()
        # The data set is the PACS's, byte for byte; the File Meta Information is each
        # archive's own (PS3.10 7.1: implementation UID, source AE title).
        assert dataset_bytes(ours) == dataset_bytes(theirs)
        assert hashlib.sha256(dataset_bytes(ours)).hexdigest() == hashlib.sha256(
            dataset_bytes(bytes(128) + theirs[128:])).hexdigest()
        assert archived[sop_uid].sha256 == hashlib.sha256(ours).hexdigest()
        assert archived[sop_uid].transfer_syntax_uid == orthanc_loaded.transfer_syntax(
            orthanc_id)


def test_move_of_the_japanese_cd_files_the_patient_by_name(
        orthanc_loaded, scp_server, pacs_node_for, facility):
    node = pacs_node_for(orthanc_loaded)
    result = dimse.move(node, study_uid=JP_STUDY, destination_ae=scp_server.ae_title)
    assert (result.completed, result.failed) == (67, 0)
    scp_server.wait_for_archived(facility, orthanc_loaded.sop_uids(JP_STUDY))
    study = Study.objects.get(facility=facility, study_instance_uid=JP_STUDY)
    assert study.patient.name == "ﾌﾙﾊｼ^ﾀｲﾁ=古橋^大地"
    assert (study.num_series, study.num_instances) == (5, 67)


def test_move_of_one_series_or_some_instances(orthanc_loaded, scp_server, pacs_node_for,
                                              facility):
    node = pacs_node_for(orthanc_loaded)
    [series] = dimse.find(node, level="SERIES", query={
        "StudyInstanceUID": JP_STUDY, "SeriesInstanceUID": None, "SeriesDescription": "T2 SAG*"})
    result = dimse.move(node, study_uid=JP_STUDY, destination_ae=scp_server.ae_title,
                        series_uid=str(series.SeriesInstanceUID))
    assert result.completed == 11
    some = sorted(orthanc_loaded.sop_uids(JP_STUDY))[:4]
    result = dimse.move(node, study_uid=JP_STUDY, destination_ae=scp_server.ae_title,
                        instance_uids=some)
    assert result.completed == 4
    scp_server.wait_for_archived(facility, some)


def test_move_to_a_destination_the_pacs_does_not_know_fails_plainly(
        orthanc_loaded, dcmqrscp, pacs_node_for, testdata_dir):
    # Orthanc answers "unable to process" (0xC000), with nothing delivered.
    node = pacs_node_for(orthanc_loaded)
    with pytest.raises(DimseError) as caught:
        dimse.move(node, study_uid=JP_STUDY, destination_ae="NOWHERE")
    assert caught.value.kind == "failed"
    assert caught.value.status == 0xC000
    assert str(caught.value).startswith("The PACS could not carry out the retrieve (status "
                                        "0xC000")
    # dcmqrscp answers "move destination unknown" (0xA801).
    loaded = dcmqrscp.load(dicom_files(testdata_dir / "bits12_siemens_trio")[:1])
    node = pacs_node_for(dcmqrscp)
    with pytest.raises(DimseError) as caught:
        dimse.move(node, study_uid=study_uid_of(testdata_dir / "bits12_siemens_trio"),
                   destination_ae="NOWHERE")
    assert loaded
    assert caught.value.status == dimse.MOVE_DESTINATION_UNKNOWN
    assert str(caught.value) == (
        "The PACS does not know the destination NOWHERE (status 0xA801): add our storage "
        "SCP to its list of DICOM nodes")


# --- C-GET from Orthanc -------------------------------------------------------------------


def test_get_from_orthanc_archives_every_instance_in_its_syntax(
        orthanc_loaded, pacs_node_for, facility, testdata_dir, transactional_db):
    node = pacs_node_for(orthanc_loaded, supports_c_get=True)
    study_uid = study_uid_of(testdata_dir / TS_FOLDER)
    in_orthanc = orthanc_loaded.instance_ids(study_uid)
    progress = []
    result = dimse.get(node, study_uid=study_uid, facility=facility,
                       on_progress=progress.append)
    assert (result.status, result.completed, result.failed) == (0x0000, 9, 0)
    archived = {i.sop_instance_uid: i for i in Instance.objects.filter(facility=facility)}
    assert set(archived) == set(in_orthanc)
    for sop_uid, orthanc_id in in_orthanc.items():
        assert archived[sop_uid].source == "retrieve"
        assert archived[sop_uid].transfer_syntax_uid == orthanc_loaded.transfer_syntax(
            orthanc_id)
        with archived[sop_uid].file.open("rb") as fh:
            assert dataset_bytes(fh.read()) == dataset_bytes(orthanc_loaded.file(orthanc_id))


# --- C-STORE from our archive into Orthanc -------------------------------------------------


def test_store_into_orthanc_keeps_each_original_syntax(orthanc, pacs_node_for, facility,
                                                       testdata_dir):
    files = dicom_files(testdata_dir / TS_FOLDER)
    study_uid = study_uid_of(testdata_dir / TS_FOLDER)
    orthanc.delete_study(study_uid)
    instances = [ingest_file(facility=facility, path=f, source="import").instance
                 for f in files]
    node = pacs_node_for(orthanc)
    results = []

    counts = dimse.store(node, instances=instances,
                         on_result=lambda *args: results.append(args))

    assert counts == {"success": 9, "warning": 0, "failure": 0}
    assert [(r[0], r[1], r[2], r[3]) for r in results] == [
        (i, 0x0000, "success", "") for i in instances]
    in_orthanc = orthanc.instance_ids(study_uid)
    for instance in instances:
        orthanc_id = in_orthanc[instance.sop_instance_uid]
        # JPEG-LS, JPEG 2000, RLE and JPEG lossless stay as they are; so does big endian.
        assert orthanc.transfer_syntax(orthanc_id) == instance.transfer_syntax_uid
        with instance.file.open("rb") as fh:
            assert dataset_bytes(orthanc.file(orthanc_id)) == dataset_bytes(fh.read())


# --- dcmtk dcmqrscp as a second PACS ----------------------------------------------------


def test_dcmqrscp_find_and_move_into_our_scp(dcmqrscp, scp_server, pacs_node_for, facility,
                                             testdata_dir):
    loaded = dcmqrscp.load(dicom_files(testdata_dir / JP_CD))
    node = pacs_node_for(dcmqrscp)
    [study] = dimse.find(node, level="STUDY", query={"StudyInstanceUID": None,
                                                     "PatientName": None,
                                                     "NumberOfStudyRelatedInstances": None})
    assert str(study.StudyInstanceUID) == JP_STUDY
    # dcmqrscp is strictly hierarchical (PS3.4 C.4.1.2.2): asked series by series.
    assert dimse.find_instance_uids(node, study_uid=JP_STUDY) == loaded
    progress = []
    result = dimse.move(node, study_uid=JP_STUDY, destination_ae=scp_server.ae_title,
                        on_progress=progress.append)
    assert (result.status, result.completed, result.failed) == (0x0000, 67, 0)
    assert len(progress) >= 67
    archived = scp_server.wait_for_archived(facility, loaded)
    for sop_uid, path in dcmqrscp.loaded.items():
        with archived[sop_uid].file.open("rb") as fh:
            assert dataset_bytes(fh.read()) == dataset_bytes(path.read_bytes())


def test_dcmqrscp_reports_the_sub_operations_it_could_not_carry_out(
        dcmqrscp, scp_server, pacs_node_for, facility, testdata_dir):
    # Out of the box dcmqrscp proposes only uncompressed syntaxes when it sends, so it
    # cannot deliver the compressed files of this series: it says so, file by file.
    files = dicom_files(testdata_dir / TS_FOLDER)
    dcmqrscp.load(files)
    compressed = {sop_instance_uid(f) for f in files
                  if dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
                  .is_compressed}
    assert len(compressed) == 6
    node = pacs_node_for(dcmqrscp)
    result = dimse.move(node, study_uid=study_uid_of(testdata_dir / TS_FOLDER),
                        destination_ae=scp_server.ae_title)
    assert result.status == dimse.SUB_OPERATIONS_WARNING
    assert (result.completed, result.failed) == (9 - len(compressed), len(compressed))
    assert set(result.failed_uids) == compressed


def test_dcmqrscp_on_the_patient_root_model(dcmqrscp, scp_server, pacs_node_for, facility,
                                            testdata_dir):
    files = dicom_files(testdata_dir / JP_CD)[:5]
    loaded = dcmqrscp.load(files)
    node = pacs_node_for(dcmqrscp, query_model=PacsNode.QueryModel.PATIENT_ROOT)
    [patient] = dimse.find(node, level="PATIENT", query={"PatientID": None,
                                                         "PatientName": None})
    assert patient.PatientID == "0000110231"
    assert dimse.find_instance_uids(node, study_uid=JP_STUDY) == loaded
    result = dimse.move(node, study_uid=JP_STUDY, destination_ae=scp_server.ae_title)
    assert result.completed == 5
    scp_server.wait_for_archived(facility, loaded)


# --- DICOM TLS --------------------------------------------------------------------------


def test_echo_over_dicom_tls_with_our_certificate(orthanc_tls, pacs_node_for):
    certificates = orthanc_tls.certificates
    node = pacs_node_for(orthanc_tls, tls_enabled=True,
                         tls_ca_file=str(certificates["ca.crt"]),
                         tls_cert_file=str(certificates["client.crt"]),
                         tls_key_file=str(certificates["client.key"]))
    dimse.echo(node)


def test_tls_failures_are_reported_not_hung(orthanc_tls, pacs_node_for, tmp_path):
    certificates = orthanc_tls.certificates
    # Without our certificate Orthanc refuses the handshake.
    node = pacs_node_for(orthanc_tls, tls_enabled=True, acse_timeout=5,
                         tls_ca_file=str(certificates["ca.crt"]))
    with pytest.raises(DimseError) as caught:
        dimse.echo(node)
    assert caught.value.kind in {"network", "aborted"}
    # A server certificate from a CA we do not trust is refused on our side.
    other = make_certificates(tmp_path / "other-ca")
    node = pacs_node_for(orthanc_tls, tls_enabled=True, acse_timeout=5,
                         tls_ca_file=str(other["ca.crt"]),
                         tls_cert_file=str(certificates["client.crt"]),
                         tls_key_file=str(certificates["client.key"]))
    with pytest.raises(DimseError) as caught:
        dimse.echo(node)
    assert caught.value.kind == "network"
    assert "TLS" in str(caught.value)
    # Plain DICOM to a TLS port gets nowhere, within the timeout.
    node = pacs_node_for(orthanc_tls, acse_timeout=3)
    started = time.monotonic()
    with pytest.raises(DimseError):
        dimse.echo(node)
    assert time.monotonic() - started < 6
