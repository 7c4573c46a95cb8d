"""A minimal keep-alive HTTP/1.1 JSON client on asyncio streams.

The benchmark client shares two cores with the server and PostgreSQL; a general-purpose client
(httpx) spends several times more CPU per request than this, which would be measured as server
slowness. It speaks just enough HTTP for Pegasus: JSON bodies, Content-Length or chunked answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class HttpError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {str(body)[:300]}")
        self.status = status
        self.body = body


class Client:
    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(
        self, method: str, path: str, payload: Any = None, *, expect: tuple[int, ...] = (200, 201)
    ) -> Any:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        reused = self._writer is not None and not self._writer.is_closing()
        reader, writer = await self._connect()
        try:
            writer.write(head)
            status, data, close = await _read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # A keep-alive connection the server closed while idle (daphne times idle ones out)
            # fails before any answer: the request was not served, so send it once more on a
            # new connection, as HTTP clients do.
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            self._writer = None
            reader, writer = await self._connect()
            writer.write(head)
            status, data, close = await _read_response(reader)
        if close:
            writer.close()
            self._writer = None
        try:
            answer = json.loads(data) if data else None
        except ValueError:  # an HTML error page (Django's 404 or 500)
            answer = data.decode("utf-8", "replace")
        if status not in expect:
            raise HttpError(status, answer)
        return answer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    close = headers.get("connection", "").lower() == "close"
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"])), close
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return status, await _read_chunked(reader), close
    return status, await reader.read(), True


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
