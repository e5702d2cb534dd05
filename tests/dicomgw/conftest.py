"""Real DICOM peers for the gateway tests, started on free ports and never mocked:
Orthanc (Debian package) and dcmtk's dcmqrscp as PACS, our own storage SCP, and
``PacsNode`` rows pointing at them. A missing binary fails the test; it does not skip.

Typical use::

    def test_move(orthanc, scp_server, pacs_node_for, facility, testdata_dir):
        uids = orthanc.upload_study(testdata_dir / "transfer_syntaxes_siemens_trio")
        node = pacs_node_for(orthanc)
        dimse.move(node, study_uid=..., destination_ae=scp_server.ae_title)
        archived = scp_server.wait_for_archived(facility, uids)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from pydicom import dcmread

from dicomgw.models import Instance, PacsNode
from dicomgw.scp import StorageSCP

ORTHANC = "/usr/sbin/Orthanc"
DCMTK_TOOLS = ("dcmqrscp", "storescu", "movescu", "findscu", "echoscu")
BASE_DIR = Path(__file__).resolve().parents[2]
# Debian's Orthanc and dcmtk leave Nagle's algorithm on unless told otherwise, which
# stalls every image by a delayed ACK (~40 ms).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"peer exited early:\n{log_path.read_text()[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"peer did not listen on {port}:\n{log_path.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a peer started in its own session, children included."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM Part 10 files under ``folder`` (a DICOMDIR excluded)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM" and path.name != "DICOMDIR":
            found.append(path)
    return found


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file without preamble and File Meta Information (PS3.10 7.1): the data
    set exactly as it was encoded. The meta group is each archive's own (implementation
    UID, source AE title); the data set must be the sender's, byte for byte."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL
    return data[144 + group_length:]


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# storescu proposes the uncompressed syntaxes (and converts between them) unless told
# which syntax to put first or which compressed one to add.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",  # Implicit VR Little Endian only
    "1.2.840.10008.1.2.1": "-xe",  # Explicit VR Little Endian first
    "1.2.840.10008.1.2.2": "-xb",  # Explicit VR Big Endian first
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
}


def storescu_batches(paths) -> list[tuple[list[str], list[Path]]]:
    """Files grouped by the storescu option that proposes their transfer syntax, so that
    each is sent as it is, never converted."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE.get(syntax, "-x="), []).append(path)
    return [([option], files) for option, files in groups.items()]


@pytest.fixture(scope="session")
def scp_port() -> int:
    """The port our storage SCP listens on in these tests; the peers know it as the
    C-MOVE destination "EXCHANGE" (settings.DICOM_AE_TITLE)."""
    return free_port()


# --- Orthanc ---------------------------------------------------------------------------


