"""The upload portal, the outside facility's side of a request: open the request with
its PIN (or the Request Page's link), send the files of a disc or folder, confirm, or
decline.

PINs are 6 digits, so guessing is throttled hard (``sharing.throttle`` with the limits
of ``pin_limits``): per client address, which is locked out after
UPLOAD_PIN_ADDRESS_FAILURES wrong PINs, and per facility, whose portal stops checking
PINs for a while when too many wrong ones arrive from everywhere together. A PIN for a
facility that does not exist gets the same answer, after the same work, as a wrong PIN.

An upload is resumable: the browser first announces each file (its path on the disc,
its size and its first bytes), the server keeps a row per path and answers which it
already has; then every file is sent in a request of its own and settled once. Files
whose first bytes show they are not DICOM (PS3.10 7.1: no "DICM" after the preamble) are
settled as skipped at once, without being sent. Nothing from the client decides where a
file is stored or what it is: the path is a label, and what is stored is what
``dicomgw.services.ingest_file`` accepts.

Every function takes ``now``; nothing here reads the clock."""

import datetime
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Sum
from django.template.defaultfilters import filesizeformat
from django.utils.crypto import salted_hmac
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from dicomgw.models import IngestSource, Patient
from dicomgw.services import IngestBatch, IngestStatus, describe_non_dicom, ingest_file
from pockethealth.codes import PIN_LENGTH, pin_hash, pin_normalise
from pockethealth.models import AuditEvent, Facility
from pockethealth.services import audit_record
from sharing import throttle
from sharing.recipient import _as_from

from .imports import request_studies_collect
from .models import RecordRequest, Upload, UploadedFile
from .services import RetrievalError, upload_token_hash

log = logging.getLogger(__name__)

Outcome = UploadedFile.Outcome
Status = RecordRequest.Status

# What the browser reads of each file before announcing it: the preamble, "DICM", and
# enough after it to name what a non-DICOM file looks like.
HEAD_BYTES = 256
DICM_OFFSET = 128  # PS3.10 7.1: a 128-byte preamble, then "DICM"
# Files announced in one request.
ANNOUNCE_BATCH = 1000
PATH_MAX = UploadedFile._meta.get_field("path").max_length
REASON_MAX = UploadedFile._meta.get_field("reason").max_length
# A DICOMDIR is read whole; one listing tens of thousands of images is a few MB.
DICOMDIR_MAX_BYTES = 256 * 1024**2
DICOMDIR_NAME = "DICOMDIR"  # PS3.10: a File-set's index always has this File ID
CHUNK = 1024 * 1024
# Statuses from which a request may still be declined: nothing has been confirmed yet.
DECLINABLE = (Status.SENT, Status.OPENED, Status.UPLOADING)
DECLINE_SUGGESTIONS = (
    gettext_lazy("No records for this patient"),
    gettext_lazy("The records are older than we keep"),
    gettext_lazy("We need the patient's signed authorization first"),
    gettext_lazy("The records were already sent another way"),
)
LINK_TOKEN_MAX = 100


# --- Errors ----------------------------------------------------------------------------


class PinRefused(RetrievalError):
    """The PIN does not open a request of this portal: one answer for a wrong PIN, an
    unknown facility and a closed request alike."""


class PinThrottled(RetrievalError):
    """Too many wrong PINs from this address, or at this facility's portal, just now."""

    def __init__(self, verdict: throttle.Verdict):
        super().__init__(verdict.reason)
        self.reason = verdict.reason
        self.retry_after = verdict.retry_after


class RequestClosed(RetrievalError):
    """The link is right, but the request is no longer open (imported, cancelled or
    declined): nothing more can be sent for it."""

    def __init__(self, record_request: RecordRequest):
        super().__init__(record_request.status)
        self.record_request = record_request


class UploadLimit(RetrievalError):
    """The files chosen go beyond what one upload may hold; the message says what."""


class UploadIncomplete(RetrievalError):
    """The connection ended before the whole file arrived; nothing was kept of it."""


class UploadBusy(RetrievalError):
    """Receiving is paused (storage almost full); the browser waits and tries again."""


# --- Opening a request ---------------------------------------------------------------


def pin_limits() -> throttle.Limits:
    return throttle.Limits(
        prefix="upload-pin", address_failures=settings.UPLOAD_PIN_ADDRESS_FAILURES,
        address_window=settings.UPLOAD_PIN_ADDRESS_WINDOW_SECONDS,
        address_block=settings.UPLOAD_PIN_ADDRESS_BLOCK_SECONDS,
        breaker_failures=settings.UPLOAD_PIN_FACILITY_FAILURES,
        breaker_window=settings.UPLOAD_PIN_FACILITY_WINDOW_SECONDS,
        breaker_seconds=settings.UPLOAD_PIN_FACILITY_BREAKER_SECONDS,
    )


