"""Reading a large request body without the WSGI server's buffering.

gunicorn hands a body out through two layers of buffers (its ``Body`` and its socket
``Unreader``), each ``read`` collecting received pieces in one and copying what is left
over back: a megabyte read costs several copies of it and a loop of Python calls per
piece received. A disc uploaded in batches of files is gigabytes, so under gunicorn the
rest of a body is read straight from the connection's socket into one buffer per read,
with gunicorn's own counters kept right, so that it finds the connection where it
expects it after the answer (and a body not read to its end is still discarded by
gunicorn before the next request). Under any other server, or a gunicorn whose insides
are not as expected, the body is read the ordinary way."""

import io
from typing import BinaryIO

from django.http import HttpRequest


class SocketBody:
    """The unread part of a request body, ``length`` bytes, served from the bytes
    gunicorn had already received and then from its socket. ``read(n)`` returns up to
    ``n`` bytes (fewer only at the end of the body or of the connection) as a view of
    one buffer that the next read overwrites: whoever keeps bytes copies them (making
    and zeroing a new buffer for every read cost more than receiving into it)."""

    def __init__(self, body, sock, length: int, head: bytes):
        self.body, self.sock, self.left = body, sock, length
        self.head, self.at = memoryview(head), 0
        self.buffer = memoryview(b"")

    def read(self, n: int = -1) -> bytes | memoryview:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        if self.at < len(self.head):
            start, self.at = self.at, min(self.at + n, len(self.head))
            self.left -= self.at - start
            return self.head[start:self.at]
        if len(self.buffer) < n:
            self.buffer = memoryview(bytearray(n))
        view, got = self.buffer, 0
        try:
            while got < n:
                received = self.sock.recv_into(view[got:], n - got)
                if not received:
                    break
                got += received
        except Exception:
            self.body.failed = True  # gunicorn will not reuse the connection
            raise
        finally:
            self.body.reader.length -= got
            self.left -= got
        if got < n:
            self.left = 0
            self.body.failed = True
        return view[:got]


def body_rest(request: HttpRequest, length: int) -> BinaryIO | SocketBody:
    """A reader of the next ``length`` bytes of ``request``'s body (the rest of it, as
    the Content-Length says, after whatever was read with ``request.read``)."""
    body = request.META.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    sock = getattr(unreader, "sock", None)
    if not (type(body).__module__ == "gunicorn.http.body" and type(body).__name__ == "Body"
            and type(reader).__name__ == "LengthReader"
            and type(unreader).__name__ == "SocketUnreader"
            and hasattr(sock, "recv_into")
            and isinstance(getattr(body, "buf", None), io.BytesIO)
            and isinstance(getattr(unreader, "buf", None), io.BytesIO)
            and isinstance(getattr(reader, "length", None), int)
            and length == len(body.buf.getvalue()) + reader.length):
        return request
    # What gunicorn holds already: what its Body read ahead, then the part of what its
    # Unreader received that is still this body's (anything after it is the next
    # request's, and stays there).
    held = body.buf.getvalue()
    body.buf = io.BytesIO()
    received = unreader.buf.getvalue()
    ours = received[:reader.length]
    if ours:
        unreader.buf = io.BytesIO()
        unreader.buf.write(received[len(ours):])
        reader.length -= len(ours)
    # Django's own view of the body is left behind: nothing reads it after this.
    request._stream = io.BytesIO()
    return SocketBody(body, sock, length, held + ours)
