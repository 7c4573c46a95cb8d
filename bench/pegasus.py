"""Pegasus measurements over REST (bench.http) and WebSocket (websockets), against bench.server.

Every stage makes its own queue or topic, so stages never see each other's messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from bench.common import BODY, Result, Scale, percentile
from bench.http import Client
from bench.server import Server

API = "/api/v1"
_names = itertools.count(1)


class Pegasus:
    """Connections to one running server."""

    def __init__(self, server: Server, token: str) -> None:
        self.server, self.token = server, token
        self.admin = self.client()

    def client(self) -> Client:
        return Client("127.0.0.1", self.server.port, self.token)

    def ws(self) -> Ws:
        return Ws(f"{self.server.ws_base}/ws/v1/?token={self.token}")

    async def new_queue(self, prefix: str) -> str:
        name = f"{prefix}-{next(_names)}"
        await self.admin.request("POST", f"{API}/queues", {"name": name}, expect=(201,))
        return name

    async def new_topic(self, prefix: str, subscriptions: int) -> tuple[str, list[str]]:
        name = f"{prefix}-{next(_names)}"
        await self.admin.request("POST", f"{API}/topics", {"name": name}, expect=(201,))
        subs = [f"s{i}" for i in range(subscriptions)]
        for sub in subs:
            await self.admin.request(
                "POST", f"{API}/topics/{name}/subscriptions", {"name": sub, "durable": True}, expect=(201,)
            )
        return name, subs


def batch_payload(size: int, *, durable: bool = True) -> dict[str, Any]:
    return {"messages": [{"body": BODY, "durable": durable} for _ in range(size)]}


async def _publish_loop(
    connect: Callable[[], Client], path: str, payload: dict[str, Any], n: int, deadline: float
) -> int:
    client = connect()
    done = 0
    try:
        while time.perf_counter() < deadline:
            answer = await client.request("POST", path, payload, expect=(201,))
            assert len(answer["messages"]) == n, answer
            done += n
    finally:
        await client.close()
    return done


async def publish_for(
    connect: Callable[[], Client], path: str, payload: dict[str, Any], n: int, clients: int, secs: float
) -> tuple[int, float]:
    start = time.perf_counter()
    counts = await asyncio.gather(*(_publish_loop(connect, path, payload, n, start + secs) for _ in range(clients)))
    return sum(counts), time.perf_counter() - start


async def publish_single(peg: Pegasus, scale: Scale, *, clients: int = 8) -> Result:
    queue = await peg.new_queue("single")
    n, secs = await publish_for(peg.client, f"{API}/queues/{queue}/messages", {"body": BODY}, 1, clients, scale.seconds)
    return Result("durable publish, 1 per request", "pegasus", n, secs, {"clients": clients, "interface": "REST"})


async def publish_batch(
    peg: Pegasus, scale: Scale, *, durable: bool = True, clients: int = 1, size: int = 100
) -> Result:
    queue = await peg.new_queue("batch")
    path = f"{API}/queues/{queue}/messages"
    n, secs = await publish_for(peg.client, path, batch_payload(size, durable=durable), size, clients, scale.seconds)
    name = f"{'durable' if durable else 'non-durable'} publish, batch {size}"
    return Result(name, "pegasus", n, secs, {"clients": clients, "batch": size, "interface": "REST"})


async def fan_out(peg: Pegasus, scale: Scale, *, subscriptions: int = 10, clients: int = 1) -> Result:
    topic, _ = await peg.new_topic("fanout", subscriptions)
    n, secs = await publish_for(
        peg.client, f"{API}/topics/{topic}/messages", batch_payload(100), 100, clients, scale.seconds
    )
    extra = {
        "subscriptions": subscriptions,
        "batch": 100,
        "clients": clients,
        "deliveries_per_s": n * subscriptions / secs,
    }
    return Result(f"fan-out to {subscriptions} subscriptions, batch 100", "pegasus", n, secs, extra)


async def fill(peg: Pegasus, queue: str, count: int, *, clients: int = 2, size: int = 1000) -> float:
    """Publish `count` durable messages in batches of `size` from `clients` connections; seconds taken."""
    batches = [min(size, count - i) for i in range(0, count, size)]
    todo = iter(batches)

    async def worker() -> None:
        client = peg.client()
        for n in todo:
            await client.request("POST", f"{API}/queues/{queue}/messages", batch_payload(n), expect=(201,))
        await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start


async def drain_rest(
    peg: Pegasus, queue: str, expected: int, *, batch: int = 100, clients: int = 1, ride_acks: bool = False
) -> tuple[int, float]:
    """Receive + ack in batches until `expected` messages were acked; (acked, seconds). With
    `ride_acks`, each batch's acks travel in the next receive (`ack`, docs/rest.md) instead of an
    /ack request of their own; the last batch's go in a final /ack."""
    acked = received = 0
    start = time.perf_counter()

    def count_ok(results: list[dict[str, str]]) -> int:
        return sum(1 for r in results if r["status"] == "ok")

    async def worker() -> None:
        nonlocal acked, received
        client = peg.client()

        async def ack(receipts: list[str]) -> int:
            return count_ok((await client.request("POST", f"{API}/ack", {"receipts": receipts}))["results"])

        receipts: list[str] = []
        # Stop on what was received, not acked: riding acks lag a batch behind, and one more
        # receive of the then empty queue would wait out its wait_seconds.
        while received < expected:
            ask: dict[str, Any] = {"max_messages": batch, "wait_seconds": 1}
            if ride_acks and receipts:
                ask["ack"] = receipts
            got = await client.request("POST", f"{API}/queues/{queue}/receive", ask)
            acked += count_ok(got.get("acked", []))
            receipts = [m["receipt"] for m in got["messages"]]
            received += len(receipts)
            if not receipts:
                break
            if not ride_acks:
                acked += await ack(receipts)
                receipts = []
        if receipts:
            acked += await ack(receipts)
        await client.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return acked, time.perf_counter() - start


