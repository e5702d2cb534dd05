"""Archive services. Every path by which DICOM enters (the storage SCP, PACS retrieve,
browser upload, demo data, tests) goes through ``ingest_file``.

pydicom is imported by the functions that read DICOM, not with this module: the names
and errors here are used by every web process, most of which never read a file, and
pydicom (with numpy) is a third of such a process's memory."""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import os
import re
import struct
import tempfile
import unicodedata
import zlib
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from django.conf import settings
from django.core.files import File
from django.db import IntegrityError, models, transaction
from django.db.models import F
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from pockethealth.models import Facility

from .models import (
    IngestSource,
    Instance,
    InstanceConflict,
    Patient,
    Series,
    Study,
    archive_file_name,
)

if TYPE_CHECKING:
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

log = logging.getLogger(__name__)


def quiet_pydicom_reading() -> None:
    """pydicom's value-validation warnings quote the offending value ("Invalid value for
    VR DA: '1980-13-45'"), which may be a name, an ID or a birth date, and Django routes
    warnings into the log. We accept non-conformant values anyway (see ``ingest_file``),
    so the validation is switched off for reading; it changes nothing but the warnings.
    Called by each module that reads DICOM with pydicom, before it reads."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def name_search_key(text: str) -> str:
    """A lower-case, accent-free, punctuation-free form of a name for searching:
    "O'Brien^Mary=..." and "obrien mary" meet."""
    text = unicodedata.normalize("NFKC", text).replace("^", " ").replace("=", " ")
    text = "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    )
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(text.split())


def patient_identity_key(*, patient_id: str, issuer: str, name: str,
                         birth_date: datetime.date | None) -> str:
    """The digest that tells two patients of a facility apart (``Patient.identity_key``),
    computed from the values as stored on the row."""
    dob = birth_date.isoformat() if birth_date else ""
    return hashlib.sha256(f"{patient_id}|{issuer}|{name}|{dob}".encode()).hexdigest()


class DicomGatewayError(Exception):
    """A misuse of the archive services, or a failure the caller should retry."""


class IngestStatus(models.TextChoices):
    STORED = "stored", _("Stored")
    DUPLICATE = "duplicate", _("Already archived")
    CONFLICT = "conflict", _("Kept aside: differs from the archived copy")
    REJECTED = "rejected", _("Rejected")


@dataclass(frozen=True)
class IngestOutcome:
    status: IngestStatus
    # Plain-language reason for REJECTED and CONFLICT, shown to users.
    reason: str = ""
    # Of the bytes as stored (the preamble zeroed).
    sha256: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    # The archived instance: the new one for STORED, the existing one for DUPLICATE
    # and CONFLICT.
    instance: Instance | None = None

    @property
    def ok(self) -> bool:
        return self.status in (IngestStatus.STORED, IngestStatus.DUPLICATE)


CONFLICT_REASON = (
    "an image with the same identifier (SOP Instance UID) is already archived with "
    "different content; the archived copy was kept and this one set aside for review"
)

PREAMBLE_LENGTH = 128  # PS3.10 7.1
SPOOL_FOLDERS = 16
CHUNK_SIZE = 1024 * 1024
# Elements larger than this are left on disc while the file is checked, so an image's
# pixels are not read into memory (nor need to fit there); their extent is still checked
# against the file size.
DEFER_SIZE = 64 * 1024
# Files received are held in memory up to this size each, and this much per batch; a
# larger one is spooled to disc.
MEMORY_FILE_BYTES = 16 * 1024 * 1024
MEMORY_BATCH_BYTES = 32 * 1024 * 1024
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD), little endian (PS3.5 7.5)
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# Character string VRs (PS3.5 6.2). Read with pydicom's validation off, their values
# are decoded with replacement characters rather than refused, so converting one can
# find nothing wrong that the length check before it has not.
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
            "UC", "UI", "UR", "UT"}
# Binary number VRs and the size of one value (PS3.5 6.2).
NUMBER_SIZES = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2,
                "UV": 8}
DIRECTORY_RECORD_SEQUENCE = 0x00041220
# PS3.5 9.1: digits in components separated by ".", at most 64 characters. Leading
# zeros inside a component are forbidden too, but old scanners write them and the
# UID still identifies the object, so they are let through.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")

TRUNCATED = "the file is incomplete or damaged: its contents do not add up to its length"
DAMAGED = "the file is damaged and cannot be read as DICOM"


class _Rejected(Exception):
    """Internal: the received file cannot be archived, for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Received:
    """A file copied to the spool (in memory, or on disc at ``path``): the preamble
    zeroed, hashed on the way."""

    spool: BinaryIO
    path: Path | None
    size: int
    sha256: str
    head: bytes  # the first bytes as received, preamble included, to name the kind


@dataclass
class _Header:
    """What the index keeps of one file, already decoded, normalized and cut to fit."""

    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient: dict = field(default_factory=dict)
    study: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    instance: dict = field(default_factory=dict)


