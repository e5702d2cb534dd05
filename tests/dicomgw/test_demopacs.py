"""The demo PACS that ``make run`` starts (``manage.py demopacs``): Orthanc on free ports
holding generated demo studies the archive does not have, answering C-ECHO, C-FIND and
C-MOVE to our SCP's AE title, and stopping on SIGTERM; and the small Q/R SCP of ours
that stands in when Orthanc is not installed."""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomgw import demo
from dicomgw.demopacs import PACS_SEED, free_port, orthanc_installed, value_matches
from dicomgw.models import PacsNode
from pockethealth.models import Facility

BASE_DIR = Path(__file__).resolve().parents[2]
CT_SLICES = 6
# Images of the demo set with a CT of CT_SLICES: 2 MR studies (3x24 and 2x20), 2 CR x 2.
DEMO_IMAGES = CT_SLICES + 72 + 40 + 4
READY = "Demo PACS ("
STOPPED = "Demo PACS stopped."


class DemoPacs:
    """``manage.py demopacs`` as a child process on free ports, its output collected."""

    def __init__(self, root: Path, *extra: str, port: int | None = None,
                 scp_port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.http_port = free_port()
        self.scp_port = scp_port or free_port()
        env = {**os.environ, "PH_VAR_DIR": str(root / "var"), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), "demopacs",
             "--dir", str(root / "demopacs"), "--port", str(self.port),
             "--http-port", str(self.http_port), "--scp-port", str(self.scp_port),
             "--ct-slices", str(CT_SLICES), *extra],
            cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from demopacs; output:\n" + "\n".join(self.lines))

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.wait_for(STOPPED, timeout=30)
        finally:
            status = self.process.wait(timeout=30)
        return status

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_demopacs(tmp_path):
    started = []
    assert shutil.which("echoscu") and shutil.which("storescp"), "dcmtk is required"

    def start(*extra: str, **ports) -> DemoPacs:
        if "pynetdicom" not in extra:
            assert orthanc_installed(), "Orthanc (Debian package orthanc) is required"
        pacs = DemoPacs(tmp_path, *extra, **ports)
        started.append(pacs)
        pacs.wait_for(READY)
        return pacs

    yield start
    for pacs in started:
        pacs.kill()