def link_limits() -> throttle.Limits:
    """Wrong links lock an address out of links, apart from PINs: someone locked out by
    mistyped PINs can still scan the Request Page's QR code. They open no breaker: a
    link token (192 bits) cannot be guessed, and a breaker would let anyone stop every
    link from working."""
    return throttle.Limits(**{**pin_limits().__dict__, "prefix": "upload-link",
                              "breaker_failures": sys.maxsize})


def _facility_scope(facility: Facility | None) -> str:
    return f"facility:{facility.pk}" if facility is not None else "facility:unknown"


def pin_is_well_formed(text: str) -> bool:
    pin = pin_normalise(text)
    return len(pin) == PIN_LENGTH and pin.isascii() and pin.isdigit()


def facility_for_portal(short_name: str) -> Facility | None:
    return Facility.objects.filter(short_name=short_name[:40]).first()


def request_open_by_pin(*, facility: Facility | None, pin: str, address: str | None,
                        now: datetime.datetime) -> RecordRequest:
    """The open request of ``facility`` that ``pin`` names, for an uploader at
    ``address``. Raises ``PinThrottled`` before looking at anything when the address or
    the facility's portal has had too many wrong PINs, and ``PinRefused`` for a wrong
    PIN or an unknown facility (``facility`` None), alike."""
    limits, scope = pin_limits(), _facility_scope(facility)
    verdict = throttle.attempt_check(address=address, now=now, limits=limits, scope=scope)
    if not verdict.allowed:
        raise PinThrottled(verdict)
    found = RecordRequest.objects.select_related("facility").filter(
        facility_id=facility.pk if facility is not None else 0, pin_hash=pin_hash(pin),
        status__in=RecordRequest.OPEN_STATUSES).first()
    if found is None:
        _guess_failure(kind="pin", limits=limits, scope=scope, facility=facility,
                       address=address, now=now)
        raise PinRefused(_("This PIN does not open a request here."))
    _request_opened(found, address=address, now=now, via="pin")
    return found


def _guess_failure(*, kind: str, limits: throttle.Limits, scope: str,
                   facility: Facility | None, address: str | None,
                   now: datetime.datetime) -> None:
    """Count and audit a wrong PIN or link (``kind``), and the lock or breaker it
    starts."""
    counted = throttle.failure_record(address=address, now=now, limits=limits, scope=scope)
    audit_record(action=f"retrieval.{kind}.failed", outcome=AuditEvent.Outcome.FAILURE,
                 request=_as_from(address), facility=facility,
                 detail={"address_failures": counted.address_failures})
    if counted.address_blocked:
        audit_record(action=f"retrieval.{kind}.block", outcome=AuditEvent.Outcome.DENIED,
                     request=_as_from(address), facility=facility,
                     detail={"failures": counted.address_failures,
                             "seconds": limits.address_block})
    if counted.breaker_opened:
        audit_record(action=f"retrieval.{kind}.breaker", outcome=AuditEvent.Outcome.DENIED,
                     actor_type=AuditEvent.ActorType.SYSTEM, facility=facility,
                     detail={"failures": counted.global_failures,
                             "seconds": limits.breaker_seconds})


def request_open_by_link(*, facility: Facility | None, token: str, address: str | None,
                         now: datetime.datetime) -> RecordRequest:
    """The request whose Request Page link carries ``token``. Raises ``PinThrottled``
    when the address is locked out, ``PinRefused`` for a token that names no request
    of this portal, and ``RequestClosed`` when the request has ended."""
    limits = link_limits()
    verdict = throttle.attempt_check(address=address, now=now, limits=limits, scope="link")
    if not verdict.allowed:
        raise PinThrottled(verdict)
    token = token.strip()[:LINK_TOKEN_MAX]
    found = None
    if token and facility is not None:
        found = RecordRequest.objects.select_related("facility").filter(
            facility=facility, link_token_hash=upload_token_hash(token)).first()
    if found is None:
        _guess_failure(kind="link", limits=limits, scope="link", facility=facility,
                       address=address, now=now)
        raise PinRefused(_("This link does not open a request here."))
    if not found.is_open:
        raise RequestClosed(found)
    _request_opened(found, address=address, now=now, via="link")
    return found


