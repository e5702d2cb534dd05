"""The client (SCU) side of the DICOM gateway: C-ECHO, C-FIND, C-MOVE, C-GET and C-STORE
against a facility's ``PacsNode``.

Every call opens its own association with the node's settings (AE titles, timeouts,
maximum PDU, TLS), releases it (or aborts it after an error) in ``finally``, and turns
whatever went wrong into a ``DimseError`` whose text a clerk can act on. Nothing here
touches the database except ``get``, which ingests the instances it receives, and it
does so on the calling thread, never in a pynetdicom handler."""

import contextlib
import ipaddress
import logging
import os
import queue
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .models import IngestSource, Instance, PacsNode
from .services import DicomGatewayError, ingest_file, quiet_pydicom_reading

log = logging.getLogger(__name__)

# The identifiers of C-FIND responses are read with pydicom: quietly (see
# ``quiet_pydicom_reading``).
quiet_pydicom_reading()
# pynetdicom's "standard" handlers log every PDU and DIMSE message, identifiers (names,
# IDs, birth dates) included, and cost CPU on every fragment of every image; the
# gateway logs its own outcomes, without PHI.
_config.LOG_HANDLER_LEVEL = "none"
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# C-STORE from a file path sends the stored bytes as they are, in chunks of the peer's
# PDU size, without decoding and re-encoding them: what leaves must match the SHA-256.
_config.STORE_SEND_CHUNKED_DATASET = True

# --- Status codes (PS3.7 Annex C, PS3.4 C.4 and B.2.3) ------------------------------

SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = frozenset({0xFF00, 0xFF01})
# C-MOVE / C-GET: "Sub-operations complete, one or more failures or warnings".
SUB_OPERATIONS_WARNING = 0xB000
# Final C-MOVE / C-GET statuses after which the sub-operations speak for themselves.
RETRIEVE_DONE = frozenset({SUCCESS, SUB_OPERATIONS_WARNING, CANCEL})
# C-MOVE: the PACS does not know the destination AE title (PS3.4 C.4.2.1.4.1).
MOVE_DESTINATION_UNKNOWN = 0xA801

# Files a C-GET spooled and did not ingest (the process died) are removed after this.
GET_SPOOL_MAX_AGE = 24 * 3600

# Largest number of presentation contexts one association may propose (PS3.8 9.3.2.2:
# odd context IDs 1-255).
MAX_CONTEXTS = 128

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

UNCOMPRESSED = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})

# A retrieve over C-GET proposes, for each SOP class, each of these syntaxes in a
# context of its own, so that the PACS can send every instance in the syntax it holds
# (the acceptor picks one transfer syntax per context, PS3.8 9.3.3.2).
GET_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian

    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)

_DIAGNOSTICS = {
    # (source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4)
    (1, 1): "no reason given",
    (1, 2): "application context not supported",
    (1, 3): "calling AE not recognised",
    (1, 7): "called AE not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "too many associations",
}


