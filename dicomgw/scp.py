"""Our storage SCP (PS3.4 Annex B): the process that PACS nodes C-MOVE into, and that
modalities and workstations send to.

The receive path is kept minimal so that a slow database never holds up a sender:

- An association is accepted only from a configured node (calling AE title, source
  address and called AE title), judged from a snapshot that ``NodeDirectory`` keeps
  in the background; others get an A-ASSOCIATE-RJ, and the refusal is audited by
  another thread.
- Each data set is streamed as it arrives into a new spool file, behind File Meta
  Information built from the request, never decoded; it is acknowledged only once the
  file is complete. No database is touched on the way.
- ``IngestPool`` threads (in ``runscp``, a process of their own) index spooled files
  through ``ingest_files``, several at once. The spool directory is the queue: a file
  is renamed into ``incoming/`` only once complete, claimed by renaming it into
  ``work/``, and removed only after ``ingest_files`` returned, so a process that dies
  loses nothing; the next start ingests whatever is left.
"""

import contextlib
import ipaddress
import logging
import os
import queue
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    build_context,
)
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class

from pockethealth.models import Facility

from .dimse import set_nodelay
from .models import IngestSource, PacsNode
from .services import IngestStatus, ingest_files

log = logging.getLogger(__name__)

# --- Status codes -------------------------------------------------------------------

# C-STORE response statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk full, cannot write)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: no data set, or not the SOP class
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (meta information unbuildable)

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4).
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
NO_REASON_GIVEN = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07

# Transfer syntaxes the archive can read (ingest refuses any other): the sender's own
# choice among these is kept, never transcoded.
READABLE_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)
# Spooled files an ingest thread takes at once when more are waiting (indexed in one
# transaction, ``IngestBatch``).
INGEST_BATCH = 50

PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1


# --- Spool -----------------------------------------------------------------------------


