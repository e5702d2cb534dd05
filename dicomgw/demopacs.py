"""The demo PACS that ``make run`` starts next to the product, so a new installation has a
PACS to search and retrieve from: Orthanc when it is installed, otherwise a small
query/retrieve SCP of ours over the demo files.

Its studies come from the demo generator with a seed and dates of their own: the same
fictional patients as the archive's demo, but earlier exams that the archive does not
hold yet, so a retrieve has real work to do. Plain functions; ``manage.py demopacs``
runs them in the foreground."""

import ctypes
import fnmatch
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomgw.demo import DEFAULT_CT_SLICES, iter_demo_files

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
# Not the archive demo's seed (1729): other UIDs, so these are studies the archive lacks.
PACS_SEED = 2718
# The PACS studies are the patients' earlier exams: dated this much before the archive's.
PACS_DATES_EARLIER_BY = timedelta(days=2 * 365 + 30)
STARTUP_TIMEOUT = 60.0

Say = Callable[[str], None]


class DemoPacsError(Exception):
    """The demo PACS could not be prepared or started."""


@dataclass(frozen=True)
class DemoPacsConfig:
    root: Path  # var/demopacs: seed files, Orthanc's storage, config and log
    ae_title: str
    port: int
    http_port: int
    # Our storage SCP, the one C-MOVE destination the demo PACS knows.
    scp_ae_title: str
    scp_host: str
    scp_port: int
    seed: int = PACS_SEED
    ct_slices: int = DEFAULT_CT_SLICES
    # More C-MOVE destinations as (name, AE title, host, port): the benchmark's movescu.
    extra_modalities: tuple[tuple[str, str, str, int], ...] = ()

    @property
    def seed_dir(self) -> Path:
        return self.root / "seed"

    @property
    def orthanc_dir(self) -> Path:
        return self.root / "orthanc"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def orthanc_installed() -> bool:
    return os.access(ORTHANC_BINARY, os.X_OK)


# --- The demo files --------------------------------------------------------------------


def _pacs_accession(accession: str, seed: int) -> str:
    """An accession number of the PACS's own for an exam of the generator's cast: the
    last digits replaced, so it never equals the archive demo's exam's number."""
    tail = f"{seed % 10000:04d}"
    return accession[: -len(tail)] + tail


def seed_files(config: DemoPacsConfig, *, today: date, stop: threading.Event,
               say: Say) -> list[Path]:
    """The demo PACS's files under ``seed_dir``, generated on the first start only (a
    marker records a complete set; an interrupted generation starts over)."""
    marker = config.root / "seed.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        files = sorted(config.seed_dir.rglob("*.dcm"))
        if recorded.get("seed") == config.seed and len(files) == recorded.get("files"):
            return files
    shutil.rmtree(config.seed_dir, ignore_errors=True)
    marker.unlink(missing_ok=True)
    say(f"Generating the demo PACS studies into {config.seed_dir} (first start only)…")
    anchor = today - PACS_DATES_EARLIER_BY
    files = []
    for path in iter_demo_files(config.seed_dir, seed=config.seed,
                                ct_slices=config.ct_slices, anchor=anchor):
        ds = dcmread(path)
        ds.AccessionNumber = _pacs_accession(ds.AccessionNumber, config.seed)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        if stop.is_set():
            raise DemoPacsError("stopped while generating the demo studies")
    marker.write_text(json.dumps({"seed": config.seed, "files": len(files),
                                  "anchor": anchor.isoformat()}))
    return sorted(files)


# --- Orthanc ---------------------------------------------------------------------------