class DimseError(DicomGatewayError):
    """A DICOM exchange with a PACS node failed. ``kind`` says how:

    - ``refused``: nothing accepted the TCP connection;
    - ``timeout``: the PACS did not answer within the node's timeouts (or a search ran
      past its time limit and was cancelled);
    - ``rejected``: the PACS rejected the association (A-ASSOCIATE-RJ);
    - ``aborted``: the PACS broke off the association, or closed the connection;
    - ``network``: the host cannot be found or reached, or TLS failed;
    - ``failed``: the PACS answered with a failure status.

    ``str()`` is a plain sentence for a clerk. ``status`` is the DIMSE status when
    there was one; ``sub_operations`` the last counts a C-MOVE/C-GET reported."""

    KINDS = frozenset({"refused", "timeout", "rejected", "aborted", "network", "failed"})

    def __init__(self, message: str, *, kind: str, status: int | None = None,
                 sub_operations: "SubOperations | None" = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown DimseError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.sub_operations = sub_operations


@dataclass
class SubOperations:
    """The progress of a C-MOVE or C-GET as the PACS reports it (PS3.4 C.4.2.3.1,
    C.4.3.3.1). ``remaining`` is None when the response does not carry it (final
    responses may leave counts out); ``failed_uids`` comes from the Failed SOP Instance
    UID List (0008,0058) where the PACS gives one."""

    completed: int = 0
    remaining: int | None = None
    failed: int = 0
    warning: int = 0
    status: int | None = None
    failed_uids: list[str] = field(default_factory=list)


# --- Building associations ---------------------------------------------------------


def calling_ae_title(node: PacsNode) -> str:
    return node.calling_ae_title or settings.DICOM_AE_TITLE


def move_destination(node: PacsNode) -> str:
    """The AE title under which ``node`` knows our storage SCP."""
    return node.move_destination or calling_ae_title(node)


def _where(node: PacsNode) -> str:
    return f"{node.host}:{node.port}"


def _tls_context(node: PacsNode) -> ssl.SSLContext:
    """A client context for DICOM TLS (PS3.15 B.12/B.13, which defer to BCP 195): TLS
    1.2 or later, the server's certificate checked against the node's CA (or the
    system's), and our certificate when the node asks for one."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=node.tls_ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if node.tls_cert_file:
            context.load_cert_chain(node.tls_cert_file, node.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise DimseError(
            f"The TLS certificate or key files set for {node.name} cannot be used "
            f"({exc.strerror or exc})", kind="failed",
        ) from None
    return context


def _resolve(node: PacsNode) -> str:
    """The node's first address, so that a name that does not resolve gets its own
    message instead of a vague connection failure."""
    try:
        ipaddress.ip_address(node.host)
        return node.host
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(node.host, node.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DimseError(f"The PACS host name {node.host} cannot be found (DNS)",
                         kind="network") from None
    return infos[0][4][0]


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn off Nagle's algorithm: with it, the last small PDU of every message waits
    for the peer's delayed ACK, about 40 ms per image."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_conn_open(event, opened: threading.Event) -> None:
    """EVT_CONN_OPEN: the TCP connection is up."""
    set_nodelay(event.assoc.dul.socket.socket)
    opened.set()


def _application_entity(node: PacsNode) -> AE:
    ae = AE(ae_title=calling_ae_title(node))
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    # Connecting is part of setting up the association.
    ae.connection_timeout = node.acse_timeout
    return ae


@contextlib.contextmanager
def _association(node: PacsNode, contexts: list[PresentationContext], *,
                 ext_neg=None, handlers=()) -> Iterator:
    """An established association with ``node``, released on the way out, or aborted
    if the body raised."""
    address = _resolve(node)
    tls_args = (_tls_context(node), node.host) if node.tls_enabled else None
    ae = _application_entity(node)
    opened = threading.Event()
    started = time.monotonic()
    assoc = ae.associate(
        address, node.port, contexts=contexts, ae_title=node.ae_title,
        max_pdu=node.max_pdu, ext_neg=ext_neg, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open, [opened]), *handlers],
    )
    clean = False
    try:
        if not assoc.is_established:
            raise _association_failure(node, assoc, address=address, opened=opened.is_set(),
                                       elapsed=time.monotonic() - started)
        yield assoc
        clean = True
    finally:
        if assoc.is_established:
            if clean:
                assoc.release()
            else:
                assoc.abort()


def _association_failure(node: PacsNode, assoc, *, address: str, opened: bool,
                         elapsed: float) -> DimseError:
    if not opened:
        return _connect_failure(node, address, elapsed)
    if assoc.is_rejected:
        response = assoc.acceptor.primitive
        source, diagnostic = response.result_source, response.diagnostic
        reason = _DIAGNOSTICS.get((source, diagnostic), "no reason given")
        if (source, diagnostic) == (1, 3):
            text = f"The PACS rejected our AE title {calling_ae_title(node)} ({reason})"
        elif (source, diagnostic) == (1, 7):
            text = (f"The PACS at {_where(node)} does not answer to the AE title "
                    f"{node.ae_title} ({reason})")
        else:
            text = f"The PACS at {_where(node)} rejected the association ({reason})"
        if response.result == 0x02:
            text += "; it may accept a later attempt"
        return DimseError(text, kind="rejected")
    if elapsed >= node.acse_timeout * 0.9:
        return DimseError(f"No answer from the PACS within {node.acse_timeout} s",
                          kind="timeout")
    return DimseError(f"The PACS at {_where(node)} closed the connection without answering "
                      "our association request", kind="aborted")


def _connect_failure(node: PacsNode, address: str, elapsed: float) -> DimseError:
    """Why the TCP connection (or the TLS handshake) failed. pynetdicom only logs the
    socket error, so a quick failure is tried once more with a plain socket to learn
    the reason; a connection that took the whole timeout is a timeout."""
    if elapsed >= node.acse_timeout * 0.9:
        return DimseError(f"No answer from the PACS at {_where(node)} within "
                          f"{node.acse_timeout} s", kind="timeout")
    try:
        with socket.create_connection((address, node.port), timeout=min(node.acse_timeout, 5)):
            pass
    except ConnectionRefusedError:
        return DimseError(f"The PACS at {_where(node)} refused the connection", kind="refused")
    except TimeoutError:
        return DimseError(f"No answer from the PACS at {_where(node)} within "
                          f"{node.acse_timeout} s", kind="timeout")
    except OSError as exc:
        return DimseError(f"The PACS at {_where(node)} cannot be reached "
                          f"({exc.strerror or exc})", kind="network")
    if node.tls_enabled:
        return DimseError(f"The secure (TLS) connection to the PACS at {_where(node)} failed: "
                          "check its certificate and ours", kind="network")
    return DimseError(f"The connection to the PACS at {_where(node)} was dropped",
                      kind="network")


def _lost(node: PacsNode, waited_since: float, *, what: str,
          sub_operations: SubOperations | None = None) -> DimseError:
    """No response came: either the DIMSE timeout ran out (pynetdicom then aborts), or
    the PACS aborted or closed the connection."""
    if time.monotonic() - waited_since >= node.dimse_timeout * 0.9:
        return DimseError(f"No answer from the PACS within {node.dimse_timeout} s ({what})",
                          kind="timeout", sub_operations=sub_operations)
    return DimseError(f"The PACS at {_where(node)} broke off the association ({what})",
                      kind="aborted", sub_operations=sub_operations)


def _status_of(response: Dataset) -> int:
    return int(response.Status)


# --- C-ECHO ------------------------------------------------------------------------


def echo(node: PacsNode) -> None:
    """Verify the link (PS3.4 Annex A): returns quietly, or raises ``DimseError``."""
    with _association(node, [build_context(Verification)]) as assoc:
        started = time.monotonic()
        response = assoc.send_c_echo()
        if not response:
            raise _lost(node, started, what="verification")
        status = _status_of(response)
    if status != SUCCESS:
        raise DimseError(f"The PACS answered the verification with status 0x{status:04X}",
                         kind="failed", status=status)


# --- C-FIND ------------------------------------------------------------------------


def _find_model(node: PacsNode) -> UID:
    if node.query_model == PacsNode.QueryModel.PATIENT_ROOT:
        return PatientRootQueryRetrieveInformationModelFind
    return StudyRootQueryRetrieveInformationModelFind


def build_identifier(level: str, query: dict[str, str | None]) -> Dataset:
    """A C-FIND/C-MOVE identifier (PS3.4 C.4.1.1.3): the query level and one element
    per keyword; an empty value asks the PACS to return the key. Values pass through
    as given, wildcards (``*``, ``?``) and ranges (``20240101-``) included. A value
    outside ASCII makes the identifier UTF-8 (ISO_IR 192, PS3.5 6.1.2.5)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    non_ascii = False
    for keyword, value in query.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise DicomGatewayError(f"{keyword!r} is not a DICOM keyword")
        vr = dictionary_VR(tag).split(" or ")[0]
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        if vr == "SQ":
            identifier.add_new(tag, vr, [])
        elif isinstance(value, list | tuple):
            identifier.add_new(tag, vr, list(value))
        else:
            identifier.add_new(tag, vr, value if value not in (None, "") else None)
    if non_ascii:
        identifier.SpecificCharacterSet = "ISO_IR 192"
    return identifier


class _Canceller:
    """Sends C-CANCEL for a running C-FIND once (PS3.7 9.3.2.3), from a timer or when
    enough results are in, and aborts if the PACS does not stop within ``grace``."""

    def __init__(self, assoc, *, msg_id: int, query_model: UID, grace: float):
        self.assoc = assoc
        self.msg_id = msg_id
        self.query_model = query_model
        self.grace = grace
        self.reason = ""
        self._lock = threading.Lock()
        self._abort_timer: threading.Timer | None = None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason:
                return
            self.reason = reason
        with contextlib.suppress(Exception):  # the association may be gone already
            self.assoc.send_c_cancel(self.msg_id, query_model=self.query_model)
        self._abort_timer = threading.Timer(self.grace, self._abort)
        self._abort_timer.daemon = True
        self._abort_timer.start()

    def _abort(self) -> None:
        if self.assoc.is_established:
            self.assoc.abort()

    def stop(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()


def find(node: PacsNode, *, level: str, query: dict[str, str | None],
         timeout: float | None = None, limit: int | None = None) -> list[Dataset]:
    """C-FIND (PS3.4 C.4.1) at ``level`` on the node's information model. Returns the
    matches' identifiers. A search still running after ``timeout`` seconds is cancelled
    and raises ``DimseError(kind="timeout")``; after ``limit`` matches the rest is
    cancelled and the first ``limit`` returned."""
    level = level.upper()
    if level not in LEVELS:
        raise DicomGatewayError(f"unknown query level {level!r}")
    model = _find_model(node)
    identifier = build_identifier(level, query)
    results: list[Dataset] = []
    status = None
    with _association(node, [build_context(model)]) as assoc:
        canceller = _Canceller(assoc, msg_id=1, query_model=model,
                               grace=min(node.dimse_timeout, 5))
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, canceller.cancel, ["timeout"])
            timer.daemon = True
            timer.start()
        try:
            waited_since = time.monotonic()
            for response, match in assoc.send_c_find(identifier, model, msg_id=1):
                if not response:
                    if canceller.reason:
                        break  # we cancelled, then aborted a PACS that went on
                    raise _lost(node, waited_since, what="search")
                waited_since = time.monotonic()
                status = _status_of(response)
                if status not in PENDING:
                    break
                if match is not None and (limit is None or len(results) < limit):
                    results.append(match)
                if limit is not None and len(results) >= limit:
                    canceller.cancel("limit")
        finally:
            if timer is not None:
                timer.cancel()
            canceller.stop()
    if canceller.reason == "timeout":
        raise DimseError(f"The search took longer than {timeout:g} s and was cancelled; "
                         "narrow it down (a name, a date range)", kind="timeout")
    if status == SUCCESS or canceller.reason == "limit":
        return results
    if status == CANCEL:
        raise DimseError("The PACS cancelled the search", kind="failed", status=status)
    raise DimseError(f"The PACS could not run the search (status 0x{status:04X})",
                     kind="failed", status=status)


def _hierarchy(node: PacsNode, study_uid: str) -> dict[str, str]:
    """The keys above STUDY a retrieve or an instance query must carry on the node's
    model: Patient Root wants the Patient ID (PS3.4 C.4.2.2.1), found by a STUDY-level
    query."""
    keys = {"StudyInstanceUID": study_uid}
    if node.query_model == PacsNode.QueryModel.PATIENT_ROOT:
        matches = find(node, level="STUDY", query={"StudyInstanceUID": study_uid,
                                                   "PatientID": None})
        if not matches:
            raise DimseError("The PACS no longer has this study", kind="failed")
        keys = {"PatientID": str(matches[0].get("PatientID", "")), **keys}
    return keys


def find_instance_uids(node: PacsNode, *, study_uid: str) -> set[str]:
    """The SOP Instance UIDs of a study, by C-FIND at IMAGE level. A PACS that insists on
    hierarchical keys (PS3.4 C.4.1.2.2) is asked series by series."""
    keys = _hierarchy(node, study_uid)
    try:
        matches = find(node, level="IMAGE", query={**keys, "SOPInstanceUID": None})
        return {_uid(m, "SOPInstanceUID") for m in matches} - {""}
    except DimseError as exc:
        if exc.kind != "failed":
            raise
    uids: set[str] = set()
    for series in find(node, level="SERIES", query={**keys, "SeriesInstanceUID": None}):
        series_uid = _uid(series, "SeriesInstanceUID")
        matches = find(node, level="IMAGE", query={**keys, "SeriesInstanceUID": series_uid,
                                                   "SOPInstanceUID": None})
        uids.update(_uid(m, "SOPInstanceUID") for m in matches)
    return uids - {""}


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip(" \0")


# --- C-MOVE and C-GET --------------------------------------------------------------


def _sub_operations(response: Dataset, identifier: Dataset | None) -> SubOperations:
    def count(keyword):
        value = response.get(keyword)
        return int(value) if value not in (None, "") else None

    failed_uids: list[str] = []
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        value = identifier.FailedSOPInstanceUIDList
        values = [value] if isinstance(value, str) else list(value)
        failed_uids = [str(v).strip(" \0") for v in values if str(v).strip(" \0")]
    return SubOperations(
        completed=count("NumberOfCompletedSuboperations") or 0,
        remaining=count("NumberOfRemainingSuboperations"),
        failed=count("NumberOfFailedSuboperations") or 0,
        warning=count("NumberOfWarningSuboperations") or 0,
        status=_status_of(response),
        failed_uids=failed_uids,
    )


def _retrieve_identifier(node: PacsNode, *, study_uid: str, series_uid: str | None,
                         instance_uids: Sequence[str] | None) -> Dataset:
    keys: dict = _hierarchy(node, study_uid)
    level = "STUDY"
    if series_uid:
        keys["SeriesInstanceUID"] = series_uid
        level = "SERIES"
    if instance_uids:
        keys["SOPInstanceUID"] = list(instance_uids)
        level = "IMAGE"
    return build_identifier(level, keys)


def _run_retrieve(node: PacsNode, responses, *, destination: str = "",
                  on_progress: Callable[[SubOperations], None] | None,
                  between: Callable[[], None] | None = None) -> SubOperations:
    """Follow the responses of a C-MOVE or C-GET to its final one. A final failure
    with nothing delivered raises; a partial one is returned for the caller to judge."""
    what = "retrieve"
    last: SubOperations | None = None
    error_comment = ""
    waited_since = time.monotonic()
    for response, identifier in responses:
        if between is not None:
            between()
        if not response:
            raise _lost(node, waited_since, what=what, sub_operations=last)
        waited_since = time.monotonic()
        last = _sub_operations(response, identifier)
        error_comment = str(response.get("ErrorComment", "") or "").strip()
        if on_progress is not None:
            on_progress(last)
        if last.status not in PENDING:
            break
    if last is None:
        raise _lost(node, waited_since, what=what)
    if last.status == MOVE_DESTINATION_UNKNOWN:
        raise DimseError(
            f"The PACS does not know the destination {destination} (status 0xA801): add "
            "our storage SCP to its list of DICOM nodes", kind="failed",
            status=last.status, sub_operations=last)
    if last.status not in RETRIEVE_DONE and not last.completed:
        # A failure with nothing delivered (PS3.4 C.4.2.1.5: A701, A702, A900, Cxxx):
        # the request itself failed, which the caller must not take for an empty study.
        comment = f": {error_comment}" if error_comment else ""
        raise DimseError(
            f"The PACS could not carry out the retrieve (status 0x{last.status:04X}{comment})",
            kind="failed", status=last.status, sub_operations=last)
    return last


def _move_model(node: PacsNode) -> UID:
    if node.query_model == PacsNode.QueryModel.PATIENT_ROOT:
        return PatientRootQueryRetrieveInformationModelMove
    return StudyRootQueryRetrieveInformationModelMove


def move(node: PacsNode, *, study_uid: str, destination_ae: str,
         on_progress: Callable[[SubOperations], None] | None = None,
         series_uid: str | None = None,
         instance_uids: Sequence[str] | None = None) -> SubOperations:
    """C-MOVE (PS3.4 C.4.2) of a study (or one series, or some instances) to
    ``destination_ae``, calling ``on_progress`` with each response's counts. Returns the
    final counts and status; a destination the PACS does not know, or a request it
    refuses, raises ``DimseError(kind="failed")``."""
    model = _move_model(node)
    identifier = _retrieve_identifier(node, study_uid=study_uid, series_uid=series_uid,
                                      instance_uids=instance_uids)
    with _association(node, [build_context(model)]) as assoc:
        return _run_retrieve(
            node, assoc.send_c_move(identifier, destination_ae, model, msg_id=1),
            destination=destination_ae, on_progress=on_progress,
        )


def _get_model(node: PacsNode) -> UID:
    if node.query_model == PacsNode.QueryModel.PATIENT_ROOT:
        return PatientRootQueryRetrieveInformationModelGet
    return StudyRootQueryRetrieveInformationModelGet


def _get_contexts(sop_classes: Iterable[str], model: UID) -> tuple[list, list]:
    """Presentation contexts and SCP role items (PS3.4 C.4.3.1, PS3.7 D.3.3.4) for a
    C-GET that receives these SOP classes in whatever syntax the PACS holds them."""
    contexts = [build_context(model)]
    roles = []
    for sop_class in sorted(set(sop_classes)):
        wanted = [build_context(sop_class, ts) for ts in GET_SYNTAXES]
        if len(contexts) + len(wanted) > MAX_CONTEXTS:
            # Many classes: one native context each (the PACS converts what it must)
            # rather than every syntax for the first few and nothing for the rest.
            wanted = [build_context(sop_class, [ExplicitVRLittleEndian,
                                                ImplicitVRLittleEndian])]
            if len(contexts) + 1 > MAX_CONTEXTS:
                break
        contexts += wanted
        roles.append(build_role(sop_class, scp_role=True))
    return contexts, roles


def _sweep(directory: Path, *, older_than: float) -> None:
    """Remove files a killed C-GET left behind; the retrieve's next run fetches what is
    missing, so they are never the only copy."""
    cutoff = time.time() - older_than
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def get(node: PacsNode, *, study_uid: str, facility,
        on_progress: Callable[[SubOperations], None] | None = None) -> SubOperations:
    """C-GET (PS3.4 C.4.3) of a study: the PACS sends the instances back on the same
    association. Each one is written to the spool exactly as received by the C-STORE
    handler, then ingested (``source="retrieve"``) on this thread between responses, so
    a slow database never holds up the PACS."""
    # Imported here: scp.py is the receiving side and imports this module's helpers.
    from .scp import StoreSpool, handle_store

    model = _get_model(node)
    keys = _hierarchy(node, study_uid)
    sop_classes = {
        _uid(m, "SOPClassUID")
        for m in find(node, level="IMAGE", query={**keys, "SOPClassUID": None})
    } - {""}
    if not sop_classes:
        raise DimseError("The PACS reports no images in this study", kind="failed")
    contexts, roles = _get_contexts(sop_classes, model)
    spool = StoreSpool(Path(settings.SPOOL_DIR) / "get", prefix="get-")
    _sweep(spool.directory, older_than=GET_SPOOL_MAX_AGE)
    received: queue.SimpleQueue[Path] = queue.SimpleQueue()

    def ingest_received() -> None:
        while True:
            try:
                path = received.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = ingest_file(facility=facility, path=path,
                                      source=IngestSource.RETRIEVE)
                if not outcome.ok:
                    log.warning("C-GET instance not archived: node=%s status=%s", node.pk,
                                outcome.status)
            finally:
                path.unlink(missing_ok=True)

    handlers = [(evt.EVT_C_STORE, handle_store,
                 [spool, settings.DICOM_SCP_MIN_FREE_BYTES, received.put])]
    identifier = build_identifier("STUDY", keys)
    try:
        with _association(node, contexts, ext_neg=roles, handlers=handlers) as assoc:
            result = _run_retrieve(node, assoc.send_c_get(identifier, model, msg_id=1),
                                   on_progress=on_progress, between=ingest_received)
    finally:
        ingest_received()
    return result


# --- C-STORE -----------------------------------------------------------------------


def store_outcome(status: int | None) -> str:
    """"success", "warning" or "failure" for a C-STORE status (PS3.4 B.2.3, PS3.7
    C): 0x0000 success; 0x0001 and 0xBxxx warnings (coercion, elements discarded, data
    set does not match the SOP class); anything else, or no answer, a failure."""
    if status == SUCCESS:
        return "success"
    if status is not None and (status == 0x0001 or status >> 12 == 0xB):
        return "warning"
    return "failure"


def _store_batches(items: list[tuple[Instance, str, str]]):
    """(contexts, items) per association: for every (SOP class, transfer syntax) pair a
    context with the file's own syntax, plus one native context per SOP class with
    uncompressed files (a PACS may take only Implicit VR); at most MAX_CONTEXTS each."""
    groups: dict[tuple[str, str], list] = {}
    for item in items:
        groups.setdefault((item[1], item[2]), []).append(item)
    batches = []
    contexts: list[PresentationContext] = []
    batch_items: list = []
    native_done: set[str] = set()
    for (sop_class, syntax), members in groups.items():
        needs_native = syntax in UNCOMPRESSED
        size = 2 if needs_native and sop_class not in native_done else 1
        if contexts and len(contexts) + size > MAX_CONTEXTS:
            batches.append((contexts, batch_items))
            contexts, batch_items, native_done = [], [], set()
        contexts.append(build_context(sop_class, syntax))
        if needs_native and sop_class not in native_done:
            native_done.add(sop_class)
            contexts.append(build_context(sop_class, [ExplicitVRLittleEndian,
                                                      ImplicitVRLittleEndian]))
        batch_items += members
    if batch_items:
        batches.append((contexts, batch_items))
    return batches


@contextlib.contextmanager
def _local_path(instance: Instance) -> Iterator[Path]:
    """A local file of the archived bytes: the storage's own file when it has one, else
    a spooled copy (object storage)."""
    try:
        path = Path(instance.file.path)
    except NotImplementedError:
        path = None
    if path is not None:
        yield path
        return
    spool_dir = Path(settings.SPOOL_DIR)
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix="push-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as out, instance.file.open("rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _accepted(assoc, sop_class: str, syntax: str) -> PresentationContext | None:
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == sop_class and context.transfer_syntax[0] == syntax:
            return context
    return None


def store(node: PacsNode, *, instances: Iterable[Instance],
          on_result: Callable[[Instance, int | None, str, str], None] | None = None,
          prepare: Callable[[Instance, Path], contextlib.AbstractContextManager[Path]]
          | None = None) -> dict:
    """C-STORE archived instances to ``node`` (PS3.4 Annex B), each in its original
    transfer syntax when the PACS accepts it, the stored bytes sent as they are. An
    uncompressed file the PACS takes only in another native syntax is re-encoded to
    it; a compressed one the PACS refuses is not converted, it fails.

    ``prepare(instance, path)``, when given, yields the file to send in place of the
    archived file at ``path`` (a copy with some elements changed, in the same transfer
    syntax); the archived file itself is never written to.

    ``on_result(instance, status, outcome, detail)`` is called for every instance
    attempted (outcome "success", "warning" or "failure"). Returns the counts per
    outcome. An association that cannot be set up, or breaks off, raises
    ``DimseError`` after reporting the instance in flight; later instances are not
    reported and can be sent again."""
    items = [(i, str(i.sop_class_uid), str(i.transfer_syntax_uid)) for i in instances]
    counts = {"success": 0, "warning": 0, "failure": 0}

    def report(instance, status, detail):
        outcome = store_outcome(status)
        counts[outcome] += 1
        if on_result is not None:
            on_result(instance, status, outcome, detail)

    for contexts, batch in _store_batches(items):
        with _association(node, contexts) as assoc:
            for number, (instance, sop_class, syntax) in enumerate(batch):
                # Message IDs are 1-65535 (PS3.7 9.1.1.1: US, unique per association).
                status, detail = _store_one(node, assoc, instance, sop_class, syntax,
                                            message_id=number % 65535 + 1,
                                            prepare=prepare)
                report(instance, status, detail)
                if status is None and not assoc.is_established:
                    raise DimseError(
                        f"The PACS at {_where(node)} broke off the association while "
                        "images were being sent", kind="aborted")
    return counts


def _store_one(node, assoc, instance: Instance, sop_class: str, syntax: str, *,
               message_id: int, prepare=None) -> tuple[int | None, str]:
    exact = _accepted(assoc, sop_class, syntax)
    native = None
    if exact is None and syntax in UNCOMPRESSED:
        native = next((c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class
                       and c.transfer_syntax[0] in UNCOMPRESSED), None)
    if exact is None and native is None:
        return None, ("The PACS does not accept this kind of image "
                      f"({sop_class}) in its transfer syntax ({syntax})")
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            path = stack.enter_context(_local_path(instance))
            if prepare is not None:
                path = stack.enter_context(prepare(instance, path))
            if exact is not None:
                response = assoc.send_c_store(path, msg_id=message_id)
            else:
                response = assoc.send_c_store(dcmread(path), msg_id=message_id)
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("C-STORE not sent: node=%s instance=%s error=%s", node.pk, instance.pk,
                    type(exc).__name__)
        return None, "The archived file could not be read or sent"
    if not response:
        lost = _lost(node, started, what="storing an image")
        return None, str(lost)
    status = _status_of(response)
    detail = ""
    if status != SUCCESS:
        comment = str(response.get("ErrorComment", "") or "").strip()
        detail = f"status 0x{status:04X}" + (f": {comment}" if comment else "")
    return status, detail