def ingest_file(*, facility: Facility, path: str | os.PathLike | None = None,
                fileobj: BinaryIO | None = None, source: str) -> IngestOutcome:
    """Archive one received DICOM file for ``facility`` and index it.

    Exactly one of ``path`` or ``fileobj`` (read from its current position, not closed)
    is given; ``source`` is an ``IngestSource`` value.

    What is accepted: a DICOM Part 10 file (PS3.10 7.1: preamble, "DICM", File Meta
    Information with a Transfer Syntax UID this archive can read) whose every element,
    nested sequences included, can be read and converted, and whose SOP Class, SOP
    Instance, Study and Series Instance UIDs are present and well-formed. Values that
    break the standard's rules but can still be read (a non-numeric IS, a misspelt
    character set, an over-long string) are accepted: refusing them would lose a
    patient's images over a scanner's quirk. For the same reason a File Meta
    Information whose Media Storage SOP Instance UID differs from the data set's SOP
    Instance UID (PS3.10 7.1 wants them equal; anonymizers often rewrite only the data
    set) is accepted, and the instance is known by the data set's UID: that is the one
    a C-STORE carries and every viewer reads.

    Pixel Data, checked at the top level of the dataset (the image itself, not icons):
    native Pixel Data must be at least Rows x Columns x Samples per Pixel x Bits
    Allocated / 8 x Number of Frames bytes long (PS3.5 8.1.1; YBR_FULL_422 holds two
    samples per pixel, PS3.3 C.7.6.3.1.2); encapsulated Pixel Data (PS3.5 A.4) must be
    an offset table item followed by at least one fragment item and the sequence
    delimiter, all within the file. The compressed frames themselves are not decoded:
    that is the viewer's job, and a codec missing here must not cost a patient an image.

    Never raises over the content of the file: anything unreadable becomes REJECTED
    with a plain-language reason. Storage and database failures do raise (after
    removing any stored file), so that a task can retry. Called inside an outer
    transaction that later rolls back, a stored file would stay behind; callers
    ingest outside of one.

    The stored bytes are the received bytes with the 128-byte preamble set to zeros
    (CVE-2019-11687: a preamble can make a DICOM file a valid executable or archive
    too); nothing else is changed. Nothing from the file or the client chooses where
    it is stored.
    """
    with IngestBatch(facility=facility, source=source) as batch:
        batch.add(path=path, fileobj=fileobj)
        return batch.archive()[0]


def ingest_files(*, facility: Facility, paths: Iterable[str | os.PathLike],
                 source: str) -> list[IngestOutcome]:
    """``ingest_file`` for each path, in order, archived together (``IngestBatch``);
    one file's rejection stops nothing."""
    with IngestBatch(facility=facility, source=source) as batch:
        for path in paths:
            batch.add(path=path)
        return batch.archive()


class IngestBatch:
    """Files archived together: each is received and checked as it is ``add``-ed (one
    after another, as they come off a request body or a disc), then ``archive`` stores
    and indexes them all, the index in one transaction: one query finds which are
    archived already, one finds their series, one inserts the instances, and each
    series and study touched has its counters changed once. What is accepted, and how
    it is stored, is ``ingest_file``'s; the outcomes are the same as ingesting each
    file on its own, in order. Used as a context manager, which removes the spooled
    copies of whatever was not archived."""

    def __init__(self, *, facility: Facility, source: str):
        if source not in IngestSource.values:
            raise DicomGatewayError(f"unknown ingest source {source!r}")
        self.facility, self.source = facility, source
        self._items: list[_Received | IngestOutcome] = []
        self._headers: dict[int, _Header] = {}
        self._memory = 0  # bytes of the files held in memory
        # A folder per process (of a few): files made in and renamed out of one folder
        # by several processes at once wait for each other on the folder's lock, which
        # cost more than checking the file.
        self.spool_dir = Path(settings.SPOOL_DIR) / "ingest" / f"{os.getpid() % SPOOL_FOLDERS:x}"
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> IngestBatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, *, path: str | os.PathLike | None = None,
            fileobj: BinaryIO | None = None, size: int | None = None
            ) -> IngestOutcome | None:
        """Receive and check one file (``path``, or ``fileobj`` read from its current
        position, ``size`` bytes long when the sender said so); the REJECTED outcome
        when it cannot be archived, else None (it will be archived by ``archive``).
        Raises only for a spool that cannot be written.

        A file of known size that fits in the batch's share of memory is held there
        until it is archived, and then written once, where it belongs; any other is
        spooled to disc and moved there."""
        if (path is None) == (fileobj is None):
            raise DicomGatewayError("give exactly one of path or fileobj")
        if path is not None:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = None  # receiving it says what is wrong
        spool_path = None
        if size is not None and size <= MEMORY_FILE_BYTES \
                and self._memory + size <= MEMORY_BATCH_BYTES:
            spool = BytesIO()
            self._memory += size
        else:
            fd, spool_name = tempfile.mkstemp(dir=self.spool_dir, prefix="ingest-",
                                              suffix=".dcm")
            spool_path = Path(spool_name)
            spool = os.fdopen(fd, "w+b")
        received = None
        try:
            received = _receive(spool, spool_path, path=path, fileobj=fileobj)
            header = _check_and_read(received)
        except _Rejected as rejected:
            _spool_remove(spool, spool_path)
            log.info("ingest rejected: facility=%s bytes=%s reason=%s", self.facility.pk,
                     received.size if received else None, rejected.reason)
            outcome = IngestOutcome(status=IngestStatus.REJECTED, reason=rejected.reason,
                                    sha256=received.sha256 if received else "")
            self._items.append(outcome)
            return outcome
        except BaseException:
            _spool_remove(spool, spool_path)
            raise
        self._headers[len(self._items)] = header
        self._items.append(received)
        return None

    def archive(self) -> list[IngestOutcome]:
        """Store and index every file added that was not rejected; the outcome of each
        file added, in order."""
        outcomes: list[IngestOutcome | None] = [
            item if isinstance(item, IngestOutcome) else None for item in self._items]
        waiting = [(i, item, self._headers[i]) for i, item in enumerate(self._items)
                   if isinstance(item, _Received)]
        # A SOP instance sent twice in one batch: the first is archived with the batch,
        # the later ones after it, each finding the one before.
        first: dict[str, tuple[int, _Received, _Header]] = {}
        later = []
        for entry in waiting:
            if entry[2].sop_instance_uid in first:
                later.append(entry)
            else:
                first[entry[2].sop_instance_uid] = entry
        try:
            for i, outcome in _archive_many(facility=self.facility, source=self.source,
                                            entries=list(first.values())):
                outcomes[i] = outcome
            for i, received, header in later:
                outcomes[i] = _archive(facility=self.facility, received=received,
                                       header=header, source=self.source)
        finally:
            self.close()
        return outcomes

    def close(self) -> None:
        for item in self._items:
            if isinstance(item, _Received):
                _spool_remove(item.spool, item.path)
        self._items, self._headers, self._memory = [], {}, 0