def processes_mentioning(text: str) -> list[int]:
    """Pids of the running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def c_find(port: int, level: str, model=StudyRootQueryRetrieveInformationModelFind,
           calling: str = settings.DICOM_AE_TITLE, **keys) -> list[Dataset]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=settings.DEMO_PACS_AE_TITLE)
    assert assoc.is_established, "the demo PACS refused the association"
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    answers = []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            assert status is not None, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            else:
                assert status.Status == 0x0000
    finally:
        assoc.release()
    return answers


def c_move(port: int, destination: str, **keys) -> tuple[int, int, int]:
    """C-MOVE as our AE title; returns (completed, failed, status) of the final response."""
    model = StudyRootQueryRetrieveInformationModelMove
    ae = AE(ae_title=settings.DICOM_AE_TITLE)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=settings.DEMO_PACS_AE_TITLE)
    assert assoc.is_established
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    final = None
    try:
        for status, _ in assoc.send_c_move(query, destination, model):
            assert status is not None, "no C-MOVE response"
            final = status
    finally:
        assoc.release()
    return (int(final.get("NumberOfCompletedSuboperations", 0)),
            int(final.get("NumberOfFailedSuboperations", 0)), int(final.Status))


def echoscu(port: int, calling: str = "ANYSCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", settings.DEMO_PACS_AE_TITLE, "127.0.0.1",
         str(port)], capture_output=True, text=True, timeout=30,
    )


@pytest.fixture
def storescp(tmp_path):
    """dcmtk's storescp standing in for our storage SCP as the C-MOVE destination."""
    received = tmp_path / "received"
    received.mkdir()
    running = []

    def start(port: int) -> Path:
        process = subprocess.Popen(
            ["storescp", "--aetitle", settings.DICOM_AE_TITLE, "-od", str(received), "+xa",
             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        running.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["echoscu", "127.0.0.1", str(port)],
                              capture_output=True).returncode == 0:
                return received
            time.sleep(0.1)
        raise AssertionError("storescp did not start")

    yield start
    for process in running:
        process.terminate()
        process.wait(timeout=10)


def archive_demo_study_uids() -> set[str]:
    return {demo.demo_uid(demo.DEFAULT_SEED, study.key) for study in demo.DEMO_STUDIES}


def test_orthanc_demo_pacs_answers_echo_and_find_with_studies_the_archive_lacks(
        start_demopacs, tmp_path):
    pacs = start_demopacs()
    assert "(Orthanc)" in pacs.lines[-1]
    assert f"127.0.0.1:{pacs.port}" in pacs.lines[-1]

    assert echoscu(pacs.port).returncode == 0

    studies = c_find(pacs.port, "STUDY", PatientName="*", StudyInstanceUID="",
                     AccessionNumber="", StudyDate="", ModalitiesInStudy="",
                     NumberOfStudyRelatedInstances="")
    assert len(studies) == len(demo.DEMO_STUDIES)
    assert {s.StudyInstanceUID for s in studies} == {
        demo.demo_uid(PACS_SEED, study.key) for study in demo.DEMO_STUDIES}
    assert not {s.StudyInstanceUID for s in studies} & archive_demo_study_uids()
    assert not {s.AccessionNumber for s in studies} & {s.accession for s in demo.DEMO_STUDIES}
    assert sum(int(s.NumberOfStudyRelatedInstances) for s in studies) == DEMO_IMAGES
    assert sorted(s.ModalitiesInStudy for s in studies) == ["CR", "CR", "CT", "MR", "MR"]

    ct = c_find(pacs.port, "STUDY", PatientName="TREMBLAY*", ModalitiesInStudy="CT",
                StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    assert [int(s.NumberOfStudyRelatedInstances) for s in ct] == [CT_SLICES]
    images = c_find(pacs.port, "IMAGE", StudyInstanceUID=ct[0].StudyInstanceUID,
                    SeriesInstanceUID="", SOPInstanceUID="")
    assert len(images) == CT_SLICES

    config = str(tmp_path / "demopacs" / "orthanc.json")
    assert processes_mentioning(config)
    assert pacs.terminate() == 0
    assert not processes_mentioning(config)


def test_orthanc_demo_pacs_serves_queries_to_our_ae_title_only(start_demopacs):
    pacs = start_demopacs()
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title=settings.DEMO_PACS_AE_TITLE)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    answers = []
    try:
        if assoc.is_established:
            # Orthanc refuses the request by breaking off the association.
            answers = [identifier for status, identifier in
                       assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                       if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        if assoc.is_established:
            assoc.release()
    assert answers == []
    assert c_find(pacs.port, "STUDY", StudyInstanceUID="")
    assert pacs.terminate() == 0


def test_orthanc_demo_pacs_moves_a_study_to_our_scp_ae_title(start_demopacs, storescp):
    pacs = start_demopacs()
    received = storescp(pacs.scp_port)
    [ct] = c_find(pacs.port, "STUDY", ModalitiesInStudy="CT", StudyInstanceUID="")

    completed, failed, status = c_move(pacs.port, settings.DICOM_AE_TITLE,
                                       QueryRetrieveLevel="STUDY",
                                       StudyInstanceUID=ct.StudyInstanceUID)

    assert (completed, failed, status) == (CT_SLICES, 0, 0x0000)
    files = list(received.iterdir())
    assert len(files) == CT_SLICES
    assert {dcmread(f).StudyInstanceUID for f in files} == {ct.StudyInstanceUID}
    assert c_move(pacs.port, "ELSEWHERE", QueryRetrieveLevel="STUDY",
                  StudyInstanceUID=ct.StudyInstanceUID)[2] != 0x0000
    assert pacs.terminate() == 0


def test_second_start_neither_regenerates_nor_reloads(start_demopacs):
    first = start_demopacs()
    assert any("Generating" in line for line in first.lines)
    assert any("Loading" in line for line in first.lines)
    seeded = sorted((first.root / "demopacs" / "seed").rglob("*.dcm"))
    stamps = [p.stat().st_mtime_ns for p in seeded]
    assert first.terminate() == 0

    second = start_demopacs()
    assert not any("Generating" in line or "Loading" in line for line in second.lines)
    assert [p.stat().st_mtime_ns for p in seeded] == stamps
    assert len(c_find(second.port, "STUDY", StudyInstanceUID="")) == len(demo.DEMO_STUDIES)
    assert second.terminate() == 0


def test_sigterm_while_generating_stops_promptly(tmp_path):
    pacs = DemoPacs(tmp_path)
    try:
        pacs.wait_for("Generating")
        started = time.monotonic()
        pacs.process.send_signal(signal.SIGTERM)
        assert pacs.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        pacs.kill()
    assert not processes_mentioning(str(tmp_path / "demopacs" / "orthanc.json"))


# --- Without Orthanc: our own small Q/R SCP ---------------------------------------------


def test_fallback_qr_scp_answers_echo_find_and_moves_to_our_scp(start_demopacs, storescp):
    pacs = start_demopacs("--engine", "pynetdicom")
    assert "pynetdicom" in pacs.lines[-1]
    assert echoscu(pacs.port, calling=settings.DICOM_AE_TITLE).returncode == 0
    assert echoscu(pacs.port, calling="STRANGER").returncode != 0

    studies = c_find(pacs.port, "STUDY", StudyInstanceUID="", ModalitiesInStudy="",
                     NumberOfStudyRelatedInstances="", PatientName="")
    assert {s.StudyInstanceUID for s in studies} == {
        demo.demo_uid(PACS_SEED, study.key) for study in demo.DEMO_STUDIES}
    assert sum(int(s.NumberOfStudyRelatedInstances) for s in studies) == DEMO_IMAGES
    patients = c_find(pacs.port, "PATIENT", PatientRootQueryRetrieveInformationModelFind,
                      PatientName="okafor*", PatientID="", NumberOfPatientRelatedStudies="")
    assert [(p.PatientID, int(p.NumberOfPatientRelatedStudies)) for p in patients] == [
        (demo.OKAFOR.patient_id, 1)]
    [mr] = c_find(pacs.port, "STUDY", PatientID=demo.OKAFOR.patient_id, StudyInstanceUID="")
    series = c_find(pacs.port, "SERIES", StudyInstanceUID=mr.StudyInstanceUID,
                    SeriesInstanceUID="", Modality="", NumberOfSeriesRelatedInstances="")
    assert sorted(int(s.NumberOfSeriesRelatedInstances) for s in series) == [24, 24, 24]

    received = storescp(pacs.scp_port)
    completed, failed, status = c_move(pacs.port, settings.DICOM_AE_TITLE,
                                       QueryRetrieveLevel="SERIES",
                                       StudyInstanceUID=mr.StudyInstanceUID,
                                       SeriesInstanceUID=series[0].SeriesInstanceUID)
    assert (completed, failed, status) == (24, 0, 0x0000)
    originals = {ds.SOPInstanceUID: ds.PixelData for ds in map(
        dcmread, (pacs.root / "demopacs" / "seed").rglob("*.dcm"))}
    moved = [dcmread(path) for path in received.iterdir()]
    assert len(moved) == 24
    for ds in moved:
        assert ds.SeriesInstanceUID == series[0].SeriesInstanceUID
        assert ds.PixelData == originals[ds.SOPInstanceUID]
    assert c_move(pacs.port, "ELSEWHERE", QueryRetrieveLevel="STUDY",
                  StudyInstanceUID=mr.StudyInstanceUID)[2] == 0xA801
    assert pacs.terminate() == 0


@pytest.mark.parametrize(("vr", "query", "values", "expected"), [
    ("PN", "", ["Okafor^Daniel"], True),
    ("PN", "okafor*", ["Okafor^Daniel"], True),
    ("PN", "OKAF?R^DANIEL", ["Okafor^Daniel"], True),
    ("PN", "Nguyen*", ["Okafor^Daniel"], False),
    ("UI", "1.2.3\\1.2.4", ["1.2.4"], True),
    ("UI", "1.2.3", ["1.2.30"], False),
    ("DA", "20240101-20241231", ["20240615"], True),
    ("DA", "-20231231", ["20240615"], False),
    ("DA", "20240101-", ["20240615"], True),
    ("CS", "CT", ["CR", "CT"], True),
    ("CS", "MR", ["CR", "CT"], False),
    ("SH", "LR2051*", ["LR20512718"], True),
])
def test_fallback_attribute_matching_follows_ps3_4_c_2_2_2(vr, query, values, expected):
    assert value_matches(vr, query, values) is expected


# --- demo_setup registers the demo PACS --------------------------------------------------


@pytest.mark.django_db
def test_demo_setup_registers_the_demo_pacs_for_the_demo_facility():
    call_command("demo_setup", "--no-studies", stdout=StringIO())
    call_command("demo_setup", "--no-studies", stdout=StringIO())

    facility = Facility.objects.get(short_name="lakeshore")
    node = PacsNode.objects.get(facility=facility)
    assert node.name == "Demo PACS"
    assert (node.ae_title, node.host, node.port) == (
        settings.DEMO_PACS_AE_TITLE, "127.0.0.1", settings.DEMO_PACS_PORT)
    assert node.may_send and node.is_active


@pytest.mark.parametrize("engine", ["orthanc", "pynetdicom"])
def test_a_study_of_the_demo_pacs_retrieves_into_our_scp_through_the_demo_node(
        engine, start_demopacs, scp_server, settings):
    """What ``make run`` sets up: demo_setup's node for the demo PACS, our SCP accepting
    the demo PACS's C-MOVE association, the images archived for the demo facility."""
    from dicomgw import dimse

    settings.DEMO_PACS_PORT = free_port()
    call_command("demo_setup", "--no-studies", stdout=StringIO())
    scp_server.refresh_nodes()
    node = PacsNode.objects.get(name="Demo PACS")
    start_demopacs("--engine", engine, port=settings.DEMO_PACS_PORT,
                   scp_port=scp_server.port)

    dimse.echo(node)
    [ct] = dimse.find(node, level="STUDY", query={"ModalitiesInStudy": "CT",
                                                  "StudyInstanceUID": None})
    uids = dimse.find_instance_uids(node, study_uid=ct.StudyInstanceUID)
    assert len(uids) == CT_SLICES
    result = dimse.move(node, study_uid=ct.StudyInstanceUID,
                        destination_ae=dimse.move_destination(node))

    assert (result.completed, result.failed) == (CT_SLICES, 0)
    archived = scp_server.wait_for_archived(node.facility, uids)
    assert {i.series.study.study_instance_uid for i in archived.values()} == {
        ct.StudyInstanceUID}