def orthanc_config(config: DemoPacsConfig) -> dict:
    """Orthanc's configuration for the demo. Orthanc 1.10 listens on every interface
    (it has no bind address), so its HTTP API refuses remote clients, and its DICOM side
    answers queries and retrieves for our AE title only and moves only to our SCP."""
    return {
        "Name": "Demo PACS",
        "StorageDirectory": str(config.orthanc_dir),
        "IndexDirectory": str(config.orthanc_dir),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": config.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": True,
        "DicomServerEnabled": True,
        "DicomAet": config.ae_title,
        "DicomPort": config.port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {
            "exchange": {"AET": config.scp_ae_title, "Host": config.scp_host,
                         "Port": config.scp_port},
            **{name: {"AET": ae_title, "Host": host, "Port": port}
               for name, ae_title, host, port in config.extra_modalities},
        },
        # The largest PDU Orthanc offers when it receives (PS3.8 D.1); its default 16 KiB
        # slows every push into it.
        "MaximumPduLength": 131072,
        # Answer C-FIND from the index; open the files only for attributes it lacks.
        "StorageAccessOnFind": "Answers",
        "SyncStorageArea": False,
        "SaveJobs": False,
        "OverwriteInstances": False,
        # Close the association to a C-MOVE destination when the move ends, rather than
        # keep it 5 s for reuse: a destination that stopped meanwhile (a movescu, a
        # restarted SCP) is never offered a dead association.
        "DicomAssociationCloseDelay": 0,
    }


def write_orthanc_config(config: DemoPacsConfig) -> Path:
    config.orthanc_dir.mkdir(parents=True, exist_ok=True)
    path = config.root / "orthanc.json"
    path.write_text(json.dumps(orthanc_config(config), indent=2))
    return path


def _die_with_parent() -> None:
    """Run in the child before exec: Linux sends it SIGTERM if we die first, so a killed
    demopacs never leaves an Orthanc holding the ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_orthanc(config: DemoPacsConfig) -> subprocess.Popen:
    """Start Orthanc on the generated configuration, logging to ``orthanc.log``.
    ``TCP_NODELAY=1`` switches Nagle's algorithm off in Debian's build, which otherwise
    holds back the last segment of every message by about 40 ms."""
    config_path = write_orthanc_config(config)
    env = {**os.environ, "TCP_NODELAY": "1"}
    with open(config.root / "orthanc.log", "ab") as log:
        return subprocess.Popen(
            [str(ORTHANC_BINARY), str(config_path)], cwd=config.root, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


class OrthancApi:
    """Orthanc's REST API on 127.0.0.1 over one kept-alive connection."""

    def __init__(self, port: int, *, timeout: float = 30.0):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def close(self) -> None:
        self.connection.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> object:
        headers = {"Content-Type": "application/dicom"} if body is not None else {}
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise DemoPacsError(f"Orthanc answered {response.status} to {method} {path}")
        return json.loads(payload) if payload else None