async def consume_rest(peg: Pegasus, scale: Scale, *, batch: int = 100, ride_acks: bool = False) -> Result:
    queue = await peg.new_queue("consume")
    await fill(peg, queue, scale.drain_messages)
    n, secs = await drain_rest(peg, queue, scale.drain_messages, batch=batch, ride_acks=ride_acks)
    name = f"consume, acks on the next receive, batch {batch}" if ride_acks else f"consume + ack, batch {batch}"
    return Result(name, "pegasus", n, secs, {"interface": "REST", "batch": batch})


# --------------------------------------------------------------------------- WebSocket


class Ws:
    """One JSON WebSocket connection (docs/API.md, "WebSocket")."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None

    async def __aenter__(self) -> Ws:
        import websockets

        self.conn = await websockets.connect(self.url, max_size=None, compression=None, ping_interval=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(frame, separators=(",", ":")))

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.conn.recv())
        if frame.get("op") == "error":
            raise RuntimeError(f"WebSocket error frame: {frame}")
        return frame


async def ws_publish(peg: Pegasus, scale: Scale, *, size: int = 1, window: int = 100) -> Result:
    """Publish over one WebSocket, keeping up to `window` publishes unconfirmed (pipelined)."""
    queue = await peg.new_queue("wspub")
    messages = [{"body": BODY} for _ in range(size)]
    confirmed = 0
    async with peg.ws() as ws:
        sent = 0
        start = time.perf_counter()
        deadline = start + scale.seconds
        while True:
            while sent - confirmed < window and time.perf_counter() < deadline:
                await ws.send({"op": "publish", "corr": str(sent), "queue": queue, "messages": messages})
                sent += 1
            if confirmed == sent:
                break
            frame = await ws.recv()
            if frame.get("op") == "published":
                confirmed += 1
        secs = time.perf_counter() - start
    return Result(
        "WebSocket publish, pipelined confirms", "pegasus", confirmed * size, secs,
        {"interface": "WebSocket", "window": window, "batch": size},
    )  # fmt: skip


def _receipt(frame: dict[str, Any]) -> str | None:
    if frame.get("op") != "message":
        return None
    message = frame.get("message") or {}
    return message.get("receipt") or frame.get("receipt")


async def consume_ws(peg: Pegasus, scale: Scale, *, prefetch: int = 100) -> Result:
    """Push consumer with prefetch; acks every half prefetch window in one frame."""
    queue = await peg.new_queue("wsconsume")
    await fill(peg, queue, scale.drain_messages)
    got = 0
    async with peg.ws() as ws:
        start = time.perf_counter()
        await ws.send({"op": "subscribe", "id": "c", "queue": queue, "prefetch": prefetch, "ack": "client"})
        pending: list[str] = []
        while got < scale.drain_messages:
            receipt = _receipt(await asyncio.wait_for(ws.recv(), 10))
            if receipt is None:
                continue
            got += 1
            pending.append(receipt)
            if len(pending) >= prefetch // 2 or got == scale.drain_messages:
                await ws.send({"op": "ack", "receipts": pending})
                pending = []
        secs = time.perf_counter() - start
    return Result(
        f"consume + ack, push prefetch {prefetch}",
        "pegasus",
        got,
        secs,
        {"interface": "WebSocket", "prefetch": prefetch},
    )


async def latency(peg: Pegasus, scale: Scale) -> Result:
    """End-to-end latency at a fixed light rate: publish over one WebSocket, receive pushed over
    another (paced_latencies)."""
    queue = await peg.new_queue("latency")
    async with peg.ws() as pub, peg.ws() as sub:
        await sub.send({"op": "subscribe", "id": "l", "queue": queue, "prefetch": 100, "ack": "auto"})
        await asyncio.sleep(0.2)
        ms, confirm_ms = await paced_latencies(pub, sub, queue, scale.latency_rate, scale.latency_seconds)
    extra = {
        "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": ms[-1], "rate": scale.latency_rate,
        "confirm_p50_ms": percentile(confirm_ms, 50),
    }  # fmt: skip
    return Result(f"end-to-end latency at {scale.latency_rate} msg/s", "pegasus", len(ms), scale.latency_seconds, extra)


async def paced_latencies(pub: Ws, sub: Ws, queue: str, rate: int, secs: float) -> tuple[list[float], list[float]]:
    """Publish one message at a time at `rate` for `secs` over `pub` (the send time in a
    header); return the sorted ms from each send to its push on `sub`, and to its `published`
    confirm on `pub`. Same clock for all. bench.daphne_ceiling runs this against a bare relay."""
    total = int(rate * secs)
    sent: list[float] = []
    arrivals: list[float] = []
    confirms: list[float] = []

    async def consume() -> None:
        while len(arrivals) < total:
            frame = await asyncio.wait_for(sub.recv(), 10)
            if frame.get("op") == "message":
                arrivals.append(time.perf_counter() - float(frame["message"]["headers"]["t"]))

    async def confirmed() -> None:
        while len(confirms) < total:
            frame = await pub.recv()
            if frame.get("op") == "published":
                confirms.append(time.perf_counter() - sent[int(frame["corr"])])

    async def produce() -> None:
        start = time.perf_counter()
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            sent.append(time.perf_counter())
            message = {"body": BODY, "headers": {"t": repr(sent[-1])}}
            await pub.send({"op": "publish", "corr": str(i), "queue": queue, "messages": [message]})

    await asyncio.gather(consume(), confirmed(), produce())
    return sorted(a * 1000 for a in arrivals), sorted(c * 1000 for c in confirms)


# --------------------------------------------------------------------------- backlog


EMPTY_BEFORE_BACKLOG = "durable publish, batch 100, empty queue (before the backlog)"


async def backlog(peg: Pegasus, scale: Scale, first_stage_rate: float | None) -> list[Result]:
    """Publish to an empty queue, fill another with `scale.backlog` messages, publish to it,
    then drain it. The target compares the two publishes, measured a minute apart: the
    "durable publish, batch 100" stage ran minutes earlier, on a machine whose speed drifts
    by tens of percent in that time (its ratio is kept as ratio_to_first_stage)."""
    empty = await peg.new_queue("empty")
    n, secs = await publish_for(peg.client, f"{API}/queues/{empty}/messages", batch_payload(100), 100, 1, scale.seconds)
    empty_rate = n / secs
    results = [Result(EMPTY_BEFORE_BACKLOG, "pegasus", n, secs, {"rss_mb": peg.server.rss_mb()})]
    queue = await peg.new_queue("backlog")
    fill_secs = await fill(peg, queue, scale.backlog, clients=2, size=1000)
    rss_full = peg.server.rss_mb()
    results.append(
        Result("backlog fill, batch 1000, 2 clients", "pegasus", scale.backlog, fill_secs, {"rss_mb": rss_full})
    )
    # The publish stage again, to the backlogged queue itself.
    path = f"{API}/queues/{queue}/messages"
    n, secs = await publish_for(peg.client, path, batch_payload(100), 100, 1, scale.seconds)
    extra: dict[str, Any] = {
        "rss_mb": peg.server.rss_mb(), "backlog": scale.backlog, "ratio_to_empty": (n / secs) / empty_rate,
    }  # fmt: skip
    if first_stage_rate:
        extra["ratio_to_first_stage"] = (n / secs) / first_stage_rate
    results.append(Result("durable publish, batch 100, with backlog", "pegasus", n, secs, extra))
    expected = scale.backlog + n
    acked, drain_secs = await drain_rest(peg, queue, expected, batch=1000, clients=2)
    results.append(
        Result("backlog drain, batch 1000, 2 clients", "pegasus", acked, drain_secs, {"rss_mb": peg.server.rss_mb()})
    )
    return results