def _request_opened(record_request: RecordRequest, *, address: str | None,
                    now: datetime.datetime, via: str) -> None:
    """The first opening moves a sent request to opened; every opening is audited."""
    if RecordRequest.objects.filter(pk=record_request.pk, status=Status.SENT).update(
            status=Status.OPENED, opened_at=now):
        record_request.status, record_request.opened_at = Status.OPENED, now
    upload_activity_record(record_request=record_request, action="request.open",
                           address=address, detail={"via": via})


def request_session_binding(record_request: RecordRequest) -> str:
    """Kept in an uploader's session: changes (ending the session) when the request is
    given a new PIN and link by a new Request Page."""
    return salted_hmac("retrieval.upload.session", f"{record_request.pk}:"
                       f"{record_request.pin_hash}:{record_request.link_token_hash}").hexdigest()


def upload_activity_record(*, record_request: RecordRequest, action: str,
                           address: str | None, detail: dict | None = None,
                           outcome: str = AuditEvent.Outcome.SUCCESS, obj=None) -> None:
    """Audit something an uploader's session did."""
    audit_record(action=action, outcome=outcome,
                 actor_type=AuditEvent.ActorType.UPLOAD_SESSION,
                 actor_ref=str(record_request.pk), request=_as_from(address),
                 facility=record_request.facility, obj=obj or record_request,
                 patient_ref=record_request.patient_id or None, detail=detail or {})


# --- The upload ------------------------------------------------------------------------


def upload_open(*, record_request: RecordRequest, address: str | None,
                now: datetime.datetime) -> Upload:
    """The request's open upload, made when there is none: whoever sends files for a
    request carries on with what was sent before, from any browser."""
    upload = Upload.objects.filter(request=record_request, status=Upload.Status.OPEN).first()
    if upload is not None:
        return upload
    try:
        with transaction.atomic():
            upload = Upload.objects.create(request=record_request, address=address,
                                           created_at=now, updated_at=now)
    except IntegrityError:
        # Opened at the same moment from another browser.
        return Upload.objects.get(request=record_request, status=Upload.Status.OPEN)
    upload_activity_record(record_request=record_request, action="request.upload.start",
                           address=address, obj=upload)
    return upload


def upload_current(record_request: RecordRequest) -> Upload | None:
    return Upload.objects.filter(request=record_request, status=Upload.Status.OPEN).first()


@dataclass(frozen=True)
class AnnouncedFile:
    path: str
    size: int
    head: bytes  # the file's first bytes (up to HEAD_BYTES)


@dataclass
class Announcement:
    """The server's answer to an announcement: for each file announced, in order, its
    path as kept and its outcome so far ("pending": still to be sent); and the upload's
    totals."""

    files: list[dict] = field(default_factory=list)
    total_files: int = 0
    total_bytes: int = 0


def path_clean(text: str) -> str:
    """A client's path as the label we keep: NFC (macOS sends NFD), "/" separators, no
    leading "/" or "./", no empty or "." components, at most PATH_MAX characters (an
    over-long path keeps its start and end)."""
    text = unicodedata.normalize("NFC", str(text)).replace("\\", "/")
    text = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    path = "/".join(parts)
    if len(path) > PATH_MAX:
        keep = (PATH_MAX - 1) // 2
        path = f"{path[:keep]}…{path[-keep:]}"
    return path


def files_announce(*, upload: Upload, files: list[AnnouncedFile], total_files: int,
                   total_bytes: int, now: datetime.datetime) -> Announcement:
    """Record the files the uploader chose (a batch of them) and answer which are
    settled already: sent before, refused for their size, or not DICOM. Raises
    ``UploadLimit`` when the upload would hold more files or bytes than allowed; then
    nothing of the batch is recorded."""
    if upload.status != Upload.Status.OPEN:
        raise RetrievalError(_("This upload is finished."))
    files = files[:ANNOUNCE_BATCH]
    paths = [path_clean(item.path) for item in files]
    wanted: dict[str, AnnouncedFile] = {}
    for path, item in zip(paths, files, strict=True):
        if path and path not in wanted:
            wanted[path] = AnnouncedFile(path, max(0, int(item.size)), item.head[:HEAD_BYTES])
    with transaction.atomic():
        # One announcement at a time per upload, so the limits hold.
        Upload.objects.select_for_update().filter(pk=upload.pk).first()
        known = {row.path: row for row in UploadedFile.objects.filter(
            upload=upload, path__in=list(wanted))}
        new = [f for path, f in wanted.items() if path not in known]
        totals = UploadedFile.objects.filter(upload=upload).aggregate(
            files=Count("id"), bytes=Sum("size"))
        files_after = totals["files"] + len(new)
        bytes_after = (totals["bytes"] or 0) + sum(f.size for f in new)
        _check_limits(files_after, bytes_after, total_files=total_files)
        rows = [_announced_row(upload, f, now) for f in new]
        UploadedFile.objects.bulk_create(rows)
        Upload.objects.filter(pk=upload.pk).update(
            files_expected=max(files_after, min(total_files, settings.UPLOAD_MAX_FILES)),
            bytes_expected=max(bytes_after, total_bytes), updated_at=now)
    by_path = {row.path: row for row in [*known.values(), *rows]}
    answer = Announcement(total_files=files_after, total_bytes=bytes_after)
    labels = outcome_labels()
    for path in paths:
        row = by_path.get(path)
        if row is None:
            answer.files.append({"path": path, "outcome": Outcome.REFUSED,
                                 "label": labels[Outcome.REFUSED],
                                 "reason": _("the file has no name")})
        else:
            answer.files.append({"path": row.path, "outcome": row.outcome,
                                 "label": labels[row.outcome], "reason": row.reason})
    return answer


