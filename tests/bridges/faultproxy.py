"""A TCP proxy on 127.0.0.1 that misbehaves like a bad WAN: it refuses and drops connections,
delays and stalls traffic, and cuts answers in the middle. asyncio, in its own thread.

Every decision comes from one seeded random generator, and every fault is counted, so a run can
be reported (and, up to scheduling, repeated).
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass


@dataclass
class Faults:
    refuse: float = 0.10  # per connection: closed at once, nothing forwarded
    drop_request: float = 0.05  # per client->server chunk: connection closed, the chunk lost
    cut_response: float = 0.10  # per server->client chunk: half of it sent, then closed
    delay: float = 0.20  # per chunk: held 20-300 ms
    stall: float = 0.01  # per chunk: held past the client's timeout
    stall_seconds: float = 4.0


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int, faults: Faults | None = None) -> None:
        self.upstream_port = upstream_port
        self.faults = faults or Faults()
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.enabled = True  # False: forward faithfully (used to let a run finish cleanly)
        self._loop = asyncio.new_event_loop()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._started = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=self._sock))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    # ------------------------------------------------------------------ faults

    def _roll(self, fault: str, chance: float) -> bool:
        if self.enabled and self.random.random() < chance:
            self.counts[fault] += 1
            return True
        return False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        if self._roll("refused", self.faults.refuse):
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        writers = (client_w, server_w)
        await asyncio.gather(
            self._pump(client_r, server_w, writers, upstream=True),
            self._pump(server_r, client_w, writers, upstream=False),
            return_exceptions=True,
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        *,
        upstream: bool,
    ) -> None:
        f = self.faults
        try:
            while chunk := await reader.read(65536):
                if self._roll("stalled", f.stall):
                    await asyncio.sleep(f.stall_seconds)
                elif self._roll("delayed", f.delay):
                    await asyncio.sleep(self.random.uniform(0.02, 0.3))
                if upstream and self._roll("requests dropped", f.drop_request):
                    break
                if not upstream and self._roll("responses cut", f.cut_response):
                    writer.write(chunk[: len(chunk) // 2])
                    await writer.drain()
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in writers:  # either side ending ends the connection, as a dropped link does
                w.transport.abort()
