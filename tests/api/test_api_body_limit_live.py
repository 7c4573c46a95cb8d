"""A real daphne refuses an oversized request body with 413 while it arrives, not after."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ws.conftest import Server, start_server

LIMIT = 1000


@pytest.fixture(scope="module")
def server(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[Server]:
    with django_db_blocker.unblock():
        started = start_server(tmp_path_factory.mktemp("limit") / "daphne.log", PEGASUS_MAX_REQUEST_BYTES=str(LIMIT))
    yield started
    started.close()


def _exchange(port: int, head: bytes, chunks: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """Send the head and chunks (stopping quietly if the server hangs up) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head)
        for chunk in chunks:
            try:
                conn.sendall(chunk)
            except OSError:
                break
        answer = b""
        while data := conn.recv(65536):
            answer += data
        return answer


def _request(method: str, length_header: bytes) -> bytes:
    return (
        f"{method} /api/v1/queues/q/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
        + length_header
        + b"\r\n"
    )


def test_declared_length_over_the_limit_is_refused_before_any_body_is_sent(server: Server):
    # The body never comes: an answer at all proves it was not waited for.
    answer = _exchange(server.port, _request("POST", b"Content-Length: 1000000000\r\n"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_chunked_body_is_refused_once_it_passes_the_limit(server: Server):
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"  # 0x258 = 600 bytes
    answer = _exchange(server.port, _request("POST", b"Transfer-Encoding: chunked\r\n"), [chunk, chunk])
    assert answer.startswith(b"HTTP/1.1 413")  # after 1200 bytes, without the final chunk


def test_a_body_within_the_limit_reaches_the_application(server: Server):
    body = b'{"body": "x"}'
    answer = _exchange(server.port, _request("POST", b"Content-Length: %d\r\nConnection: close\r\n" % len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 401")  # no token: the API answered