class StoreSpool:
    """A folder where received data sets are written, one file each. A file is written
    as ``*.part`` and renamed to ``*.dcm`` once complete, so a ``.dcm`` in it is always
    whole (a ``.part`` left by a crash was never acknowledged to the sender)."""

    def __init__(self, directory: Path, *, prefix: str = ""):
        self.directory = Path(directory)
        self.prefix = prefix
        self.directory.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def write(self, data: bytes) -> Path:
        name = f"{self.prefix}{uuid.uuid4().hex}"
        part = self.directory / f"{name}.part"
        final = self.directory / f"{name}.dcm"
        try:
            with open(part, "wb", buffering=0) as out:
                out.write(data)
            os.rename(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return final


def handle_store(event, spool: StoreSpool, min_free_bytes: int,
                 on_spooled: Callable[[Path], None]) -> int:
    """EVT_C_STORE for the storage SCP role that a C-GET takes on (PS3.4 C.4.3): write
    the data set as received to the spool and answer (PS3.4 B.2.3).

    Nothing is decoded: ``event.encoded_dataset()`` is the preamble, "DICM", File Meta
    Information built from the request (SOP class and instance from the command, the
    transfer syntax of the presentation context) and the data set bytes exactly as the
    sender encoded them."""
    if spool.free_bytes() < min_free_bytes:
        log.warning("C-STORE refused: spool free space below the minimum")
        return OUT_OF_RESOURCES
    try:
        if event.request.DataSet.getbuffer().nbytes == 0:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        data = event.encoded_dataset()
    except (AttributeError, ValueError, TypeError, KeyError):
        return CANNOT_UNDERSTAND
    try:
        path = spool.write(data)
    except OSError as exc:
        log.error("C-STORE refused: spool not writable (%s)", exc.strerror)
        return OUT_OF_RESOURCES
    on_spooled(path)
    return SUCCESS


# --- Who may send ------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A node allowed to send to us, as the SCP sees it."""

    node_id: int
    facility_id: int
    ae_title: str
    addresses: frozenset[str]
    # The AE titles under which this node may address us.
    called_titles: frozenset[str]


@dataclass(frozen=True)
class Decision:
    peer: Peer | None
    diagnostic: int = NO_REASON_GIVEN
    reason: str = ""
    facility_id: int | None = None


def normalise_address(address: str) -> str:
    """The canonical text of an address; an IPv4-mapped IPv6 address as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def resolve_host(host: str) -> frozenset[str]:
    try:
        return frozenset({normalise_address(str(ipaddress.ip_address(host)))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        log.warning("PACS node host does not resolve; its associations will be rejected")
        return frozenset()
    return frozenset(normalise_address(info[4][0]) for info in infos)


class NodeDirectory:
    """A snapshot of the active nodes that may send to us, refreshed from the database
    (and DNS) by a background thread every ``refresh_seconds``, so that accepting an
    association costs a dictionary look-up."""

    def __init__(self, *, own_ae_title: str, refresh_seconds: float):
        self.own_ae_title = own_ae_title
        self.refresh_seconds = refresh_seconds
        self._peers: dict[str, tuple[Peer, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        peers: dict[str, list[Peer]] = {}
        nodes = PacsNode.objects.filter(is_active=True, may_send=True).only(
            "id", "facility_id", "ae_title", "host", "move_destination", "calling_ae_title")
        for node in nodes:
            titles = {self.own_ae_title, node.move_destination, node.calling_ae_title} - {""}
            peer = Peer(node_id=node.pk, facility_id=node.facility_id,
                        ae_title=node.ae_title.strip(), addresses=resolve_host(node.host),
                        called_titles=frozenset(t.strip() for t in titles))
            peers.setdefault(peer.ae_title, []).append(peer)
        self._peers = {title: tuple(found) for title, found in peers.items()}

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="scp-node-directory",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.refresh_seconds):
                try:
                    close_old_connections()
                    self.refresh()
                except Exception:  # keep the last snapshot; the database may come back
                    log.exception("PACS node list refresh failed; keeping the last one")
        finally:
            connection.close()

    def match(self, *, calling: str, called: str, address: str) -> Decision:
        candidates = self._peers.get(calling, ())
        if not candidates:
            return Decision(None, CALLING_AE_NOT_RECOGNISED, "unknown calling AE title")
        facilities = {p.facility_id for p in candidates}
        facility_id = next(iter(facilities)) if len(facilities) == 1 else None
        address = normalise_address(address)
        from_address = [p for p in candidates if address in p.addresses]
        if not from_address:
            return Decision(None, CALLING_AE_NOT_RECOGNISED,
                            "calling AE title from an address not configured for it",
                            facility_id)
        addressed = [p for p in from_address if called in p.called_titles]
        if not addressed:
            return Decision(None, CALLED_AE_NOT_RECOGNISED, "called AE title not ours",
                            facility_id)
        if len({p.facility_id for p in addressed}) > 1:
            # Two facilities configured the same sender under the same called AE title:
            # filing the images under either could show them to the wrong clinic.
            return Decision(None, NO_REASON_GIVEN,
                            "sender configured for several facilities under this called "
                            "AE title")
        return Decision(addressed[0], facility_id=addressed[0].facility_id)


def storage_like(abstract_syntax: str) -> bool:
    """A storage SOP class, or one pynetdicom does not know (new or private classes are
    almost always storage); the query, print, worklist... services are not."""
    return uid_to_service_class(abstract_syntax) in (StorageServiceClass, ServiceClass)


def contexts_for(requested) -> list:
    """The presentation contexts to support for one association: Verification, and
    every storage-like abstract syntax the requestor proposes, with the readable
    transfer syntaxes in the requestor's own order. pynetdicom accepts the first of
    ours that the requestor offers in a context, so following its order keeps the
    sender's preferred syntax (PS3.8 9.3.2.2: the acceptor picks one)."""
    wanted: dict[str, list[str]] = {}
    for context in requested:
        abstract = str(context.abstract_syntax)
        if abstract == Verification or not storage_like(abstract):
            continue
        syntaxes = wanted.setdefault(abstract, [])
        for syntax in context.transfer_syntax:
            if str(syntax) in READABLE_SYNTAXES and syntax not in syntaxes:
                syntaxes.append(str(syntax))
    contexts = [build_context(Verification)]
    for abstract, syntaxes in wanted.items():
        if syntaxes:
            with contextlib.suppress(ValueError):  # a malformed UID from the peer
                contexts.append(build_context(abstract, syntaxes))
    return contexts


# --- Ingest --------------------------------------------------------------------------


def _facility_id_of(path: Path) -> int | None:
    """Spooled names are ``f<facility id>-<uuid>.dcm``."""
    head = path.name.split("-", 1)[0]
    return int(head[1:]) if head.startswith("f") and head[1:].isdigit() else None


class IngestPool:
    """Threads that archive spooled files through ``ingest_files`` (source "scp"), as
    many together as are waiting, up to INGEST_BATCH. The
    spool's ``incoming/`` folder is the queue; ``submit`` only wakes a thread."""

    def __init__(self, spool_root: Path, *, workers: int, retry_seconds: float = 5.0):
        self.incoming = spool_root / "incoming"
        self.work = spool_root / "work"
        self.rejected = spool_root / "rejected"
        for folder in (self.incoming, self.work, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.retry_seconds = retry_seconds
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._facilities: dict[int, Facility] = {}
        self._busy = 0
        self._lock = threading.Lock()
        # Names queued and not yet claimed, so that a scan does not queue them twice.
        self._queued: set[str] = set()

    def recover(self) -> int:
        """Put back what a previous run left: claimed files return to ``incoming/``;
        unfinished writes (never acknowledged to the sender) are removed. Returns the
        number of files waiting. Call before any thread starts."""
        for path in self.work.glob("*.dcm"):
            os.replace(path, self.incoming / path.name)
        for path in self.incoming.glob("*.part"):
            path.unlink(missing_ok=True)
        return self.scan()

    def scan(self) -> int:
        """Queue every complete file in ``incoming/`` not queued yet, oldest first;
        returns how many were found."""
        waiting = []
        for entry in os.scandir(self.incoming):
            if entry.name.endswith(".dcm"):
                with contextlib.suppress(FileNotFoundError):
                    waiting.append((entry.stat().st_mtime, entry.name))
        waiting.sort()
        for _mtime, name in waiting:
            self.submit(self.incoming / name)
        return len(waiting)

    def submit(self, path: Path) -> None:
        with self._lock:
            if path.name in self._queued:
                return
            self._queued.add(path.name)
        self._queue.put(path)

    def start(self, *, watch_seconds: float | None = None) -> None:
        """Start the threads; with ``watch_seconds``, also look for files written by
        other processes (``runscp --processes``) that often."""
        for index in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"scp-ingest-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if watch_seconds:
            thread = threading.Thread(target=self._watch, args=[watch_seconds],
                                      name="scp-ingest-watch", daemon=True)
            thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.scan()
            except OSError:
                log.exception("spool scan failed")

    def stop(self, timeout: float = 30) -> None:
        """Stop after the files in hand; what is still queued stays in the spool."""
        self._stop.set()
        for _thread in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=timeout)

    @property
    def pending(self) -> int:
        with self._lock:
            busy = self._busy
        return busy + sum(1 for _ in self.incoming.glob("*.dcm"))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                path = self._queue.get()
                if path is None:
                    return
                paths = [path, *self._more(INGEST_BATCH - 1)]
                with self._lock:
                    self._busy += len(paths)
                try:
                    self._ingest(paths)
                finally:
                    with self._lock:
                        self._busy -= len(paths)
        finally:
            connection.close()

    def _more(self, limit: int) -> list[Path]:
        """Up to ``limit`` more queued files, without waiting: a study arrives as a
        stream of images, indexed together (``IngestBatch``). A stop put back."""
        found = []
        while len(found) < limit:
            try:
                path = self._queue.get_nowait()
            except queue.Empty:
                break
            if path is None:
                self._queue.put(None)
                break
            found.append(path)
        return found

    def _ingest(self, paths: list[Path]) -> None:
        claimed = []
        for path in paths:
            try:
                os.rename(path, self.work / path.name)
                claimed.append((path, self.work / path.name))
            except FileNotFoundError:
                pass  # another thread took it
            finally:
                with self._lock:
                    self._queued.discard(path.name)
        attempt = 0
        while claimed:
            try:
                close_old_connections()
                self._ingest_claimed([work for _path, work in claimed])
                return
            except Exception:
                # Database or storage trouble: keep the files and try again; they are
                # the only copies, and the sender was told they are stored.
                attempt += 1
                log.exception("spooled files not ingested (attempt %s); retrying", attempt)
                # What was archived before the trouble has left the spool.
                claimed = [(path, work) for path, work in claimed if work.exists()]
                if self._stop.wait(min(self.retry_seconds * attempt, 300)):
                    for path, work in claimed:  # back to incoming for the next start
                        os.replace(work, path)
                    return

    def _ingest_claimed(self, claimed: list[Path]) -> None:
        """Archive claimed files, those of each facility together; a file archived (or
        found archived) leaves the spool, one refused is set aside."""
        by_facility: dict[Facility | None, list[Path]] = {}
        for path in claimed:
            by_facility.setdefault(self._facility_of(path), []).append(path)
        for facility, paths in by_facility.items():
            if facility is None:
                log.error("%s spooled file(s) of no known facility; set aside", len(paths))
                for path in paths:
                    os.replace(path, self.rejected / path.name)
                continue
            outcomes = ingest_files(facility=facility, paths=paths, source=IngestSource.SCP)
            for path, outcome in zip(paths, outcomes, strict=True):
                if outcome.status == IngestStatus.REJECTED:
                    # Kept for review: the sender was told it is stored.
                    log.warning("received file rejected by ingest: facility=%s", facility.pk)
                    os.replace(path, self.rejected / path.name)
                else:
                    path.unlink(missing_ok=True)

    def _facility_of(self, claimed: Path) -> Facility | None:
        facility_id = _facility_id_of(claimed)
        facility = self._facilities.get(facility_id) if facility_id else None
        if facility is None and facility_id is not None:
            facility = Facility.objects.filter(pk=facility_id).first()
            if facility is not None:
                self._facilities[facility_id] = facility
        return facility


# --- Audit ---------------------------------------------------------------------------


class AuditWriter:
    """Writes association refusals to the audit trail from its own thread: the
    association thread only queues them."""

    def __init__(self):
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="scp-audit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def denied(self, decision: Decision, detail: dict) -> None:
        log.warning("association rejected: calling=%s called=%s address=%s reason=%s",
                    detail["calling_ae"], detail["called_ae"], detail["peer_address"],
                    detail["reason"])
        self._queue.put((decision.facility_id, detail))

    def _run(self) -> None:
        from pockethealth.services import audit_record

        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                facility_id, detail = item
                try:
                    close_old_connections()
                    facility = (Facility.objects.filter(pk=facility_id).first()
                                if facility_id else None)
                    audit_record(action="dicom.association", outcome="denied",
                                 actor_type="system", actor_ref=detail["calling_ae"],
                                 facility=facility, detail=detail)
                except Exception:
                    log.exception("association refusal could not be audited")
        finally:
            connection.close()


# --- The receive path: the acceptor side of the upper layer (PS3.8) -----------------
#
# pynetdicom's acceptor hands every PDU between two threads that poll each other every
# millisecond and decodes every command through pydicom: about 4 ms of CPU per image,
# which caps a C-MOVE far below what the PACS can send. Storage is the one service this
# process offers, so it runs the upper layer itself, one thread per association with
# blocking reads, and streams each data set straight into its spool file. pynetdicom
# still encodes and decodes the association PDUs and negotiates the presentation
# contexts.

PDU_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_ABORT = 0x07
# A-ABORT source / reason (PS3.8 9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNEXPECTED_PDU = 0x02
# A-ASSOCIATE-RJ for a full house: transient, presentation related, local limit exceeded.
REJECTED_TRANSIENT = 0x02
SOURCE_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02
# DIMSE command fields and the "no data set" marker (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101
# Message control header bits of a PDV (PS3.8 E.2).
PDV_COMMAND = 0x01
PDV_LAST = 0x02
# An A-ASSOCIATE-RQ larger than this is not a real one.
MAX_ASSOCIATE_RQ = 1024 * 1024
# Data set bytes are moved from socket to file in pieces of this size.
STREAM_CHUNK = 256 * 1024


class _PeerGone(Exception):
    """The peer closed the connection or aborted."""


class _ProtocolError(Exception):
    """The peer broke the protocol: abort the association."""


def _element(tag_element: int, value: bytes) -> bytes:
    """An element of group 0000, Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _ui(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def command_set(**fields) -> bytes:
    """A response command set: Affected SOP Class/Instance UID, Command Field, Message
    ID Being Responded To, Command Data Set Type and Status, in tag order with the
    group length first (PS3.7 9.3.1.2, 9.3.5.2)."""
    elements = [
        (0x0002, _ui(fields["sop_class"])),
        (0x0100, struct.pack("<H", fields["command"])),
        (0x0120, struct.pack("<H", fields["message_id"])),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", fields["status"])),
    ]
    if fields.get("sop_instance"):
        elements.append((0x1000, _ui(fields["sop_instance"])))
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, group 0000) by element
    number."""
    elements = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise _ProtocolError("malformed command set")
        elements[element] = data[offset:offset + length]
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def _text(elements: dict[int, bytes], element: int) -> str:
    return elements.get(element, b"").decode("ascii", "replace").strip(" \x00")


def file_meta(*, sop_class: str, sop_instance: str, transfer_syntax: str,
              source_ae: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1, Explicit VR Little
    Endian) for a data set received over the network."""
    def explicit(element: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack(
                "<I", len(value)) + value
        return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value

    def padded(text: str) -> bytes:
        data = text.encode("ascii", "replace")
        return data + b" " if len(data) % 2 else data

    body = b"".join((
        explicit(0x0001, b"OB", b"\x00\x01"),
        explicit(0x0002, b"UI", _ui(sop_class)),
        explicit(0x0003, b"UI", _ui(sop_instance)),
        explicit(0x0010, b"UI", _ui(transfer_syntax)),
        explicit(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        explicit(0x0013, b"SH", padded(PYNETDICOM_IMPLEMENTATION_VERSION)),
        explicit(0x0016, b"AE", padded(source_ae)),
    ))
    return PREAMBLE + explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


class _Reader:
    """Exact reads from a socket through one reusable buffer."""

    def __init__(self, sock: socket.socket):
        self.stream = sock.makefile("rb", buffering=STREAM_CHUNK)

    def exact(self, size: int) -> bytes:
        data = self.stream.read(size)
        if data is None or len(data) != size:
            raise _PeerGone()
        return data

    def into(self, view: memoryview) -> None:
        if self.stream.readinto(view) != len(view):
            raise _PeerGone()


class _Incoming:
    """One data set being received into the spool: written as it arrives, renamed to
    ``.dcm`` once complete (only then is it acknowledged)."""

    def __init__(self, spool: StoreSpool, prefix: str, meta: bytes, min_free_bytes: int):
        self.status = SUCCESS
        self.part: Path | None = None
        self.file = None
        self.size = 0
        if spool.free_bytes() < min_free_bytes:
            log.warning("C-STORE refused: spool free space below the minimum")
            self.status = OUT_OF_RESOURCES
            return
        name = f"{prefix}{uuid.uuid4().hex}"
        self.part = spool.directory / f"{name}.part"
        self.final = spool.directory / f"{name}.dcm"
        try:
            self.file = open(self.part, "wb", buffering=0)
            self.file.write(meta)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        log.error("C-STORE refused: spool not writable (%s)", exc.strerror)
        self.status = OUT_OF_RESOURCES
        self.discard()

    def write(self, data) -> None:
        if self.file is None:
            return  # refused: the rest of the data set is read and dropped
        try:
            self.file.write(data)
            self.size += len(data)
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> Path | None:
        if self.file is None:
            return None
        if self.size == 0:
            self.status = DATASET_DOES_NOT_MATCH_SOP_CLASS
            self.discard()
            return None
        try:
            self.file.close()
            self.file = None
            os.rename(self.part, self.final)
        except OSError as exc:
            self._fail(exc)
            return None
        return self.final

    def discard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.part is not None:
            self.part.unlink(missing_ok=True)


class StoreAssociation:
    """One association, from A-ASSOCIATE-RQ to release or abort, on its own thread."""

    def __init__(self, scp: "StorageSCP", sock: socket.socket, address: str):
        self.scp = scp
        self.sock = sock
        self.address = normalise_address(address)
        self.reader = _Reader(sock)
        self.established = False
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        self.calling = ""
        self.prefix = ""
        self.incoming: _Incoming | None = None

    def run(self) -> None:
        try:
            self.sock.settimeout(self.scp.acse_timeout)
            if self._associate():
                self.sock.settimeout(self.scp.network_timeout)
                self._serve()
        except (_PeerGone, TimeoutError, ConnectionError):
            pass
        except _ProtocolError as exc:
            log.warning("association aborted: %s", exc)
            self._send_abort(ABORT_UNEXPECTED_PDU)
        except OSError as exc:
            log.warning("association ended by a network error (%s)", exc.strerror)
        except Exception:  # a fault of ours must end this association, not the server
            log.exception("association aborted by an internal error")
            self._send_abort(ABORT_NOT_SPECIFIED)
        finally:
            if self.incoming is not None:
                self.incoming.discard()
            # The socket's descriptor closes only once its file object is closed too.
            with contextlib.suppress(OSError):
                self.reader.stream.close()
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- Association establishment (PS3.8 7.1) ------------------------------------------

    def _read_pdu(self, *, limit: int | None = None) -> tuple[int, bytes]:
        header = self.reader.exact(6)
        pdu_type, _reserved, length = struct.unpack(">BBI", header)
        if limit is not None and length > limit:
            raise _ProtocolError("PDU too long")
        return pdu_type, header + self.reader.exact(length)

    def _associate(self) -> bool:
        pdu_type, data = self._read_pdu(limit=MAX_ASSOCIATE_RQ)
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise _ProtocolError("expected an A-ASSOCIATE-RQ")
        request_pdu = A_ASSOCIATE_RQ()
        try:
            request_pdu.decode(data)
            request = request_pdu.to_primitive()
        except Exception:  # untrusted bytes: whatever pynetdicom trips on is malformed
            raise _ProtocolError("malformed A-ASSOCIATE-RQ") from None
        self.calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        decision = self.scp.directory.match(calling=self.calling, called=called,
                                            address=self.address)
        if decision.peer is None:
            self._send_reject(request, REJECTED_PERMANENT, SOURCE_SERVICE_USER,
                              decision.diagnostic)
            self.scp.audit.denied(decision, {"calling_ae": self.calling, "called_ae": called,
                                             "peer_address": self.address,
                                             "reason": decision.reason})
            return False
        if not self.scp.admit(self):
            log.warning("association rejected: %s associations already open",
                        self.scp.max_associations)
            self._send_reject(request, REJECTED_TRANSIENT, SOURCE_PRESENTATION,
                              LOCAL_LIMIT_EXCEEDED)
            return False
        self.prefix = f"f{decision.peer.facility_id}-"
        # Our responses are a few hundred bytes: under any maximum PDU the peer sets.
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                 for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        requested = request.presentation_context_definition_list
        results, role_items = negotiate_as_acceptor(requested, contexts_for(requested), roles)
        self.contexts = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in results if cx.result == 0x00}
        self._send_accept(request, results, role_items)
        self.established = True
        return True

    def _user_information(self) -> list:
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.scp.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        return [maximum, implementation, version]

    def _send_accept(self, request, results, role_items) -> None:
        response = A_ASSOCIATE()
        response.application_context_name = request.application_context_name
        response.calling_ae_title = request.calling_ae_title
        response.called_ae_title = request.called_ae_title
        response.result = 0x00
        response.presentation_context_definition_results_list = results
        response.user_information = self._user_information() + list(role_items)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(response)
        self.sock.sendall(pdu.encode())

    def _send_reject(self, request, result: int, source: int, diagnostic: int) -> None:
        response = A_ASSOCIATE()
        response.result = result
        response.result_source = source
        response.diagnostic = diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(response)
        self.sock.sendall(pdu.encode())
        # The requestor closes the connection once it has read the rejection (PS3.8
        # 7.1.1.3); give it a moment so that it is not cut off first.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(2)
            self.sock.recv(1)

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BBIBBBB", PDU_ABORT, 0, 4, 0, 0,
                                          ABORT_SOURCE_PROVIDER, reason))

    # -- Data transfer (PS3.8 9.3.5, PS3.7 9.3) -------------------------------------------

    def _serve(self) -> None:
        command = bytearray()
        message: dict | None = None
        chunk = memoryview(bytearray(STREAM_CHUNK))
        while True:
            header = self.reader.exact(6)
            pdu_type, _reserved, length = struct.unpack(">BBI", header)
            if pdu_type == PDU_RELEASE_RQ:
                self.reader.exact(length)
                self.sock.sendall(struct.pack(">BBII", 0x06, 0, 4, 0))  # A-RELEASE-RP
                return
            if pdu_type == PDU_ABORT:
                return
            if pdu_type != PDU_P_DATA_TF:
                raise _ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            while length:
                if length < 6:
                    raise _ProtocolError("malformed P-DATA-TF")
                item_length, context_id, control = struct.unpack(">IBB", self.reader.exact(6))
                if item_length < 2 or item_length + 4 > length:
                    raise _ProtocolError("malformed presentation data value")
                length -= 4 + item_length
                remaining = item_length - 2
                if context_id not in self.contexts:
                    raise _ProtocolError("presentation context not accepted")
                if control & PDV_COMMAND:
                    command += self.reader.exact(remaining)
                    if control & PDV_LAST:
                        message = self._command(bytes(command), context_id)
                        command.clear()
                    continue
                if message is None or self.incoming is None:
                    raise _ProtocolError("data set without a C-STORE request")
                while remaining:
                    piece = chunk[:min(remaining, STREAM_CHUNK)]
                    self.reader.into(piece)
                    self.incoming.write(piece)
                    remaining -= len(piece)
                if control & PDV_LAST:
                    self._stored(message)
                    message = None

    def _command(self, data: bytes, context_id: int) -> dict | None:
        if self.incoming is not None:
            raise _ProtocolError("a command before the end of the previous data set")
        elements = parse_command(data)
        field = _us(elements, 0x0100)
        message = {"context_id": context_id, "message_id": _us(elements, 0x0110) or 0,
                   "sop_class": _text(elements, 0x0002),
                   "sop_instance": _text(elements, 0x1000)}
        has_data = _us(elements, 0x0800) != NO_DATA_SET
        if field == C_ECHO_RQ and not has_data:
            self._respond(message, command=C_ECHO_RSP, status=SUCCESS)
            return None
        if field != C_STORE_RQ or not has_data:
            raise _ProtocolError(f"unsupported DIMSE command 0x{field or 0:04X}")
        abstract, syntax = self.contexts[context_id]
        meta = file_meta(sop_class=message["sop_class"] or abstract,
                         sop_instance=message["sop_instance"], transfer_syntax=syntax,
                         source_ae=self.calling)
        self.incoming = _Incoming(self.scp.spool, self.prefix, meta, self.scp.min_free_bytes)
        return message

    def _stored(self, message: dict) -> None:
        """The whole data set is in (PS3.4 B.2.3): acknowledge what is safely on disc."""
        incoming, self.incoming = self.incoming, None
        path = incoming.finish()
        self._respond(message, command=C_STORE_RSP, status=incoming.status)
        if path is not None:
            self.scp.spooled(path)

    def _respond(self, message: dict, *, command: int, status: int) -> None:
        data = command_set(sop_class=message["sop_class"] or Verification, command=command,
                           message_id=message["message_id"], status=status,
                           sop_instance=message["sop_instance"])
        pdv = struct.pack(">IBB", len(data) + 2, message["context_id"],
                          PDV_COMMAND | PDV_LAST) + data
        self.sock.sendall(struct.pack(">BBI", PDU_P_DATA_TF, 0, len(pdv)) + pdv)


class StorageSCP:
    """The storage SCP: a listening socket with a thread per association, the node
    directory, the audit writer and (unless ``ingest_workers`` is 0, when another
    process indexes the spool) the ingest pool. ``start()`` returns once it listens;
    ``stop()`` shuts it down."""

    def __init__(self, *, host: str | None = None, port: int | None = None,
                 ae_title: str | None = None, max_associations: int | None = None,
                 max_pdu: int | None = None, spool_root: Path | None = None,
                 min_free_bytes: int | None = None, ingest_workers: int | None = None,
                 reuse_port: bool = False, node_refresh_seconds: float | None = None):
        self.host = host or settings.DICOM_SCP_HOST
        self.port = settings.DICOM_SCP_PORT if port is None else port
        self.ae_title = ae_title or settings.DICOM_AE_TITLE
        self.max_associations = max_associations or settings.DICOM_SCP_MAX_ASSOCIATIONS
        self.max_pdu = settings.DICOM_SCP_MAX_PDU if max_pdu is None else max_pdu
        self.acse_timeout = settings.DICOM_SCP_ACSE_TIMEOUT
        self.network_timeout = settings.DICOM_SCP_NETWORK_TIMEOUT
        self.spool_root = Path(spool_root or scp_spool_root())
        self.min_free_bytes = (settings.DICOM_SCP_MIN_FREE_BYTES if min_free_bytes is None
                               else min_free_bytes)
        self.ingest_workers = (settings.DICOM_SCP_INGEST_WORKERS if ingest_workers is None
                               else ingest_workers)
        self.reuse_port = reuse_port
        self.directory = NodeDirectory(
            own_ae_title=self.ae_title,
            refresh_seconds=node_refresh_seconds or settings.DICOM_SCP_NODE_REFRESH_SECONDS)
        self.spool = StoreSpool(self.spool_root / "incoming")
        self.pool = IngestPool(self.spool_root, workers=self.ingest_workers)
        self.audit = AuditWriter()
        self.listener: socket.socket | None = None
        self._associations: set[StoreAssociation] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, association: StoreAssociation) -> bool:
        with self._lock:
            open_now = sum(1 for a in self._associations if a.established)
            return open_now < self.max_associations

    def spooled(self, path: Path) -> None:
        if self.ingest_workers:
            self.pool.submit(path)

    def start(self) -> None:
        self.directory.start()
        self.audit.start()
        if self.ingest_workers:
            waiting = self.pool.recover()
            if waiting:
                log.info("ingesting %s files left in the spool by an earlier run", waiting)
            self.pool.start()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit it; set again on each below to be sure.
        set_nodelay(listener)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self.listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept",
                                        daemon=True)
        self._thread.start()
        log.info("storage SCP %s listening on %s:%s", self.ae_title, self.host, self.port)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            sock.settimeout(None)
            set_nodelay(sock)
            association = StoreAssociation(self, sock, address[0])
            with self._lock:
                self._associations.add(association)
            threading.Thread(target=self._run_association, args=[association],
                             name="scp-association", daemon=True).start()

    def _run_association(self, association: StoreAssociation) -> None:
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.discard(association)

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def wait(self) -> None:
        """Block until the server stops."""
        if self._thread is not None:
            self._thread.join()

    def stop(self, *, grace: float = 30) -> None:
        """Stop accepting, give running associations ``grace`` seconds, stop the
        threads. Received files not yet ingested stay in the spool for the next
        start."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.listener is not None:
            self.listener.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                busy = [a for a in self._associations if a.established]
            if not busy:
                break
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._associations)
        for association in remaining:
            # Unacknowledged data sets are dropped by their threads; the sender will
            # send them again.
            with contextlib.suppress(OSError):
                association.sock.shutdown(socket.SHUT_RDWR)
        if self.ingest_workers:
            self.pool.stop()
        self.directory.stop()
        self.audit.stop()


def scp_spool_root() -> Path:
    return Path(settings.SPOOL_DIR) / "scp"