def _spool_remove(spool: BinaryIO, path: Path | None) -> None:
    spool.close()
    if path is not None:
        path.unlink(missing_ok=True)


# --- Receiving ---------------------------------------------------------------------


def _receive(spool: BinaryIO, spool_path: Path | None, *, path, fileobj) -> _Received:
    """Copy the file to the spool in chunks, zeroing the preamble and hashing what is
    written (a spool in memory is only given for a file known to fit). A file that
    cannot be read is rejected; a spool that cannot be written raises."""
    limit = settings.INGEST_MAX_FILE_BYTES
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        source = open(path, "rb") if fileobj is None else fileobj
    except OSError:
        raise _Rejected("the file could not be read") from None
    try:
        while True:
            try:
                chunk = source.read(CHUNK_SIZE)
            except OSError:
                raise _Rejected("the file could not be read") from None
            if not chunk:
                break
            if len(head) < 256:
                head += chunk[: 256 - len(head)]
            start, size = size, size + len(chunk)
            if size > limit:
                raise _Rejected(f"the file is larger than the {filesizeformat(limit)} "
                                "allowed for one file")
            if start < PREAMBLE_LENGTH:
                zeros = bytes(min(PREAMBLE_LENGTH - start, len(chunk)))
                digest.update(zeros)
                spool.write(zeros)
                chunk = memoryview(chunk)[len(zeros):]  # the rest, not a copy of it
            digest.update(chunk)
            spool.write(chunk)
    finally:
        if fileobj is None:
            source.close()
    spool.flush()
    if size == 0:
        raise _Rejected("the file is empty")
    return _Received(spool=spool, path=spool_path, size=size, sha256=digest.hexdigest(),
                     head=head)


# --- Checking ----------------------------------------------------------------------


def _check_and_read(received: _Received) -> _Header:
    """Check the spooled file strictly and return what the index keeps of it; raise
    ``_Rejected`` if it is not an archivable DICOM file."""
    if received.size < PREAMBLE_LENGTH + 4 or received.head[128:132] != b"DICM":
        raise _Rejected(f"not a DICOM Part 10 file: {describe_non_dicom(received.head)}")
    try:
        return _read_checked(received)
    except _Rejected:
        raise
    except Exception as exc:  # untrusted input: whatever pydicom trips on is a bad file
        log.info("ingest parse failure: %s", type(exc).__name__)
        raise _Rejected(DAMAGED) from None


def _read_checked(received: _Received) -> _Header:
    """Read the spooled file once, element by element as pydicom reads a file (the File
    Meta Information, then the data set in the encoding it names), and check it. What
    the index keeps is converted straight from the elements read, not through a
    ``Dataset``'s attribute machinery: a file's header is read for every image received,
    and that machinery cost more than reading the whole file."""
    # First the package, whole: a thread importing one of its modules first does not
    # wait for another thread still importing the package, and finds it half made.
    quiet_pydicom_reading()
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID, AllTransferSyntaxes, MediaStorageDirectoryStorage

    # A file spooled to disc is read through a handle of our own, opened by name:
    # pydicom puts the file's name in some messages and needs it to be a string.
    with (open(received.path, "rb") if received.path is not None
          else nullcontext(received.spool)) as fp:
        fp.seek(PREAMBLE_LENGTH + 4)
        try:
            # PS3.10 7.1: the group 0002 elements, always Explicit VR Little Endian.
            meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                stop_when=_past_file_meta)
            meta_value = _Values(meta)
            transfer_syntax = _clean_uid(meta_value(TRANSFER_SYNTAX_UID))
            media_storage_class = _clean_uid(meta_value(MEDIA_STORAGE_SOP_CLASS_UID))
        except Exception:
            raise _Rejected("its File Meta Information header (PS3.10 7.1) is damaged"
                            ) from None
        if not transfer_syntax:
            raise _Rejected("its File Meta Information has no Transfer Syntax UID "
                            "(PS3.10 7.1)")
        if not _is_valid_uid(transfer_syntax):
            raise _Rejected("its Transfer Syntax UID is malformed")
        if transfer_syntax not in AllTransferSyntaxes:
            raise _Rejected("it uses a transfer syntax this archive cannot read")
        transfer_syntax = UID(transfer_syntax)
        if media_storage_class == MediaStorageDirectoryStorage:
            raise _Rejected(DICOMDIR_REASON)

        data_set, size = fp, received.size
        if transfer_syntax.is_deflated:
            # PS3.5 A.5: the data set after the File Meta Information is deflated. It
            # is inflated into memory (where deferring values buys nothing), once its
            # inflated size is known to be within the limit.
            start = fp.tell()
            _check_inflated_size(fp, start)
            fp.seek(start)
            inflated = zlib.decompress(fp.read(), -zlib.MAX_WBITS)
            data_set, size = BytesIO(inflated), len(inflated)
        read = read_dataset(data_set, is_implicit_VR=transfer_syntax.is_implicit_VR,
                            is_little_endian=transfer_syntax.is_little_endian,
                            defer_size=None if transfer_syntax.is_deflated else DEFER_SIZE)
        # As pydicom's own reader keeps it: knowing its file, to read a value left there.
        ds = FileDataset(data_set, read, preamble=None, file_meta=meta,
                         is_implicit_VR=transfer_syntax.is_implicit_VR,
                         is_little_endian=transfer_syntax.is_little_endian)
        ds.set_original_encoding(transfer_syntax.is_implicit_VR,
                                 transfer_syntax.is_little_endian, read.original_character_set)
        # pydicom stops quietly at a short element header, and leaves a missing
        # delimiter or an element running past the end of the file to a warning; a
        # complete read ends exactly at the end of the file.
        if data_set.tell() != size:
            raise _Rejected(TRUNCATED)
        if DIRECTORY_RECORD_SEQUENCE in ds:
            raise _Rejected(DICOMDIR_REASON)

        value = _Values(ds)
        _check_pixel_data(value, data_set, transfer_syntax)
        _check_every_element(meta)
        _check_every_element(ds)
        return _read_header(value, transfer_syntax)


