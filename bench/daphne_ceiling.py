"""Daphne's own ceiling for one request per message: `python -m bench.daphne_ceiling`.

Serves a bare ASGI app with daphne (no Django, no database): every POST is answered 201 with
the JSON a one-message publish gets. The bench's own HTTP client (bench/http.py) posts one
256-byte message per request from 8 keep-alive clients for a few seconds, as the
"durable publish, 1 per request" stage does, and the same run measures RabbitMQ's
confirm-each rate (when reachable). What daphne does here is the least any request to
Pegasus costs, so the ratio printed is the most that stage could reach against RabbitMQ on
this machine before any broker work (docs/performance.md, "Why the remaining targets are not
met").

It then measures the latency stage's path without the broker: the bare app relays each frame
of a "publisher" WebSocket to a "consumer" WebSocket and confirms it to the publisher, and the
latency stage's own client loop (bench.pegasus.paced_latencies) times send to arrival. Add the
database's part (`python -m bench.db_floor`, "durable: broker.publish, 1 message") for the
least an end-to-end latency through Pegasus can be.

With the database `make bench` leaves behind, it then measures the least a durable broker on
daphne and PostgreSQL can do for the two targets that depend on a commit (docs/performance.md,
"Why the remaining targets are not met"): the same bare app, but every publish is first
committed with one statement on one psycopg connection in autocommit, into copies of Pegasus's
tables (bench.baselines: the same columns and indexes, a message row and a delivery row per
message). No Django, no ninja, no pydantic, no authentication, no group commit, no foreign key
to a queue, no hop to a thread:
- "durable publish, batch 100": the batch stage's own loop (one client, 100 messages a
  request, 201 with their ids), against RabbitMQ's transaction per 100 in the same run;
- the latency stage's loop against the relay, which commits each publish frame's message
  before it pushes and confirms it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench import baselines
from bench.common import BODY, Scale, percentile
from bench.http import Client
from bench.pegasus import Ws, batch_payload, paced_latencies, publish_for
from bench.server import bench_url, cpu_seconds

ANSWER = json.dumps({"messages": [{"id": "1", "duplicate": False}]}).encode()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# Under /durable/, a publish is committed before it is answered, relayed or confirmed: the
# messages and their deliveries in one INSERT statement, its own transaction (autocommit), as a
# plain publish to Pegasus is (docs/performance.md, item 25).
DURABLE = "/durable/"
INSERT_BATCH = f"""
WITH m AS (
  INSERT INTO bench_message ({baselines.MSG_COLS})
  SELECT b, '', '{{}}', 4, '', 'queue:raw', now(), NULL FROM unnest(%s::text[]) AS b RETURNING id
)
INSERT INTO bench_delivery ({baselines.DLV_COLS})
SELECT id, {baselines.QUEUE_ID}, 1, 4, now(), NULL, 0, '', NULL, '' FROM m RETURNING message_id
"""

_consumers: list[Send] = []
_database: psycopg.AsyncConnection[Any] | None = None


async def _commit(bodies: list[str]) -> list[int]:
    """Insert and commit one message (and its delivery) per body; their ids."""
    global _database
    if _database is None:
        _database = await psycopg.AsyncConnection.connect(bench_url(), autocommit=True)
    cursor = await _database.execute(INSERT_BATCH, (bodies,), prepare=True)
    return [row[0] for row in await cursor.fetchall()]


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The bare app daphne serves: read the whole body, answer 201 with a publish's JSON (under
    /durable/, after committing the body's messages)."""
    if scope["type"] == "websocket":
        return await _relay(scope, receive, send)
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        event = await receive()
        body += event.get("body", b"")
        more = event.get("more_body", False)
    answer = ANSWER
    if scope["path"].startswith(DURABLE):
        ids = await _commit([m["body"] for m in json.loads(body)["messages"]])
        answer = json.dumps({"messages": [{"id": str(i), "duplicate": False} for i in ids]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def _relay(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """/consumer: gets every message published on /publisher, framed as Pegasus pushes it; the
    publisher gets a `published` confirm for each publish frame."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    consumer = scope["path"].endswith("/consumer")
    durable = scope["path"].startswith(DURABLE)
    if consumer:
        _consumers.append(send)
    try:
        while (event := await receive())["type"] == "websocket.receive":
            if consumer:
                continue
            frame = json.loads(event["text"])
            ids = await _commit([frame["messages"][0]["body"]]) if durable else [1]
            pushed = json.dumps({"op": "message", "sub": "l", "message": frame["messages"][0]})
            for deliver in _consumers:
                await deliver({"type": "websocket.send", "text": pushed})
            confirm = {"op": "published", "corr": frame["corr"], "messages": [{"id": str(ids[0]), "duplicate": False}]}
            await send({"type": "websocket.send", "text": json.dumps(confirm)})
    finally:
        if consumer:
            _consumers.remove(send)


def with_cpu_share(pid: int, stage: Coroutine[Any, Any, list[float]]) -> tuple[list[float], float]:
    """Run `stage`; its result and the share of one core process `pid` used meanwhile."""
    cpu, wall = cpu_seconds(pid), time.perf_counter()
    result = asyncio.run(stage)
    return result, (cpu_seconds(pid) - cpu) / (time.perf_counter() - wall)


async def relay_latency(port: int, rate: int, seconds: float, prefix: str = "/") -> list[float]:
    """The latency stage's own loop (bench.pegasus.paced_latencies) against the relay: sorted ms."""
    base = f"ws://127.0.0.1:{port}{prefix}"
    async with Ws(f"{base}publisher") as pub, Ws(f"{base}consumer") as sub:
        await asyncio.sleep(0.2)
        arrivals, _ = await paced_latencies(pub, sub, "ceiling", rate, seconds)
    return arrivals


async def measure(port: int, clients: int, seconds: float, *, size: int = 1, prefix: str = "/") -> float:
    """The publish stages' own loop (bench.pegasus.publish_for): `size` messages a request."""
    for _ in range(100):  # wait for daphne to listen
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("daphne did not start listening in 10 s")
    payload = {"body": BODY} if size == 1 else batch_payload(size)
    n, secs = await publish_for(
        lambda: Client("127.0.0.1", port, "ceiling"), f"{prefix}api/v1/queues/ceiling/messages", payload, size,
        clients, seconds,
    )  # fmt: skip
    return n / secs


def bench_database_ready() -> bool:
    """Whether the database `make bench` leaves behind is there (Pegasus's tables in it)."""
    try:
        with psycopg.connect(bench_url(), connect_timeout=3) as conn:
            return conn.execute("SELECT to_regclass('messaging_delivery')").fetchone() != (None,)
    except psycopg.OperationalError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daphne = str(Path(sys.executable).with_name("daphne"))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [daphne, "-b", "127.0.0.1", "-p", str(port), "bench.daphne_ceiling:application"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    durable = bench_database_ready()
    if durable:
        baselines.create_raw_tables()
    try:
        rate = asyncio.run(measure(port, args.clients, args.seconds))
        scale = Scale.full()
        latencies, relay_cpu = with_cpu_share(proc.pid, relay_latency(port, scale.latency_rate, scale.latency_seconds))
        if durable:
            batch_rate = asyncio.run(measure(port, 1, args.seconds, size=100, prefix=DURABLE))
            durable_latencies, durable_cpu = with_cpu_share(
                proc.pid, relay_latency(port, scale.latency_rate, scale.latency_seconds, prefix=DURABLE)
            )
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"daphne, bare ASGI app, 1 message per request, {args.clients} clients: {rate:,.0f} requests/s")
    print(
        f"daphne, bare WebSocket relay at {scale.latency_rate} msg/s: p50 {percentile(latencies, 50):.2f} ms,"
        f" p99 {percentile(latencies, 99):.2f} ms, server at {relay_cpu:.0%} of a core"
    )
    if durable:
        print(f"daphne + one committed INSERT per request, batch 100, 1 client: {batch_rate:,.0f} msg/s")
        print(
            f"daphne relay committing each message first, at {scale.latency_rate} msg/s:"
            f" p50 {percentile(durable_latencies, 50):.2f} ms, p99 {percentile(durable_latencies, 99):.2f} ms,"
            f" server at {durable_cpu:.0%} of a core (the target is a p50 of at most 2 ms)"
        )
    else:
        print("durable floors skipped: run `make bench` first (it leaves the database they write to)")
    if baselines.rabbit_reachable():
        scale.seconds = args.seconds
        rabbit = baselines.rabbit_confirm_each(scale).rate or float("nan")
        print(f"RabbitMQ, confirm each: {rabbit:,.0f} msg/s; daphne's ceiling is {rate / rabbit:.2f}x of it "
              f"(the target is 2x)")  # fmt: skip
        if durable:
            tx100 = baselines.rabbit_tx100(scale).rate or float("nan")
            print(f"RabbitMQ, transaction per 100: {tx100:,.0f} msg/s; the durable batch ceiling is "
                  f"{batch_rate / tx100:.2f}x of it (the target is 2.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
