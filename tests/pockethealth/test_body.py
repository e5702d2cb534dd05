"""A request body read past gunicorn's buffers (``pockethealth.body``), with gunicorn's own
reader objects over a real socket: the bytes come out whole and in order, what gunicorn
had read ahead is given first, what follows the body (the next request on the
connection) stays for gunicorn, and a connection that ends early is not reused."""

import os
import socket
import threading

import pytest
from django.test import RequestFactory
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader

from pockethealth.body import SocketBody, body_rest

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def gunicorn_request(sock: socket.socket, length: int):
    """A Django request whose body is gunicorn's reader of ``length`` bytes on ``sock``
    (which fails, rather than waits for ever, when a test's bytes are lost)."""
    sock.settimeout(10)
    unreader = SocketUnreader(sock)
    body = Body(LengthReader(unreader, length))
    request = RequestFactory().generic("POST", "/batch", content_type="application/octet-stream")
    request.META["wsgi.input"] = body
    request.META["CONTENT_LENGTH"] = str(length)
    from django.core.handlers.wsgi import LimitedStream

    request._stream = LimitedStream(body, length)
    return request, body, unreader


def send_later(sock: socket.socket, data: bytes, *, close: bool = False) -> threading.Thread:
    def run():
        view = memoryview(data)
        for start in range(0, len(view), 70_000):  # the body arrives piece by piece
            sock.sendall(view[start:start + 70_000])
        if close:
            sock.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def read_all(reader, size: int) -> bytes:
    out = bytearray()
    while len(out) < size and (chunk := reader.read(min(1 << 20, size - len(out)))):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("first_read", [10, 5000])
def test_the_rest_of_the_body_comes_from_the_socket_and_the_next_request_stays(first_read):
    body_bytes = os.urandom(3_000_000)
    server, client = socket.socketpair()
    with server, client:
        request, gunicorn_body, unreader = gunicorn_request(server, len(body_bytes))
        sender = send_later(client, body_bytes + NEXT_REQUEST)
        assert request.read(first_read) == body_bytes[:first_read]  # the manifest
        rest = body_rest(request, len(body_bytes) - first_read)
        assert isinstance(rest, SocketBody)
        assert read_all(rest, len(body_bytes)) == body_bytes[first_read:]
        assert rest.read(100) == b""
        sender.join()
        # gunicorn sees the body read to its end, and the next request where it expects.
        assert gunicorn_body.read(8192) == b""
        assert not gunicorn_body.failed
        assert unreader.read(len(NEXT_REQUEST)) == NEXT_REQUEST


def test_a_body_that_came_with_the_headers_leaves_the_next_request_to_gunicorn():
    """gunicorn reads the headers 8 KB at a time: a small body, and the start of the
    request after it, may already be in its buffer."""
    body_bytes = os.urandom(3000)
    server, client = socket.socketpair()
    with server, client:
        request, gunicorn_body, unreader = gunicorn_request(server, len(body_bytes))
        unreader.unread(body_bytes + NEXT_REQUEST)
        assert request.read(100) == body_bytes[:100]
        rest = body_rest(request, len(body_bytes) - 100)
        assert isinstance(rest, SocketBody)
        assert read_all(rest, len(body_bytes)) == body_bytes[100:]
        assert gunicorn_body.read(8192) == b""
        assert unreader.read(len(NEXT_REQUEST)) == NEXT_REQUEST


def test_a_body_left_unread_is_still_discarded_by_gunicorn():
    body_bytes = os.urandom(500_000)
    server, client = socket.socketpair()
    with server, client:
        request, gunicorn_body, unreader = gunicorn_request(server, len(body_bytes))
        sender = send_later(client, body_bytes + NEXT_REQUEST)
        rest = body_rest(request, len(body_bytes))
        assert bytes(rest.read(200_000)) == body_bytes[:200_000]
        # As gunicorn's parser does before the next request.
        while gunicorn_body.read(8192):
            pass
        sender.join()
        assert unreader.read(len(NEXT_REQUEST)) == NEXT_REQUEST


def test_a_connection_that_ends_early_gives_what_came_and_is_not_reused():
    body_bytes = os.urandom(400_000)
    server, client = socket.socketpair()
    with server:
        request, gunicorn_body, _unreader = gunicorn_request(server, len(body_bytes))
        sender = send_later(client, body_bytes[:300_000], close=True)
        rest = body_rest(request, len(body_bytes))
        assert read_all(rest, len(body_bytes)) == body_bytes[:300_000]
        sender.join()
        assert gunicorn_body.failed


def test_a_body_not_from_gunicorn_is_read_the_ordinary_way():
    request = RequestFactory().generic("POST", "/batch", data=b"abcdef",
                                       content_type="application/octet-stream")
    assert body_rest(request, 6) is request
    assert request.read(6) == b"abcdef"


def test_counts_that_do_not_add_up_are_read_the_ordinary_way():
    server, client = socket.socketpair()
    with server, client:
        request, _body, _unreader = gunicorn_request(server, 1000)
        assert body_rest(request, 999) is request
        assert isinstance(body_rest(request, 1000), SocketBody)