def _past_file_meta(tag: int, _vr: str | None, _length: int) -> bool:
    return tag >> 16 != 0x0002


DICOMDIR_REASON = ("it is a DICOMDIR (disc index), not an image; the images it lists "
                   "are separate files")


def describe_non_dicom(head: bytes) -> str:
    """A plain-language guess at what a file without the "DICM" marker is."""
    signatures = (
        (b"\xff\xd8\xff", "it looks like a JPEG picture"),
        (b"\x89PNG\r\n\x1a\n", "it looks like a PNG picture"),
        (b"GIF87a", "it looks like a GIF picture"),
        (b"GIF89a", "it looks like a GIF picture"),
        (b"II*\x00", "it looks like a TIFF picture"),
        (b"MM\x00*", "it looks like a TIFF picture"),
        (b"%PDF-", "it looks like a PDF document"),
        (b"PK\x03\x04", "it looks like a ZIP archive"),
        (b"\x1f\x8b", "it looks like a gzip-compressed file"),
        (b"MZ", "it looks like a program"),
    )
    for signature, kind in signatures:
        if head.startswith(signature):
            return kind
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "it looks like a web page"
    if head[:2] in (b"\x08\x00", b"\x00\x08", b"\x02\x00"):
        return ("it looks like a bare DICOM data set without the Part 10 header "
                "(PS3.10 7.1); ask the sender to export it as a DICOM file")
    controls = set(range(0x20)) - {0x09, 0x0A, 0x0C, 0x0D, 0x1B} | {0x7F}
    if not controls.intersection(head):
        return "it looks like a text file"
    return 'it has no "DICM" marker after the 128-byte preamble (PS3.10 7.1)'


def _check_inflated_size(fp: BinaryIO, start: int) -> None:
    """A deflated data set (PS3.5 A.5), from ``start``, is inflated whole into memory
    when read; refuse one that would inflate beyond the size limit (a "zip bomb")
    before that happens."""
    limit = settings.INGEST_MAX_FILE_BYTES
    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    while chunk := fp.read(CHUNK_SIZE):
        data = inflater.decompress(chunk, CHUNK_SIZE)
        while True:
            inflated += len(data)
            if inflated > limit:
                raise _Rejected(f"its compressed data would inflate beyond the "
                                f"{filesizeformat(limit)} allowed for one file")
            if not inflater.unconsumed_tail:
                break
            data = inflater.decompress(inflater.unconsumed_tail, CHUNK_SIZE)


def _check_pixel_data(value: _Values, fp: BinaryIO, transfer_syntax: UID) -> None:
    """Reject top-level Pixel Data that cannot hold the image it describes (see
    ``ingest_file``). Runs on the raw elements, before anything converts them."""
    from pydicom.dataelem import RawDataElement

    for tag in PIXEL_DATA_TAGS:
        raw = value.elements.get(tag)  # as read: nothing converts it here
        if raw is None:
            continue
        if not isinstance(raw, RawDataElement):
            raise _Rejected(DAMAGED)
        if raw.length == UNDEFINED_LENGTH:
            if not transfer_syntax.is_encapsulated:
                raise _Rejected("its image data is encapsulated, but its transfer syntax "
                                "says it is uncompressed")
            _check_fragments(raw, fp)
            continue
        if transfer_syntax.is_encapsulated:
            raise _Rejected("its image data is not encapsulated, but its transfer syntax "
                            "says it is compressed (PS3.5 A.4)")
        if raw.value is not None and len(raw.value) < raw.length:
            raise _Rejected(TRUNCATED)
        if raw.length < _expected_native_length(value):
            raise _Rejected("its image data is shorter than the image size it declares "
                            "(the file was probably cut short)")


def _check_fragments(raw: RawDataElement, fp: BinaryIO) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): a Basic Offset Table item, one or more
    fragment items, then the sequence delimiter, all inside the file."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    if raw.value is not None:
        # pydicom kept the value up to (not including) the sequence delimiter.
        buffer = BytesIO(raw.value + SEQUENCE_DELIMITER + bytes(4))
    else:
        fp.seek(raw.value_tell)
        buffer = fp
    try:
        parse_basic_offsets(buffer)
        count, offsets = parse_fragments(buffer)
    except (ValueError, struct.error):
        raise _Rejected("its compressed image data is damaged") from None
    if count == 0:
        raise _Rejected("its compressed image data holds no image")
    # parse_fragments stops quietly at the end of the data; the last fragment must end
    # where the delimiter begins.
    buffer.seek(offsets[-1] + 4)
    (last_length,) = struct.unpack("<L", buffer.read(4))
    buffer.seek(last_length, os.SEEK_CUR)
    if buffer.read(4) != SEQUENCE_DELIMITER:
        raise _Rejected("its compressed image data is damaged or cut short")