def outcome_labels() -> dict[str, str]:
    """Each file outcome's label in the active language, for a whole answer at once:
    ``get_outcome_display()`` translates every choice's label on each call, which for
    a batch of files cost more than the rest of the answer."""
    return {value: str(label) for value, label in Outcome.choices}


def _check_limits(files: int, size: int, *, total_files: int) -> None:
    limit = settings.UPLOAD_MAX_FILES
    if files > limit or total_files > limit:
        raise UploadLimit(_(
            "One upload takes at most %(limit)s files, and this folder holds %(count)s. "
            "Upload its sub-folders one at a time (for example one study folder each), or "
            "call support.") % {"limit": f"{limit:,}", "count": f"{max(files, total_files):,}"})
    if size > settings.UPLOAD_MAX_BYTES:
        raise UploadLimit(_(
            "One upload takes at most %(limit)s in all. Upload the folder in parts, or "
            "call support.") % {"limit": filesizeformat(settings.UPLOAD_MAX_BYTES)})


def _announced_row(upload: Upload, item: AnnouncedFile, now: datetime.datetime
                   ) -> UploadedFile:
    row = UploadedFile(upload=upload, path=item.path, size=item.size,
                       outcome=Outcome.PENDING)
    if item.size > settings.UPLOAD_MAX_FILE_BYTES:
        row.outcome, row.received_at = Outcome.REFUSED, now
        row.reason = _("it is larger than the %(limit)s allowed for one file") % {
            "limit": filesizeformat(settings.UPLOAD_MAX_FILE_BYTES)}
    elif item.size == 0:
        row.outcome, row.received_at = Outcome.SKIPPED, now
        row.reason = _("the file is empty")
    elif item.head[DICM_OFFSET:DICM_OFFSET + 4] != b"DICM":
        row.outcome, row.received_at = Outcome.SKIPPED, now
        row.reason = _("not DICOM: %(kind)s") % {"kind": describe_non_dicom(item.head)}
    return row


class _Body:
    """The request body as ``ingest_file`` reads it: exactly ``size`` bytes, else an
    ``OSError`` (which ingest answers with a rejection that is then not kept)."""

    def __init__(self, stream: BinaryIO, size: int):
        self.stream, self.size, self.read_bytes = stream, size, 0
        self.incomplete = False

    def read(self, n: int = -1) -> bytes | memoryview:
        left = self.size - self.read_bytes
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        try:
            chunk = self.stream.read(n)
        except Exception as exc:  # the WSGI server's own error for a dropped client
            self.incomplete = True
            raise OSError("the connection ended") from exc
        if not chunk:
            self.incomplete = True
            raise OSError("the connection ended")
        self.read_bytes += len(chunk)
        return chunk


class _Pieces:
    """A request body read from the server in large pieces and handed out in the sizes
    asked for, as views of the piece: valid until the next read (``body_rest`` reuses
    its buffer), so whoever keeps them copies them. gunicorn copies what it has read
    ahead on every read, so reading each file of a batch on its own cost more than
    checking it."""

    PIECE = 1024 * 1024

    def __init__(self, stream: BinaryIO, length: int):
        self.stream, self.left = stream, length
        self.piece, self.at = memoryview(b""), 0

    def read(self, n: int) -> bytes | memoryview:
        if self.at == len(self.piece):
            if self.left <= 0:
                return b""
            data = self.stream.read(min(self.PIECE, self.left))
            if not data:
                self.left = 0
                return b""
            self.left -= len(data)
            self.piece, self.at = memoryview(data), 0
        start, self.at = self.at, min(self.at + n, len(self.piece))
        return self.piece[start:self.at]  # a view: the spool it goes to copies it


