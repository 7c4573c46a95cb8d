"""Refuse a request body over PEGASUS MAX_REQUEST_BYTES with 413 before the application reads it.

ASGI middleware, in front of Django (pegasus_site/asgi.py). A declared Content-Length over the
limit is answered at once, without reading the body; a body without one (chunked) is read only
up to the limit. Django's own DATA_UPLOAD_MAX_MEMORY_SIZE check (mapped to 413 in
pegasus_site/api.py) covers the test client and WSGI.
"""

from __future__ import annotations

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
        return await self.app(scope, _replay(body, receive), send)


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


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(send: Send, limit: int) -> None:
    error = {"code": "request_too_large", "message": f"The request body is larger than {limit} bytes."}
    payload = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