def _expected_native_length(value: _Values) -> int:
    """The bytes that native Pixel Data of this image needs (PS3.5 8.1.1)."""
    rows = _positive_int(value(ROWS))
    columns = _positive_int(value(COLUMNS))
    bits_allocated = _positive_int(value(BITS_ALLOCATED))
    if not (rows and columns and bits_allocated):
        raise _Rejected("it has image data but no valid Rows, Columns and Bits Allocated "
                        "to describe it")
    samples = _positive_int(value(SAMPLES_PER_PIXEL)) or 1
    # An unreadable Number of Frames still means at least one frame.
    frames = _positive_int(value(NUMBER_OF_FRAMES)) or 1
    if _text(value(PHOTOMETRIC_INTERPRETATION)) == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two luminance samples share one Cb and one Cr
    bits = rows * columns * samples * frames * bits_allocated
    return (bits + 7) // 8


def _check_every_element(ds: Dataset) -> None:
    """Check that every element's value can be converted, recursing into sequences, so
    that a damaged element is found now rather than when someone opens the image.
    Large binary values left on disc are not loaded: the file-size check covers their
    extent. Character strings are only checked for their length (see TEXT_VRS), and
    binary numbers for a length that is a multiple of their size (the one way their
    conversion fails, PS3.5 6.2): they are nearly all of a header, and converting each
    costs more than reading the file. Anything else is converted."""
    from pydicom.dataelem import RawDataElement

    for tag, raw in list(ds.items()):
        if isinstance(raw, RawDataElement):
            rule = _vr_rule(raw.VR if raw.VR is not None else _dictionary_vr(tag))
            value = raw.value
            if value is None:
                if raw.length != 0 and rule.binary:  # deferred: left on disc
                    continue
            elif raw.length != UNDEFINED_LENGTH and len(value) < raw.length:
                raise _Rejected(TRUNCATED)
            elif rule.text:
                continue
            elif rule.number_sizes and all(len(value) % size == 0
                                           for size in rule.number_sizes):
                continue
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _check_every_element(item)


@dataclass(frozen=True)
class _VRRule:
    text: bool  # a character string, whichever VR it has
    binary: bool  # may be opaque bytes (OB, UN...), or a tag nobody knows
    number_sizes: tuple[int, ...]  # binary numbers, whichever VR: their sizes


@functools.cache
def _vr_rule(vr: str | None) -> _VRRule:
    """How to check an element of the VR read (explicit VR) or of the dictionary
    ("US or SS" for either; None for a tag the dictionary does not know)."""
    vrs = set(vr.split(" or ")) if vr else set()
    sizes = [NUMBER_SIZES.get(one) for one in vrs]
    return _VRRule(text=bool(vrs) and vrs <= TEXT_VRS,
                   binary=not vrs or bool(BINARY_VRS & vrs),
                   number_sizes=tuple(sizes) if vrs and None not in sizes else ())


@functools.cache
def _dictionary_vr(tag: int) -> str | None:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


# --- Reading the index fields ------------------------------------------------------


# The elements the index keeps, by tag: looking an element up by keyword costs a
# dictionary search per read, and a file's header is read for every image received.
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
UID_LABELS = ((SOP_CLASS_UID, "SOP Class UID"), (SOP_INSTANCE_UID, "SOP Instance UID"),
              (STUDY_INSTANCE_UID, "Study Instance UID"),
              (SERIES_INSTANCE_UID, "Series Instance UID"))
PATIENT_NAME, PATIENT_ID, ISSUER_OF_PATIENT_ID = 0x00100010, 0x00100020, 0x00100021
PATIENT_BIRTH_DATE, PATIENT_SEX = 0x00100030, 0x00100040
STUDY_DATE, STUDY_TIME, ACCESSION_NUMBER = 0x00080020, 0x00080030, 0x00080050
REFERRING_PHYSICIAN_NAME, STUDY_DESCRIPTION, STUDY_ID = 0x00080090, 0x00081030, 0x00200010
MODALITY, SERIES_DESCRIPTION, BODY_PART_EXAMINED = 0x00080060, 0x0008103E, 0x00180015
SERIES_NUMBER, INSTANCE_NUMBER = 0x00200011, 0x00200013
NUMBER_OF_FRAMES, ROWS, COLUMNS = 0x00280008, 0x00280010, 0x00280011
SAMPLES_PER_PIXEL, PHOTOMETRIC_INTERPRETATION = 0x00280002, 0x00280004
BITS_ALLOCATED = 0x00280100
MEDIA_STORAGE_SOP_CLASS_UID, TRANSFER_SYNTAX_UID = 0x00020002, 0x00020010


class _Values:
    """The values of a data set's top-level elements as pydicom converts them, None for
    an element that is absent: ``_Values(ds)(tag)``. A raw element read whole with a VR
    of its own or the dictionary's is converted by pydicom's converter for that VR
    directly; anything else (a value left on disc, an element marked UN) the
    ``Dataset`` way."""

    def __init__(self, ds: Dataset):
        from pydicom.dataelem import RawDataElement
        from pydicom.values import convert_value

        self.ds, self.encodings = ds, ds.original_character_set
        self.elements = ds.items().mapping
        self.raw_type, self.convert = RawDataElement, convert_value

    def __call__(self, tag: int):
        element = self.elements.get(tag)
        if element is None:
            return None
        if isinstance(element, self.raw_type):
            value, vr = element.value, element.VR or _dictionary_vr(tag)
            if value is None or vr == "UN":
                return self.ds[tag].value
            if vr in TEXT_VRS and value.isascii() and b"\\" not in value \
                    and b"\x1b" not in value:
                # One value in plain ASCII, which every character set the standard
                # names reads alike (no ISO 2022 escape): the text as pydicom would
                # give it, less the padding its readers here remove anyway. An IS
                # that is not a plain integer goes pydicom's way.
                text = value.decode("ascii")
                if vr != "IS":
                    return text
                try:
                    return int(text)
                except ValueError:
                    pass
            return self.convert(vr, element, self.encodings)
        return element.value