@dataclass(frozen=True)
class SentFile:
    """One file of a batch as the browser names it: its path on the disc, and how many
    of the body's bytes are its own."""

    path: str
    size: int


@dataclass
class FileAnswer:
    """What became of one file of a batch: its row, settled (or settled before, and not
    read again), or why it was not taken (``error``)."""

    path: str
    row: UploadedFile | None = None
    error: str = ""


def files_receive(*, record_request: RecordRequest, files: list[SentFile],
                  stream: BinaryIO, now: datetime.datetime) -> list[FileAnswer]:
    """Receive a batch of files announced in the request's open upload, their bytes one
    after another in ``stream`` (each ``SentFile.size`` long), and settle their rows:
    archived for the requesting facility (``IngestBatch``: every file checked as it
    arrives, all indexed together), or listed with the reason they were not. A file
    settled before is not read again.

    The files are archived first (which commits on its own), then their rows settled if
    still pending: a file settled is archived, and one archived whose row was not
    settled (a dropped connection, a crash in between) is sent again by the uploader's
    browser and settled then, as already archived. When the body ends early, the files
    that arrived whole are kept and settled, then ``UploadIncomplete`` is raised. Raises
    ``UploadBusy`` when storage is almost full and ``RetrievalError`` when no upload is
    open."""
    _check_free_space()
    paths = [path_clean(f.path) for f in files]
    rows = {row.path: row for row in _open_rows(paths).filter(
        upload__request=record_request)}
    if not rows and upload_current(record_request) is None:
        raise RetrievalError(_("This upload is finished."))
    return _settle_many(rows, record_request, files=files, paths=paths, stream=stream,
                        now=now)


def session_files_receive(*, request_id: int, binding: str, facility: str,
                          files: list[SentFile], stream: BinaryIO, now: datetime.datetime
                          ) -> list[FileAnswer] | None:
    """``files_receive`` for an uploader's session, which names its request by id and
    binding. None, with nothing read, when no file is of an open upload of that
    request, or the request is not open, of ``facility`` and bound to ``binding``; the
    caller then looks closer (the session may have ended, the files not been
    announced)."""
    _check_free_space()
    paths = [path_clean(f.path) for f in files]
    rows = {row.path: row for row in _open_rows(paths).filter(upload__request_id=request_id)}
    if not rows:
        return None
    # Read on its own, not joined to each of the rows: making its model instances for
    # every file of a batch costs more than the query.
    record_request = RecordRequest.objects.select_related("facility").get(pk=request_id)
    if not (record_request.is_open and record_request.facility.short_name == facility
            and binding == request_session_binding(record_request)):
        return None
    return _settle_many(rows, record_request, files=files, paths=paths, stream=stream,
                        now=now)


def _open_rows(paths: list[str]):
    """The rows of ``paths`` in an open upload."""
    return UploadedFile.objects.filter(
        upload__status=Upload.Status.OPEN, path__in=paths).order_by()


def _settle_many(rows: dict[str, UploadedFile], record_request: RecordRequest, *,
                 files: list[SentFile], paths: list[str], stream: BinaryIO,
                 now: datetime.datetime) -> list[FileAnswer]:
    answers: list[FileAnswer] = []
    settled: list[UploadedFile] = []
    waiting: list[tuple[int, UploadedFile]] = []  # (number in the batch, row)
    incomplete = False
    stream = _Pieces(stream, sum(sent.size for sent in files))
    with IngestBatch(facility=record_request.facility, source=IngestSource.UPLOAD) as batch:
        for sent, path in zip(files, paths, strict=True):
            body = _Body(stream, sent.size)
            row = rows.get(path)
            taken = row is not None and row.outcome == Outcome.PENDING and sent.size == row.size
            index = taken and (posixpath.basename(path).upper() == DICOMDIR_NAME
                               and sent.size <= DICOMDIR_MAX_BYTES)
            if not taken:
                answer = _not_taken(row, path)
                _drain(body)
            elif index:
                _receive_dicomdir(row.upload, row, body, facility=record_request.facility)
            else:
                number = len(batch)
                batch.add(fileobj=body, size=sent.size)
            if body.incomplete or body.read_bytes != sent.size:
                # What was cut short is not settled: the browser sends it again.
                incomplete = True
                break
            if not taken:
                answers.append(answer)
                continue
            answers.append(FileAnswer(path, row))
            if index:
                settled.append(row)
            else:
                waiting.append((number, row))
        outcomes = batch.archive()
    for number, row in waiting:
        _outcome_apply(row, outcomes[number])
        settled.append(row)
    _rows_settle(settled, now)
    if settled:
        _mark_uploading(record_request)
    if incomplete:
        raise UploadIncomplete(_("The file did not arrive whole."))
    return answers


