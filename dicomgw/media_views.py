"""The disc image's status fragment and its download, for the views that own the access
check (the recipient inbox mounts them): each takes the ``MediaJob`` the caller has
already allowed.

The download honours HTTP range requests (RFC 9110 14), so a browser or download
manager can resume a large image: one range is answered 206 with Content-Range, several
as multipart/byteranges, an unsatisfiable one 416; If-Range falls back to the whole
file when the image has changed."""

import re
import secrets
from collections.abc import Iterator

from django.core.files.storage import default_storage
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.utils import timezone
from django.utils.http import http_date, parse_http_date_safe
from django.utils.translation import gettext as _

from .models import MediaJob

CONTENT_TYPE = "application/x-iso9660-image"
CHUNK = 1 << 20
# More ranges than this in one request are answered with the whole file: a client
# resuming a download asks for one.
MAX_RANGES = 16
RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
STATUS_CLASSES = {"queued": "running", "running": "running", "ready": "complete",
                  "failed": "failed", "expired": "partial"}


def media_job_status(request: HttpRequest, job: MediaJob, *, download_url: str | None = None,
                     poll_url: str | None = None) -> HttpResponse:
    """The job's status as an htmx fragment that polls ``poll_url`` (by default the
    address it was fetched from) every second until the image is ready or has failed;
    once ready it links to ``download_url``."""
    job.refresh_from_db()
    expired = job.status == MediaJob.Status.EXPIRED or (
        job.status != MediaJob.Status.RUNNING and job.expires_at <= timezone.now())
    response = render(request, "media/_job_status.html", {
        "job": job, "expired": expired,
        "status_class": "partial" if expired else STATUS_CLASSES.get(job.status, "running"),
        "poll_url": poll_url or request.get_full_path(), "download_url": download_url,
    })
    response["Cache-Control"] = "no-store"
    return response


def _etag(job: MediaJob) -> str:
    return f'"media-{job.pk}-{job.size}-{int(job.finished_at.timestamp())}"'


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges of a Range header as inclusive (first, last) pairs, sorted and
    merged; None when the header is not a valid byte-range set (RFC 9110 14.2: then it
    is ignored); [] when it is valid but no range is satisfiable."""
    unit, _sep, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip():
        return None
    ranges = []
    for spec in specs.split(","):
        if not spec.strip():
            continue
        match = RANGE_SPEC.match(spec)
        if not match:
            return None
        first, last = match.groups()
        if first == "" and last == "":
            return None
        if first == "":  # a suffix: the last N bytes
            length = int(last)
            if length == 0 or size == 0:
                continue
            ranges.append((max(size - length, 0), size - 1))
            continue
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None
        if start >= size:
            continue
        ranges.append((start, min(end, size - 1)))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _if_range_holds(request: HttpRequest, etag: str, last_modified: int) -> bool:
    """RFC 9110 13.1.5: the range applies only if the validator still matches (a strong
    ETag, or exactly the Last-Modified date)."""
    condition = request.headers.get("If-Range")
    if condition is None:
        return True
    condition = condition.strip()
    if condition.startswith('"'):
        return condition == etag
    date = parse_http_date_safe(condition)
    return date is not None and date == last_modified


def _file_part(name: str, start: int, end: int) -> Iterator[bytes]:
    with default_storage.open(name, "rb") as fh:
        fh.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def _multipart(name: str, ranges: list[tuple[int, int]], size: int,
               boundary: str) -> tuple[Iterator[bytes], int]:
    heads = [(f"\r\n--{boundary}\r\nContent-Type: {CONTENT_TYPE}\r\n"
              f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n").encode()
             for start, end in ranges]
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(h) for h in heads) + sum(e - s + 1 for s, e in ranges) + len(tail)

    def body() -> Iterator[bytes]:
        for head, (start, end) in zip(heads, ranges, strict=True):
            yield head
            yield from _file_part(name, start, end)
        yield tail

    return body(), length


def media_job_download(request: HttpRequest, job: MediaJob) -> HttpResponse:
    """The job's disc image as ``ISO_<Lastname>.iso``: 404 until it is ready, 410 once it
    has expired; GET and HEAD, whole or by ranges."""
    job.refresh_from_db()
    # Past its expiry the image is gone for the recipient, even before the purge runs.
    if job.status == MediaJob.Status.EXPIRED or job.expires_at <= timezone.now():
        response = HttpResponse(_("This disk image has expired."), status=410,
                                content_type="text/plain; charset=utf-8")
        response["Cache-Control"] = "no-store"
        return response
    if job.status != MediaJob.Status.READY or not job.file:
        raise Http404("the disc image is not ready")
    name = job.file.name
    if not default_storage.exists(name):
        raise Http404("the disc image is gone")
    size = job.size
    etag = _etag(job)
    last_modified = int(job.finished_at.timestamp())
    headers = {
        "Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": http_date(last_modified),
        "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{job.download_name}"',
    }

    ranges = None
    header = request.headers.get("Range")
    if header and request.method in ("GET", "HEAD") and _if_range_holds(request, etag,
                                                                         last_modified):
        ranges = parse_ranges(header, size)
        if ranges is not None and len(ranges) > MAX_RANGES:
            ranges = None
    if ranges == []:
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        for key in ("Accept-Ranges", "Cache-Control"):
            response[key] = headers[key]
        return response

    head_only = request.method == "HEAD"
    if not ranges:
        if head_only:
            response = HttpResponse(content_type=CONTENT_TYPE)
            response["Content-Length"] = str(size)
        else:
            response = FileResponse(default_storage.open(name, "rb"), content_type=CONTENT_TYPE)
            response["Content-Length"] = str(size)
    elif len(ranges) == 1:
        start, end = ranges[0]
        body = iter(()) if head_only else _file_part(name, start, end)
        response = StreamingHttpResponse(body, status=206, content_type=CONTENT_TYPE)
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
        response["Content-Length"] = str(end - start + 1)
    else:
        boundary = secrets.token_hex(16)
        body, length = _multipart(name, ranges, size, boundary)
        response = StreamingHttpResponse(
            iter(()) if head_only else body, status=206,
            content_type=f"multipart/byteranges; boundary={boundary}")
        response["Content-Length"] = str(length)
    for key, value in headers.items():
        response[key] = value
    return response