def _read_header(value: _Values, transfer_syntax: UID) -> _Header:
    from pydicom.multival import MultiValue

    uids = {}
    for tag, label in UID_LABELS:
        found = value(tag)
        if isinstance(found, MultiValue):
            raise _Rejected(f"its {label} holds more than one value")
        uid = _clean_uid(found)
        if not uid:
            raise _Rejected(f"it has no {label}, which every DICOM object must have")
        if not _is_valid_uid(uid):
            raise _Rejected(f"its {label} is malformed (PS3.5 9.1: at most 64 digits "
                            "and dots)")
        uids[tag] = uid
    name = _person_name(value(PATIENT_NAME))
    patient = {
        "patient_id": _fit(Patient, "patient_id", _text(value(PATIENT_ID))),
        "issuer_of_patient_id": _fit(Patient, "issuer_of_patient_id",
                                     _text(value(ISSUER_OF_PATIENT_ID))),
        "name": _fit(Patient, "name", name),
        "birth_date": _parse_date(value(PATIENT_BIRTH_DATE)),
        "sex": _fit(Patient, "sex", _text(value(PATIENT_SEX))),
    }
    patient["name_search"] = _fit(Patient, "name_search", name_search_key(patient["name"]))
    study = {
        "study_date": _parse_date(value(STUDY_DATE)),
        "study_time": _parse_time(value(STUDY_TIME)),
        "description": _fit(Study, "description", _text(value(STUDY_DESCRIPTION))),
        "accession_number": _fit(Study, "accession_number",
                                 _text(value(ACCESSION_NUMBER))),
        "referring_physician": _fit(Study, "referring_physician",
                                    _person_name(value(REFERRING_PHYSICIAN_NAME))),
        "study_id": _fit(Study, "study_id", _text(value(STUDY_ID))),
    }
    series = {
        "modality": _fit(Series, "modality", _text(value(MODALITY))),
        "series_number": _bounded_int(value(SERIES_NUMBER)),
        "description": _fit(Series, "description", _text(value(SERIES_DESCRIPTION))),
        "body_part": _fit(Series, "body_part", _text(value(BODY_PART_EXAMINED))),
    }
    instance = {
        "instance_number": _bounded_int(value(INSTANCE_NUMBER)),
        "number_of_frames": _positive_int(value(NUMBER_OF_FRAMES)) or 1,
        "rows": _positive_int(value(ROWS)),
        "columns": _positive_int(value(COLUMNS)),
    }
    return _Header(
        transfer_syntax_uid=str(transfer_syntax),
        sop_class_uid=uids[SOP_CLASS_UID],
        sop_instance_uid=uids[SOP_INSTANCE_UID],
        study_instance_uid=uids[STUDY_INSTANCE_UID],
        series_instance_uid=uids[SERIES_INSTANCE_UID],
        patient=patient, study=study, series=series, instance=instance,
    )


def _clean_uid(value) -> str:
    """A UI value without its padding (PS3.5 9.1: a trailing NUL pads to even length)."""
    if isinstance(value, str):  # nearly always: checked before importing anything
        return value.strip(" \0")
    from pydicom.multival import MultiValue

    if value is None or isinstance(value, MultiValue | list):
        return ""
    return str(value).strip(" \0")


def _is_valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and UID_PATTERN.fullmatch(uid) is not None


def _text(value) -> str:
    """A string value as text: multiple values joined with "\\" (PS3.5 6.4), padding
    and NULs (which PostgreSQL refuses) removed."""
    if isinstance(value, str):  # nearly always: checked before importing anything
        return value.replace("\0", "").strip()
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).replace("\0", "").strip()


def _person_name(value) -> str:
    """A PN value decoded through the file's Specific Character Set (pydicom applies it,
    ISO 2022 escape sequences included), in DICOM form: "Family^Given" with "=" between
    the alphabetic, ideographic and phonetic groups (PS3.5 6.2.1). Trailing empty
    groups and components are dropped."""
    name = _text(value)
    groups = [group.rstrip("^ ") for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _fit(model: type[models.Model], field_name: str, value: str) -> str:
    """``value`` cut to the column's length: an over-long value is non-conformant but
    not a reason to lose the image."""
    return value[: _max_length(model, field_name)]


@functools.cache
def _max_length(model: type[models.Model], field_name: str) -> int:
    return model._meta.get_field(field_name).max_length


def _positive_int(value) -> int | None:
    number = _bounded_int(value)
    return number if number is not None and number > 0 else None


def _bounded_int(value) -> int | None:
    """An IS or US value as an integer that fits an integer column, or None when it is
    absent or unreadable (an IS like "1A" is left as text by pydicom)."""
    if isinstance(value, int):  # nearly always: checked before importing anything
        return value if -(2**31) <= value < 2**31 else None
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list):
        value = value[0] if len(value) else None
    if value is None:
        return None
    try:
        number = int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        try:
            number = int(float(str(value).strip()))
        except (ValueError, OverflowError):
            return None
    return number if -(2**31) <= number < 2**31 else None