def _not_taken(row: UploadedFile | None, path: str) -> FileAnswer:
    if row is None:
        return FileAnswer(path, error=_("This file was not announced."))
    if row.outcome != Outcome.PENDING:
        log.info("upload %s: file %s sent again after it was settled; not read",
                 row.upload_id, row.pk)
        return FileAnswer(path, row)
    return FileAnswer(path, error=_("The file changed after it was chosen: choose the "
                                    "folder again."))


def _drain(body: _Body) -> None:
    """Read past a file that is not taken, to the next one."""
    try:
        while body.read(CHUNK):
            pass
    except OSError:
        pass


def _rows_settle(rows: list[UploadedFile], now: datetime.datetime) -> None:
    """Write the rows' outcomes, those still pending only: of the same file sent twice
    at once, the first settled stays, and the other answer gives it (the row is read
    again). One statement for all the rows (an UPDATE from a VALUES list, which
    PostgreSQL and SQLite both read): the ORM's bulk update builds a CASE per column
    and row, which costs more than the rest of settling a file."""
    if not rows:
        return
    table = connection.ops.quote_name(UploadedFile._meta.db_table)
    values = ", ".join(["(CAST(%s AS INTEGER), %s, %s, %s, CAST(%s AS INTEGER))"] * len(rows))
    params = [value for row in rows for value in (
        row.pk, row.outcome, row.reason, row.sha256, row.instance_id)]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET outcome = v.column2, reason = v.column3, "
            f"sha256 = v.column4, instance_id = v.column5, received_at = %s "
            f"FROM (VALUES {values}) AS v WHERE {table}.id = v.column1 "
            f"AND {table}.outcome = %s RETURNING {table}.id",
            [connection.ops.adapt_datetimefield_value(now), *params, Outcome.PENDING])
        written = {row_id for (row_id,) in cursor.fetchall()}
    for row in rows:
        if row.pk in written:
            row.received_at = now
        else:
            row.refresh_from_db()


def _mark_uploading(record_request: RecordRequest) -> None:
    """The first file moves the request to uploading; later ones write nothing."""
    if record_request.status in (Status.SENT, Status.OPENED):
        RecordRequest.objects.filter(pk=record_request.pk, status__in=[
            Status.SENT, Status.OPENED]).update(status=Status.UPLOADING)
        record_request.status = Status.UPLOADING


def _check_free_space() -> None:
    spool = Path(settings.SPOOL_DIR)
    spool.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(spool).free < settings.UPLOAD_MIN_FREE_BYTES:
        log.warning("upload: storage almost full; receiving paused")
        raise UploadBusy(_("Receiving is paused for a moment. Your upload will carry on "
                           "by itself."))


def _outcome_apply(row: UploadedFile, outcome) -> None:
    """Put what ingest made of a file on its row."""
    row.sha256 = outcome.sha256
    row.instance = outcome.instance
    if outcome.status == IngestStatus.STORED:
        row.outcome, row.reason = Outcome.STORED, ""
    elif outcome.status == IngestStatus.DUPLICATE:
        row.outcome, row.reason = Outcome.DUPLICATE, ""
    elif outcome.status == IngestStatus.CONFLICT:
        row.outcome, row.reason = Outcome.CONFLICT, outcome.reason[:REASON_MAX]
    else:
        row.outcome, row.reason = Outcome.INVALID, outcome.reason[:REASON_MAX]


def _receive_dicomdir(upload: Upload, row: UploadedFile, body: _Body, *,
                      facility: Facility) -> None:
    """A disc's index: kept as the list of files it names, never as an image. A file
    named DICOMDIR that is not one goes through ingest like any other."""
    spool_dir = Path(settings.SPOOL_DIR)
    spool_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="dicomdir-") as spool:
        try:
            while chunk := body.read(CHUNK):
                spool.write(chunk)
        except OSError:
            return
        spool.flush()
        referenced = dicomdir_file_ids(spool.name)
        if referenced is None:
            spool.seek(0)
            _outcome_apply(row, ingest_file(facility=facility,
                                            fileobj=spool, source=IngestSource.UPLOAD))
            return
    base = posixpath.dirname(row.path)
    listed = [posixpath.join(base, file_id) if base else file_id for file_id in referenced]
    with transaction.atomic():
        locked = Upload.objects.select_for_update().get(pk=upload.pk)
        merged = list(dict.fromkeys([*locked.dicomdir_files, *listed]))
        Upload.objects.filter(pk=upload.pk).update(dicomdir_files=merged)
    upload.dicomdir_files = merged
    row.outcome = Outcome.SKIPPED
    row.reason = _("the disc's index (DICOMDIR), which lists %(count)s files; the images "
                   "are the files it lists") % {"count": len(listed)}