def _log_tail(config: DemoPacsConfig, lines: int = 8) -> str:
    try:
        text = (config.root / "orthanc.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for_orthanc(config: DemoPacsConfig, process: subprocess.Popen, *,
                     stop: threading.Event, timeout: float = STARTUP_TIMEOUT) -> None:
    """Return once Orthanc answers on HTTP and accepts TCP on its DICOM port."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        if process.poll() is not None:
            raise DemoPacsError(f"Orthanc exited with status {process.returncode}:\n"
                                f"{_log_tail(config)}")
        try:
            api = OrthancApi(config.http_port, timeout=2)
            try:
                api.request("GET", "/system")
            finally:
                api.close()
            with socket.create_connection(("127.0.0.1", config.port), timeout=2):
                return
        except (OSError, DemoPacsError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise DemoPacsError(f"Orthanc did not start within {timeout:.0f} s:\n"
                                    f"{_log_tail(config)}") from None
            time.sleep(0.2)
    raise DemoPacsError("stopped while Orthanc was starting")


def orthanc_load(config: DemoPacsConfig, files: list[Path], *, stop: threading.Event,
                 say: Say) -> int:
    """Store the demo files in Orthanc once. A marker remembers a complete load; if
    Orthanc holds fewer instances than it records (its storage was wiped), load again.
    Loading twice is harmless: Orthanc answers AlreadyStored."""
    marker = config.root / "loaded.json"
    api = OrthancApi(config.http_port)
    try:
        held = api.request("GET", "/statistics")["CountInstances"]
        if marker.is_file():
            recorded = json.loads(marker.read_text())
            if recorded.get("seed") == config.seed and held >= recorded.get("instances", 0):
                return 0
        say(f"Loading {len(files)} demo images into the demo PACS…")
        for path in files:
            if stop.is_set():
                raise DemoPacsError("stopped while loading the demo studies")
            answer = api.request("POST", "/instances", path.read_bytes())
            if answer.get("Status") not in {"Success", "AlreadyStored"}:
                raise DemoPacsError(f"Orthanc did not store {path.name}: {answer}")
    finally:
        api.close()
    marker.write_text(json.dumps({"seed": config.seed, "instances": len(files)}))
    return len(files)


def orthanc_study_count(config: DemoPacsConfig) -> int:
    api = OrthancApi(config.http_port)
    try:
        return api.request("GET", "/statistics")["CountStudies"]
    finally:
        api.close()


def stop_process(process: subprocess.Popen, *, timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_orthanc(config: DemoPacsConfig, files: list[Path], *, stop: threading.Event,
                say: Say) -> int:
    """Run Orthanc with the demo studies until ``stop`` is set or Orthanc exits; return
    an exit status."""
    process = start_orthanc(config)
    try:
        wait_for_orthanc(config, process, stop=stop)
        orthanc_load(config, files, stop=stop, say=say)
        say(f"Demo PACS (Orthanc) {config.ae_title} on 127.0.0.1:{config.port}, "
            f"{orthanc_study_count(config)} studies; Orthanc Explorer at "
            f"http://127.0.0.1:{config.http_port}/app/explorer.html")
        while not stop.wait(0.5):
            if process.poll() is not None:
                say(f"Orthanc exited with status {process.returncode}:\n{_log_tail(config)}")
                return process.returncode or 1
        return 0
    finally:
        stop_process(process)


# --- Without Orthanc: a small query/retrieve SCP of ours -------------------------------

# The attributes of each query level (PS3.4 C.6.1.1 / C.6.2.1), lower levels including
# the unique keys of the levels above (and, for Study Root, the patient's attributes).
LEVEL_KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("PatientID", "StudyInstanceUID"),
    "SERIES": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
# Keys we compute per group rather than read from a file (PS3.4 C.3.4).
COMPUTED_KEYS = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
              "ModalitiesInStudy"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": (),
}


@dataclass(frozen=True)
class IndexedFile:
    path: Path
    header: Dataset  # everything but the pixel data


def index_files(paths: Iterable[Path]) -> list[IndexedFile]:
    return [IndexedFile(path, dcmread(path, stop_before_pixels=True)) for path in paths]


def _records(index: list[IndexedFile], level: str) -> Iterator[Dataset]:
    """One record per entity at ``level``: the first file's attributes plus the computed
    counts."""
    groups: dict[tuple, list[IndexedFile]] = {}
    for item in index:
        key = tuple(str(item.header.get(name, "")) for name in LEVEL_KEYS[level])
        groups.setdefault(key, []).append(item)
    for members in groups.values():
        record = Dataset()
        record.update(members[0].header)
        studies = {m.header.StudyInstanceUID for m in members}
        series = {m.header.SeriesInstanceUID for m in members}
        counts = {
            "NumberOfPatientRelatedStudies": len(studies),
            "NumberOfPatientRelatedSeries": len(series),
            "NumberOfPatientRelatedInstances": len(members),
            "NumberOfStudyRelatedSeries": len(series),
            "NumberOfStudyRelatedInstances": len(members),
            "NumberOfSeriesRelatedInstances": len(members),
            "ModalitiesInStudy": sorted({m.header.Modality for m in members}),
        }
        for name in COMPUTED_KEYS[level]:
            setattr(record, name, counts[name])
        yield record


def _values(element_value) -> list[str]:
    if element_value is None:
        return [""]
    if isinstance(element_value, MultiValue | list | tuple):
        return [str(v) for v in element_value]
    return [str(element_value)]


def value_matches(vr: str, query: str, values: list[str]) -> bool:
    """Attribute matching of PS3.4 C.2.2.2: universal (empty), list of UIDs, range (dates
    and times), wildcard (* and ?) and single value; person names without regard to
    case."""
    query = query.strip()
    if not query or query == "*":
        return True
    values = [v.strip() for v in values]
    if vr == "UI":
        return any(v in query.split("\\") for v in values)
    if vr in {"DA", "TM", "DT"} and "-" in query:
        low, _, high = query.partition("-")
        return any(v and (not low or v >= low) and (not high or v[: len(high)] <= high)
                   for v in values)
    if vr == "PN":
        query, values = query.lower(), [v.lower() for v in values]
    if "*" in query or "?" in query:
        pattern = re.compile(fnmatch.translate(query), re.DOTALL)
        return any(pattern.fullmatch(v) for v in values)
    return query in values


def find_matches(index: list[IndexedFile], identifier: Dataset) -> Iterator[Dataset]:
    """The C-FIND responses for ``identifier``: every requested attribute filled from
    the matching records."""
    level = str(identifier.get("QueryRetrieveLevel", "")).upper()
    if level not in LEVEL_KEYS:
        raise ValueError(f"unsupported query level {level!r}")
    requested = [elem for elem in identifier if elem.keyword not in
                 {"QueryRetrieveLevel", "SpecificCharacterSet"}]
    for record in _records(index, level):
        if not all(
            value_matches(elem.VR, str(elem.value or ""), _values(record.get(elem.keyword)))
            if elem.keyword in record else not str(elem.value or "").strip()
            for elem in requested if elem.VR != "SQ"
        ):
            continue
        answer = Dataset()
        answer.QueryRetrieveLevel = level
        if "SpecificCharacterSet" in record:
            answer.SpecificCharacterSet = record.SpecificCharacterSet
        for elem in requested:
            if elem.keyword in record:
                answer[elem.tag] = record[elem.tag]
            else:
                answer.add_new(elem.tag, elem.VR, None)
        yield answer


def handle_echo(event) -> int:
    return 0x0000


def handle_find(event, index: list[IndexedFile]):
    """C-FIND SCP (PS3.4 C.4.1): a pending response per match, then success."""
    try:
        matches = list(find_matches(index, event.identifier))
    except ValueError:
        yield 0xA900, None  # Identifier does not match SOP Class
        return
    for answer in matches:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield 0xFF00, answer


def handle_move(event, index: list[IndexedFile], destinations: dict[str, tuple[str, int]]):
    """C-MOVE SCP (PS3.4 C.4.2): only to a known destination AE (0xA801 otherwise),
    sending the matching files as they are stored."""
    destination = destinations.get(str(event.move_destination).strip())
    if destination is None:
        yield None, None
        return
    yield destination
    try:
        wanted = {str(a.SOPInstanceUID) for a in find_matches(index, _image_level(event))}
    except ValueError:
        yield 1
        yield 0xA900, None  # Identifier does not match SOP Class
        return
    files = [item for item in index if item.header.SOPInstanceUID in wanted]
    yield len(files)
    for item in files:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield 0xFF00, dcmread(item.path)


def _image_level(event) -> Dataset:
    """The move identifier as an IMAGE-level query returning the SOP Instance UIDs."""
    query = Dataset()
    query.update(event.identifier)
    query.QueryRetrieveLevel = "IMAGE"
    if "SOPInstanceUID" not in query:
        query.SOPInstanceUID = ""
    return query


def start_qr_scp(config: DemoPacsConfig, index: list[IndexedFile]):
    """Start the query/retrieve SCP on 127.0.0.1 in background threads; queries and
    retrieves are served to our AE title only."""
    ae = AE(ae_title=config.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = [config.scp_ae_title]
    ae.maximum_pdu_size = 131072
    for sop_class in (Verification, StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelMove,
                      PatientRootQueryRetrieveInformationModelFind,
                      PatientRootQueryRetrieveInformationModelMove):
        ae.add_supported_context(sop_class)
    for sop_class_uid in sorted({item.header.SOPClassUID for item in index}):
        ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian,
                                                 ImplicitVRLittleEndian])
    destinations = {config.scp_ae_title: (config.scp_host, config.scp_port)}
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_FIND, handle_find, [index]),
        (evt.EVT_C_MOVE, handle_move, [index, destinations]),
    ]
    return ae.start_server(("127.0.0.1", config.port), block=False, evt_handlers=handlers)


def run_qr_scp(config: DemoPacsConfig, files: Iterable[Path], *, stop: threading.Event,
               say: Say) -> int:
    index = index_files(files)
    server = start_qr_scp(config, index)
    try:
        studies = {item.header.StudyInstanceUID for item in index}
        say(f"Demo PACS (pynetdicom Q/R SCP; Orthanc is not installed) {config.ae_title} "
            f"on 127.0.0.1:{config.port}, {len(studies)} studies")
        stop.wait()
        return 0
    finally:
        server.shutdown()