def _parse_date(value) -> datetime.date | None:
    """A DA value (PS3.5 6.2 "YYYYMMDD", or the pre-3.0 "YYYY.MM.DD" the standard asks
    readers to accept), None when absent or not a real date."""
    if isinstance(value, datetime.date):
        return value
    digits = _text(value).replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def _parse_time(value) -> datetime.time | None:
    """A TM value ("HH", "HHMM", "HHMMSS" with an optional fraction; the pre-3.0
    "HH:MM:SS" form too), None when absent or unreadable. A leap second (60) becomes
    59, which ``datetime.time`` can hold."""
    if isinstance(value, datetime.time):
        return value
    raw = _text(value).replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", raw)
    if not match:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        return datetime.time(int(hour), int(minute or 0), min(int(second or 0), 59),
                             int((fraction or "0").ljust(6, "0")))
    except ValueError:
        return None


# --- Archiving ---------------------------------------------------------------------


def only_row(queryset: models.QuerySet) -> models.Model | None:
    """The one row a unique lookup finds, or None: like ``first()`` without the ORDER BY
    that a model's default ordering adds, which costs a sort and query building on
    every file ingested."""
    return next(iter(queryset.order_by()[:1]), None)


class _SpooledFile(File):
    """A spooled file as storage takes it: a local storage moves it into place
    (``temporary_file_path``) rather than copying it; any other storage reads it."""

    def temporary_file_path(self) -> str:
        return self.name


def _store(instance: Instance | InstanceConflict, received: _Received, name: str) -> None:
    """Put the received bytes in the archive's storage under a name of its own: the
    file spooled to disc itself when it is still there, else a copy of the spool (read
    through the handle, which outlives the name)."""
    from django.core.files.storage import FileSystemStorage

    received.spool.flush()
    received.spool.seek(0)
    storage = instance.file.storage
    if received.path is None and isinstance(storage, FileSystemStorage):
        instance.file.name = _write_new_local(
            storage, archive_file_name(instance, name), received.spool.getbuffer())
    elif received.path is not None and received.path.exists():
        instance.file.save(name, _SpooledFile(received.spool, name=str(received.path)),
                           save=False)
    else:
        instance.file.save(name, File(received.spool, name=name), save=False)