def dicomdir_file_ids(path: str | os.PathLike) -> list[str] | None:
    """The files a DICOMDIR lists, as "/"-separated paths relative to its folder, or
    None when the file is not a readable DICOMDIR. Each directory record that references
    a file names it by Referenced File ID (0004,1500): up to eight components, PS3.3
    F.3.2.2 and PS3.10 8.5."""
    from pydicom import dcmread
    from pydicom.uid import MediaStorageDirectoryStorage

    try:
        ds = dcmread(path, force=False)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) != MediaStorageDirectoryStorage:
            return None
        records = ds.get("DirectoryRecordSequence") or []
        found = []
        for record in records:
            file_id = record.get("ReferencedFileID")
            if file_id is None:
                continue
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            parts = [str(p).strip() for p in parts if str(p).strip()]
            if parts:
                found.append("/".join(parts))
        return list(dict.fromkeys(found))
    except Exception:  # untrusted input: whatever pydicom trips on is not a DICOMDIR
        log.info("upload: a file named DICOMDIR could not be read as one")
        return None


# --- What arrived ----------------------------------------------------------------------


@dataclass
class SeriesLine:
    number: int | None
    modality: str
    description: str
    images: int


@dataclass
class StudyLine:
    study_date: datetime.date | None
    description: str
    accession_number: str
    modalities: list[str]
    images: int = 0
    series: list[SeriesLine] = field(default_factory=list)


@dataclass
class PatientLine:
    name: str
    birth_date: datetime.date | None
    patient_id: str
    # The images give a date of birth other than the request's: perhaps the wrong disc.
    other_birth_date: bool = False
    images: int = 0
    studies: list[StudyLine] = field(default_factory=list)


@dataclass
class UploadSummary:
    """What an upload brought: its images by patient, study and series (this upload's
    files only), and every file that did not become an image, with the reason."""

    upload: Upload
    patients: list[PatientLine]
    counts: dict[str, int]
    files: int
    bytes: int
    skipped: list[UploadedFile]
    invalid: list[UploadedFile]
    pending: list[UploadedFile]
    dicomdir_missing: list[str]

    @property
    def images(self) -> int:
        return self.counts.get(Outcome.STORED, 0) + self.counts.get(Outcome.DUPLICATE, 0) + \
            self.counts.get(Outcome.CONFLICT, 0)

    @property
    def studies(self) -> int:
        return sum(len(p.studies) for p in self.patients)

    @property
    def complete(self) -> bool:
        return not self.pending and not self.dicomdir_missing


def upload_summary(upload: Upload) -> UploadSummary:
    rows = UploadedFile.objects.filter(upload=upload)
    counts = dict(rows.values_list("outcome").annotate(n=Count("id")).order_by())
    totals = rows.aggregate(files=Count("id"), bytes=Sum("size"))
    grouped = (
        rows.filter(instance__isnull=False)
        .values("instance__series__study__patient_id", "instance__series__study_id",
                "instance__series_id")
        .annotate(images=Count("instance", distinct=True)).order_by()
    )
    per_series = {g["instance__series_id"]: g["images"] for g in grouped}
    patients = _patient_lines(per_series, birth_date=upload.request.patient_birth_date)
    problems = rows.exclude(outcome__in=[Outcome.STORED, Outcome.DUPLICATE]).order_by("path")
    problem_rows = list(problems.only("path", "size", "outcome", "reason"))
    received_paths = {p.casefold() for p in rows.exclude(outcome=Outcome.PENDING)
                      .values_list("path", flat=True)} if upload.dicomdir_files else set()
    missing = [p for p in upload.dicomdir_files if p.casefold() not in received_paths]
    return UploadSummary(
        upload=upload, patients=patients, counts=counts, files=totals["files"],
        bytes=totals["bytes"] or 0,
        skipped=[r for r in problem_rows if r.outcome in (Outcome.SKIPPED, Outcome.REFUSED)],
        invalid=[r for r in problem_rows if r.outcome in (Outcome.INVALID, Outcome.CONFLICT)],
        pending=[r for r in problem_rows if r.outcome == Outcome.PENDING],
        dicomdir_missing=missing,
    )


