"""Refuse a request body over PEGASUS MAX_REQUEST_BYTES with 413 before it is read whole.

Two layers, both installed by pegasus_site/asgi.py:

- `guard_daphne()`: daphne (Twisted) reads a whole request body, spooling it to a temporary
  file, before it calls the application at all. The guard answers 413 and closes the connection
  as soon as the headers declare a Content-Length over the limit, or as soon as the received
  chunks pass it, so an oversized upload is never stored.
- `BodyLimit`: ASGI middleware in front of Django, for any other ASGI server: a declared length
  over the limit is refused without reading; a body without one is read only up to the limit.

Django's own DATA_UPLOAD_MAX_MEMORY_SIZE check (mapped to 413 in pegasus_site/api.py) covers
the test client and WSGI.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from messaging import conf

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = conf.get().max_request_bytes
        length = _content_length(scope)
        if length is not None:
            if length > limit:
                return await _refuse(send, limit)
            return await self.app(scope, receive, send)
        body = await _read_upto(receive, limit)
        if body is None:
            return await _refuse(send, limit)
        return await self.app(scope, replay(body, receive), send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else 2**63  # unparsable: treat as too large
    return None


async def _read_upto(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # disconnected: let the app see it
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _error_body(limit: int) -> bytes:
    error = {"code": "request_too_large", "message": f"The request body is larger than {limit} bytes."}
    return json.dumps({"error": error}).encode()


async def _refuse(send: Send, limit: int) -> None:
    payload = _error_body(limit)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- daphne


def guard_daphne() -> None:
    """Teach daphne's request class to refuse oversized bodies while they arrive (idempotent)."""
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:  # not served by daphne
        return
    if getattr(WebRequest, "_pegasus_body_limit", False):
        return
    got_length, handle_chunk, request_received = (
        WebRequest.gotLength, WebRequest.handleContentChunk, WebRequest.requestReceived,
    )  # fmt: skip

    def gotLength(self: Any, length: int | None) -> None:  # Twisted names these
        self._pegasus_received = 0
        self._pegasus_refused = False
        if length is not None and length > conf.get().max_request_bytes:
            _refuse_on_transport(self)
        got_length(self, 0 if self._pegasus_refused else length)

    def handleContentChunk(self: Any, data: bytes) -> None:
        if self._pegasus_refused:
            return  # the connection is closing; drop what is still in flight
        self._pegasus_received += len(data)
        if self._pegasus_received > conf.get().max_request_bytes:
            _refuse_on_transport(self)
            return
        handle_chunk(self, data)

    def requestReceived(self: Any, command: bytes, path: bytes, version: bytes) -> None:
        if not getattr(self, "_pegasus_refused", False):
            request_received(self, command, path, version)

    _remember_content_types()
    WebRequest.gotLength = gotLength
    WebRequest.handleContentChunk = handleContentChunk
    WebRequest.requestReceived = requestReceived
    WebRequest._pegasus_body_limit = True


def _remember_content_types() -> None:
    """Twisted parses every POST's Content-Type with the email package (to spot form posts),
    a tenth of a small publish's CPU. The parse is a pure function of a few distinct header
    values, so it is remembered."""
    from twisted.web import http

    http._parseContentType = functools.lru_cache(maxsize=256)(http._parseContentType)


def _refuse_on_transport(request: Any) -> None:
    request._pegasus_refused = True
    payload = _error_body(conf.get().max_request_bytes)
    head = (
        b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n"
    )
    request.channel.transport.write(head + payload)
    request.channel.transport.loseConnection()