def _write_new_local(storage, name: str, data: memoryview) -> str:
    """Write a file held in memory as the new file ``name`` of a local storage, in one
    piece, and return the name: what ``storage.save`` does, less finding a free name
    and checking it, which a random name made here does not need and which cost more
    than the writing. Never replaces a file."""
    from django.utils._os import safe_makedirs
    path = os.path.join(storage.location, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:  # the first file of its folder
        if storage.directory_permissions_mode is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        else:  # as storage does it: os.makedirs leaves the mode to the umask
            safe_makedirs(os.path.dirname(path), storage.directory_permissions_mode,
                          exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if storage.file_permissions_mode is not None:
            os.chmod(path, storage.file_permissions_mode)
    except BaseException:
        os.unlink(path)
        raise
    return name


def _archive_many(*, facility: Facility, source: str,
                  entries: list[tuple[int, _Received, _Header]]
                  ) -> Iterable[tuple[int, IngestOutcome]]:
    """``_archive`` for checked files of distinct SOP Instance UIDs, indexed in one
    transaction; yields each entry's number and outcome. Should another process index
    one of the same instances meanwhile, the transaction is undone and each file is
    archived on its own, which settles the race."""
    if not entries:
        return
    existing = {row.sop_instance_uid: row for row in Instance.objects.filter(
        facility=facility, sop_instance_uid__in=[h.sop_instance_uid for _i, _r, h in entries]
    ).order_by()}
    new = []
    for i, received, header in entries:
        row = existing.get(header.sop_instance_uid)
        if row is not None:
            yield i, _already_archived(row, received=received, source=source,
                                       **_found(received, header))
        else:
            new.append((i, received, header))
    instances = []
    try:
        for _i, received, header in new:
            instance = _new_instance(facility, received, header, source)
            _store(instance, received, "instance.dcm")
            instances.append(instance)
        with transaction.atomic():
            _index_instances(instances, facility=facility,
                             headers=[header for _i, _r, header in new])
    except IntegrityError:
        for instance in instances:
            instance.file.delete(save=False)
        for i, received, header in new:
            yield i, _archive(facility=facility, received=received, header=header,
                              source=source)
        return
    except BaseException:
        for instance in instances:
            instance.file.delete(save=False)
        raise
    for instance, (i, received, header) in zip(instances, new, strict=True):
        log.debug("ingest stored: facility=%s instance=%s series=%s bytes=%s", facility.pk,
                  instance.pk, instance.series_id, received.size)
        yield i, IngestOutcome(status=IngestStatus.STORED, instance=instance,
                               **_found(received, header))


def _found(received: _Received, header: _Header) -> dict:
    return {"sha256": received.sha256, "sop_instance_uid": header.sop_instance_uid,
            "study_instance_uid": header.study_instance_uid}


def _new_instance(facility: Facility, received: _Received, header: _Header,
                  source: str) -> Instance:
    return Instance(
        facility=facility, sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid, transfer_syntax_uid=header.transfer_syntax_uid,
        size=received.size, sha256=received.sha256, source=source, **header.instance)


def _index_instances(instances: list[Instance], *, facility: Facility,
                     headers: list[_Header]) -> None:
    """Within the caller's transaction: find or create the patient, study and series of
    each instance (the series in one query, new ones made), insert the instances
    together and keep the counters right. Counters change by increments, which the
    database applies one after the other, once for each series and study touched, in
    the order of their ids (so that concurrent ingests do not deadlock) and after the
    insert, so ingests into one study wait for each other only briefly. The study's
    modalities change only when a series is added: then the study row is locked before
    the series are read, so that of two ingests adding series at once, the later sees
    both."""
    keys = {(h.study_instance_uid, h.series_instance_uid): h for h in headers}
    found = {(s.study.study_instance_uid, s.series_instance_uid): s
             for s in Series.objects.select_related("study").filter(
                 study__facility=facility,
                 series_instance_uid__in={series for _study, series in keys}).order_by()}
    created: set[int] = set()
    for key, header in keys.items():
        if key not in found:
            found[key], was_created = _series_for(facility=facility, header=header)
            if was_created:
                created.add(found[key].pk)
    per_series: dict[int, list[int]] = {}
    for instance, header in zip(instances, headers, strict=True):
        series = found[(header.study_instance_uid, header.series_instance_uid)]
        instance.series = series
        counts = per_series.setdefault(series.pk, [0, 0])
        counts[0] += 1
        counts[1] += instance.size
    Instance.objects.bulk_create(instances)
    per_study: dict[int, list[int]] = {}
    for series_pk in sorted(per_series):
        count, size = per_series[series_pk]
        Series.objects.filter(pk=series_pk).update(
            num_instances=F("num_instances") + count, total_bytes=F("total_bytes") + size)
    for series in found.values():
        if series.pk in per_series:
            counts = per_study.setdefault(series.study_id, [0, 0, 0])
            counts[0] += per_series[series.pk][0]
            counts[1] += per_series[series.pk][1]
            counts[2] += series.pk in created
    for study_pk in sorted(per_study):
        count, size, new_series = per_study[study_pk]
        changes = {"num_instances": F("num_instances") + count,
                   "total_bytes": F("total_bytes") + size, "updated_at": timezone.now()}
        if new_series:
            Study.objects.select_for_update().filter(pk=study_pk).values_list("pk").first()
            modalities = sorted(set(Series.objects.filter(study_id=study_pk).values_list(
                "modality", flat=True)) - {""})
            changes.update(num_series=F("num_series") + new_series,
                           modalities=_fit(Study, "modalities", "\\".join(modalities)))
        Study.objects.filter(pk=study_pk).update(**changes)


def _archive(*, facility: Facility, received: _Received, header: _Header,
             source: str) -> IngestOutcome:
    """Store a checked file and index it, or recognise it as already archived."""
    found = _found(received, header)
    # A second try covers the race of two processes storing the same instance: the
    # loser's insert fails on the unique constraint and it then finds the winner's row.
    for _attempt in range(3):
        existing = only_row(Instance.objects.filter(
            facility=facility, sop_instance_uid=header.sop_instance_uid))
        if existing is not None:
            return _already_archived(existing, received=received, source=source, **found)

        instance = _new_instance(facility, received, header, source)
        _store(instance, received, "instance.dcm")
        try:
            with transaction.atomic():
                _index_instances([instance], facility=facility, headers=[header])
        except IntegrityError:
            instance.file.delete(save=False)
            continue
        except BaseException:
            instance.file.delete(save=False)
            raise
        log.debug("ingest stored: facility=%s instance=%s series=%s study=%s bytes=%s",
                 facility.pk, instance.pk, instance.series_id, instance.series.study_id,
                 received.size)
        return IngestOutcome(status=IngestStatus.STORED, instance=instance, **found)
    raise DicomGatewayError("the instance could not be archived: concurrent writes kept "
                            "conflicting")


def _series_for(*, facility: Facility, header: _Header) -> tuple[Series, bool]:
    """The series of ``header`` (its study and patient made first when new), and whether
    it was made now."""
    study = Study.objects.filter(
        facility=facility, study_instance_uid=header.study_instance_uid).first()
    if study is None:
        # A later file of an existing study is filed under that study's patient even
        # if it spells the patient differently: the Study Instance UID is unique.
        patient, _created = Patient.objects.get_or_create(
            facility=facility,
            identity_key=patient_identity_key(
                patient_id=header.patient["patient_id"],
                issuer=header.patient["issuer_of_patient_id"],
                name=header.patient["name"], birth_date=header.patient["birth_date"],
            ),
            defaults=header.patient,
        )
        study, _created = Study.objects.get_or_create(
            facility=facility, study_instance_uid=header.study_instance_uid,
            defaults={"patient": patient, **header.study},
        )
    series, series_created = Series.objects.get_or_create(
        study=study, series_instance_uid=header.series_instance_uid,
        defaults=header.series,
    )
    series.study = study
    return series, series_created


def _already_archived(existing: Instance, *, received: _Received, source: str,
                      **found) -> IngestOutcome:
    """The SOP instance is archived already: the same bytes are a no-op; different
    bytes are kept aside once as an ``InstanceConflict``, never over the archived
    copy."""
    if existing.sha256 == received.sha256:
        log.debug("ingest duplicate: facility=%s instance=%s", existing.facility_id,
                 existing.pk)
        return IngestOutcome(status=IngestStatus.DUPLICATE, instance=existing, **found)

    conflict = InstanceConflict.objects.filter(
        existing=existing, sha256=received.sha256).first()
    if conflict is None:
        conflict = InstanceConflict(
            facility_id=existing.facility_id, existing=existing,
            sop_instance_uid=existing.sop_instance_uid, size=received.size,
            sha256=received.sha256, source=source,
        )
        _store(conflict, received, "conflict.dcm")
        try:
            with transaction.atomic():
                conflict.save()
        except IntegrityError:
            # Another process set the same bytes aside a moment ago.
            conflict.file.delete(save=False)
            conflict = InstanceConflict.objects.get(existing=existing, sha256=received.sha256)
        except BaseException:
            conflict.file.delete(save=False)
            raise
    log.info("ingest conflict: facility=%s instance=%s conflict=%s", existing.facility_id,
             existing.pk, conflict.pk)
    return IngestOutcome(status=IngestStatus.CONFLICT, reason=CONFLICT_REASON,
                         instance=existing, **found)