def _patient_lines(per_series: dict[int, int], *, birth_date: datetime.date
                   ) -> list[PatientLine]:
    from dicomgw.models import Series

    patients: dict[int, PatientLine] = {}
    studies: dict[int, StudyLine] = {}
    series_rows = Series.objects.filter(pk__in=list(per_series)).select_related(
        "study__patient").order_by("study__patient__name_search", "-study__study_date",
                                   "study_id", "series_number", "id")
    for series in series_rows:
        study, patient = series.study, series.study.patient
        if patient.pk not in patients:
            patients[patient.pk] = PatientLine(
                name=Patient(name=patient.name).display_name or _("(no name)"),
                birth_date=patient.birth_date, patient_id=patient.patient_id,
                other_birth_date=bool(patient.birth_date and patient.birth_date != birth_date))
        if study.pk not in studies:
            studies[study.pk] = StudyLine(
                study_date=study.study_date, description=study.description,
                accession_number=study.accession_number, modalities=study.modality_list)
            patients[patient.pk].studies.append(studies[study.pk])
        images = per_series[series.pk]
        studies[study.pk].series.append(SeriesLine(
            number=series.series_number, modality=series.modality,
            description=series.description, images=images))
        studies[study.pk].images += images
        patients[patient.pk].images += images
    return list(patients.values())


# --- Confirm or decline ----------------------------------------------------------------


def upload_confirm(*, upload: Upload, address: str | None, now: datetime.datetime) -> Upload:
    """The uploader has sent what they meant to: the upload is confirmed, the request
    received, and its studies listed for the requester. Raises ``RetrievalError`` when
    no image arrived (nothing to confirm) or the request has ended meanwhile."""
    with transaction.atomic():
        locked = Upload.objects.select_for_update().select_related("request").get(pk=upload.pk)
        if locked.status == Upload.Status.CONFIRMED:
            return locked
        if locked.status != Upload.Status.OPEN or not locked.request.is_open:
            raise RetrievalError(_("This request is closed: the upload can no longer be "
                                   "confirmed."))
        summary = upload_summary(locked)
        if summary.images == 0:
            raise RetrievalError(_("No DICOM images have arrived yet, so there is nothing "
                                   "to confirm. Choose the disc or folder with the images, "
                                   "or decline the request."))
        Upload.objects.filter(pk=locked.pk).update(
            status=Upload.Status.CONFIRMED, confirmed_at=now, updated_at=now)
        RecordRequest.objects.filter(
            pk=locked.request_id, status__in=RecordRequest.OPEN_STATUSES,
        ).update(status=Status.RECEIVED, received_at=now)
        record_request = RecordRequest.objects.select_related("facility").get(
            pk=locked.request_id)
        request_studies_collect(record_request=record_request)
        upload_activity_record(
            record_request=record_request, action="request.upload.confirm",
            address=address, obj=locked,
            detail={"images": summary.images, "studies": summary.studies,
                    "files": summary.files, "bytes": summary.bytes,
                    "skipped": len(summary.skipped), "invalid": len(summary.invalid),
                    "not_arrived": len(summary.pending),
                    "dicomdir_missing": len(summary.dicomdir_missing)})
    locked.refresh_from_db()
    return locked


def request_decline(*, record_request: RecordRequest, reason: str, address: str | None,
                    now: datetime.datetime) -> RecordRequest:
    """The outside facility will not send the records, for ``reason``: the request ends
    (declined), its open upload is abandoned. Raises ``RetrievalError`` without a
    reason, or once an upload has been confirmed or the request has ended."""
    reason = " ".join((reason or "").split())
    if not reason:
        raise RetrievalError(_("Say why the records cannot be sent."))
    max_length = RecordRequest._meta.get_field("decline_reason").max_length
    with transaction.atomic():
        declined = RecordRequest.objects.filter(
            pk=record_request.pk, status__in=DECLINABLE,
        ).update(status=Status.DECLINED, declined_at=now, decline_reason=reason[:max_length])
        if not declined:
            raise RetrievalError(_("This request can no longer be declined."))
        abandoned = Upload.objects.filter(
            request=record_request, status=Upload.Status.OPEN,
        ).update(status=Upload.Status.ABANDONED, updated_at=now)
        record_request.refresh_from_db()
        upload_activity_record(record_request=record_request, action="request.decline",
                               address=address, detail={"uploads_abandoned": abandoned})
    return record_request