@dataclass
class OrthancPeer:
    ae_title: str
    port: int
    http: str
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    certificates: dict[str, Path] = field(default_factory=dict)

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json"):
        request = urllib.request.Request(f"{self.http}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return data

    def _json(self, method: str, path: str, payload=None):
        body = None if payload is None else json.dumps(payload).encode()
        data = self._call(method, path, body)
        return json.loads(data) if data else None

    def upload(self, path: Path) -> dict:
        """POST /instances: store one file as it is."""
        return json.loads(self._call("POST", "/instances", Path(path).read_bytes(),
                                     "application/dicom"))

    def upload_study(self, folder: Path) -> set[str]:
        """Upload every DICOM file under ``folder``; returns their SOP Instance UIDs."""
        uids = set()
        for path in dicom_files(Path(folder)):
            self.upload(path)
            uids.add(sop_instance_uid(path))
        return uids

    def instances(self) -> list[str]:
        return self._json("GET", "/instances")

    def file(self, orthanc_id: str) -> bytes:
        return self._call("GET", f"/instances/{orthanc_id}/file")

    def instance_ids(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id, for the instances of a study."""
        found = self._json("POST", "/tools/find", {
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in found}

    def sop_uids(self, study_uid: str) -> set[str]:
        return set(self.instance_ids(study_uid))

    def patient_name(self, patient_id: str) -> str:
        """The PatientName Orthanc's own index holds for a Patient ID."""
        [found] = self._json("POST", "/tools/find", {
            "Level": "Patient", "Query": {"PatientID": patient_id}, "Expand": True})
        return found["MainDicomTags"]["PatientName"]

    def transfer_syntax(self, orthanc_id: str) -> str:
        return self._call("GET", f"/instances/{orthanc_id}/metadata/TransferSyntax").decode()

    def delete_study(self, study_uid: str) -> None:
        found = self._json("POST", "/tools/find", {"Level": "Study",
                                                   "Query": {"StudyInstanceUID": study_uid}})
        for orthanc_id in found:
            self._call("DELETE", f"/studies/{orthanc_id}")

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Make a DICOM node known to Orthanc at runtime (a C-MOVE destination)."""
        self._json("PUT", f"/modalities/{name}",
                   {"AET": ae_title, "Host": host, "Port": port})


def start_orthanc(root: Path, *, scp_port: int, **config) -> OrthancPeer:
    """Start Orthanc with its state in ``root``; ``config`` adds or overrides options.
    Stop it with ``stop_process(peer.process)``."""
    assert Path(ORTHANC).exists(), "Orthanc is not installed (apt-get install orthanc)"
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    settings_ = {
        "Name": "test-pacs",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "Plugins": [],
        "HttpPort": http_port,
        "HttpCompressionEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {
            "exchange": [settings.DICOM_AE_TITLE, "127.0.0.1", scp_port],
        },
        "DicomScuTimeout": 30,
        "DicomAssociationCloseDelay": 0,
        "StableAge": 1,
        # Answer C-FIND in UTF-8: Orthanc's default (Latin-1) cannot carry a Japanese name.
        "DefaultEncoding": "Utf8",
        "SaveJobs": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        **config,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(settings_, indent=2))
    log_path = root / "orthanc.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=PEER_ENV,
                                start_new_session=True)
    peer = OrthancPeer(ae_title="ORTHANC", port=dicom_port,
                       http=f"http://127.0.0.1:{http_port}", process=proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"Orthanc exited:\n{log_path.read_text()[-3000:]}"
            try:
                peer._json("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
        wait_for_port(dicom_port, proc, log_path)
    except BaseException:
        stop_process(proc)
        raise
    return peer


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, scp_port) -> OrthancPeer:
    """Orthanc as a PACS: C-ECHO/FIND/MOVE/GET/STORE allowed from anyone, our SCP known
    as the C-MOVE destination "EXCHANGE". Its state lives for the module: tests use
    their own studies."""
    peer = start_orthanc(tmp_path_factory.mktemp("orthanc"), scp_port=scp_port)
    try:
        yield peer
    finally:
        stop_process(peer.process)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA, and a server and a client certificate it signed (for 127.0.0.1), made
    with the openssl command."""
    assert shutil.which("openssl"), "openssl is not installed"
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=Test DICOM CA", "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")
    return {name: folder / name for name in (
        "ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def orthanc_tls(tmp_path, scp_port) -> OrthancPeer:
    """Orthanc speaking DICOM TLS only (PS3.15 B.12), requiring a client certificate from
    the test CA; ``.certificates`` holds the CA and the client's certificate and key."""
    certificates = make_certificates(tmp_path / "tls")
    peer = start_orthanc(
        tmp_path / "orthanc-tls", scp_port=scp_port,
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(certificates["server.crt"]),
        DicomTlsPrivateKey=str(certificates["server.key"]),
        DicomTlsTrustedCertificates=str(certificates["ca.crt"]),
        DicomTlsRemoteCertificateRequired=True,
    )
    peer.certificates = certificates
    try:
        yield peer
    finally:
        stop_process(peer.process)


# --- dcmtk dcmqrscp ------------------------------------------------------------------


@dataclass
class DcmqrscpPeer:
    ae_title: str
    port: int
    storage: Path
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    # SOP Instance UID -> the file it was loaded from
    loaded: dict[str, Path] = field(default_factory=dict)

    def load(self, paths: list[Path]) -> set[str]:
        """Put files into the archive as they are (any transfer syntax) with dcmtk's
        dcmqridx, which indexes files placed in the storage area."""
        uids = set()
        copies = []
        for path in paths:
            uid = sop_instance_uid(path)
            copy = self.storage / f"{uid}.dcm"
            shutil.copyfile(path, copy)
            copies.append(copy)
            self.loaded[uid] = path
            uids.add(uid)
        result = subprocess.run(["dcmqridx", str(self.storage), *map(str, copies)],
                                env=PEER_ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return uids


@pytest.fixture
def dcmqrscp(tmp_path, scp_port) -> DcmqrscpPeer:
    """dcmtk's dcmqrscp as a second PACS (AE "DCMQRSCP"), with our SCP in its host table
    as "EXCHANGE" for C-MOVE; empty until ``.load(paths)``."""
    for tool in DCMTK_TOOLS:
        assert shutil.which(tool), f"dcmtk's {tool} is not installed (apt-get install dcmtk)"
    root = tmp_path / "dcmqrscp"
    storage = root / "storage"
    storage.mkdir(parents=True)
    port = free_port()
    config = root / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\n"
        "MaxPDUSize = 131072\n"
        "MaxAssociations = 16\n"
        "\n"
        "HostTable BEGIN\n"
        f"exchange = ({settings.DICOM_AE_TITLE}, 127.0.0.1, {scp_port})\n"
        "HostTable END\n"
        "\n"
        "VendorTable BEGIN\n"
        "VendorTable END\n"
        "\n"
        "AETable BEGIN\n"
        f"DCMQRSCP {storage} RW (500, 1024mb) ANY\n"
        "AETable END\n"
    )
    log_path = root / "dcmqrscp.log"
    with open(log_path, "w") as log:
        # Forking per association, as deployed (Debian's 3.6.7 crashes after the first
        # association with --single-process).
        proc = subprocess.Popen(["dcmqrscp", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV,
                                start_new_session=True, cwd=root)
    try:
        wait_for_port(port, proc, log_path)
        yield DcmqrscpPeer(ae_title="DCMQRSCP", port=port, storage=storage, process=proc)
    finally:
        stop_process(proc)


# --- Our storage SCP -----------------------------------------------------------------


@dataclass
class ScpHandle:
    scp: StorageSCP

    @property
    def ae_title(self) -> str:
        return self.scp.ae_title

    @property
    def host(self) -> str:
        return self.scp.host

    @property
    def port(self) -> int:
        return self.scp.port

    def refresh_nodes(self) -> None:
        """Take in PacsNode rows created since the SCP started (it re-reads them every
        few seconds on its own)."""
        self.scp.directory.refresh()

    def wait_for_archived(self, facility, sop_uids, timeout: float = 60) -> dict[str, Instance]:
        """Wait until every SOP Instance UID is archived for ``facility``."""
        wanted = set(sop_uids)
        deadline = time.monotonic() + timeout
        while True:
            found = {i.sop_instance_uid: i for i in Instance.objects.filter(
                facility=facility, sop_instance_uid__in=wanted)}
            if len(found) == len(wanted):
                return found
            if time.monotonic() > deadline:
                rejected = [p.name for p in self.scp.pool.rejected.iterdir()]
                raise AssertionError(
                    f"{len(wanted) - len(found)} of {len(wanted)} instances not archived "
                    f"after {timeout} s; waiting in spool: {self.scp.pool.pending}, "
                    f"set aside: {rejected}")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.scp.pool.pending:
            assert time.monotonic() < deadline, "SCP ingest did not finish"
            time.sleep(0.05)


@pytest.fixture
def scp_server(transactional_db, settings, scp_port) -> ScpHandle:
    """Our storage SCP in this process (a thread), on ``scp_port`` with the AE title of
    settings, filing into the test database and this test's storage. Uses
    ``transactional_db``: its threads see committed rows only."""
    scp = StorageSCP(host="127.0.0.1", port=scp_port, node_refresh_seconds=1)
    scp.start()
    try:
        yield ScpHandle(scp)
    finally:
        scp.stop(grace=5)


@pytest.fixture
def scp_process(transactional_db, tmp_path, settings):
    """Start ``manage.py runscp`` as a real process against the test database and this
    test's storage: ``scp_process(port, "--processes", "2")`` -> Popen. Stopped (SIGTERM)
    after the test."""
    from django.db import connection

    started = []

    def start(port: int, *args: str) -> subprocess.Popen:
        db = connection.settings_dict
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
            if connection.vendor == "postgresql" else f"sqlite:///{db['NAME']}",
            "STORAGE_ROOT": str(tmp_path / "storage"),
            "SPOOL_DIR": str(settings.SPOOL_DIR),
            "DICOM_SCP_NODE_REFRESH_SECONDS": "1",
        }
        log_path = tmp_path / f"runscp-{len(started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(BASE_DIR / "manage.py"), "runscp", "--host", "127.0.0.1",
                 "--port", str(port), *args],
                cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        wait_for_port(port, proc, log_path)
        proc.log_path = log_path
        return proc

    yield start
    for proc in started:
        stop_process(proc)


# --- Nodes -----------------------------------------------------------------------------


@pytest.fixture
def pacs_node_for(facility, request):
    """``pacs_node_for(peer, **fields)`` -> a saved PacsNode of ``facility`` pointing at
    a peer (anything with ``ae_title``, ``host`` and ``port``), short timeouts. When
    the test also runs ``scp_server``, the SCP learns of the node at once."""
    count = 0

    def make(peer, **fields) -> PacsNode:
        nonlocal count
        count += 1
        values = {
            "facility": facility, "name": f"{peer.ae_title} {count}",
            "ae_title": peer.ae_title, "host": getattr(peer, "host", "127.0.0.1"),
            "port": peer.port, "acse_timeout": 10, "dimse_timeout": 30,
            "network_timeout": 30, **fields,
        }
        node = PacsNode.objects.create(**values)
        if "scp_server" in request.fixturenames:
            request.getfixturevalue("scp_server").refresh_nodes()
        return node

    return make
