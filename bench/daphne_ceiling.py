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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines
from bench.common import BODY, Scale, percentile
from bench.http import Client
from bench.pegasus import Ws, paced_latencies, publish_for

ANSWER = json.dumps({"messages": [{"id": "1", "duplicate": False}]}).encode()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


_consumers: list[Send] = []


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The bare app daphne serves: read the whole body, answer 201 with a publish's JSON."""
    if scope["type"] == "websocket":
        return await _relay(scope, receive, send)
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


async def _relay(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """/consumer: gets every message published on /publisher, framed as Pegasus pushes it; the
    publisher gets a `published` confirm for each publish frame."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    consumer = scope["path"] == "/consumer"
    if consumer:
        _consumers.append(send)
    try:
        while (event := await receive())["type"] == "websocket.receive":
            if consumer:
                continue
            frame = json.loads(event["text"])
            pushed = json.dumps({"op": "message", "sub": "l", "message": frame["messages"][0]})
            for deliver in _consumers:
                await deliver({"type": "websocket.send", "text": pushed})
            confirm = {"op": "published", "corr": frame["corr"], "messages": [{"id": "1", "duplicate": False}]}
            await send({"type": "websocket.send", "text": json.dumps(confirm)})
    finally:
        if consumer:
            _consumers.remove(send)


async def relay_latency(port: int, rate: int, seconds: float) -> list[float]:
    """The latency stage's own loop (bench.pegasus.paced_latencies) against the relay: sorted ms."""
    async with Ws(f"ws://127.0.0.1:{port}/publisher") as pub, Ws(f"ws://127.0.0.1:{port}/consumer") as sub:
        await asyncio.sleep(0.2)
        arrivals, _ = await paced_latencies(pub, sub, "ceiling", rate, seconds)
    return arrivals


async def measure(port: int, clients: int, seconds: float) -> float:
    """The "durable publish, 1 per request" stage's own loop (bench.pegasus.publish_for)."""
    for _ in range(100):  # wait for daphne to listen
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("daphne did not start listening in 10 s")
    n, secs = await publish_for(
        lambda: Client("127.0.0.1", port, "ceiling"), "/api/v1/queues/ceiling/messages", {"body": BODY}, 1, clients,
        seconds,
    )  # fmt: skip
    return n / secs


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
    try:
        rate = asyncio.run(measure(port, args.clients, args.seconds))
        scale = Scale.full()
        latencies = asyncio.run(relay_latency(port, scale.latency_rate, scale.latency_seconds))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"daphne, bare ASGI app, 1 message per request, {args.clients} clients: {rate:,.0f} requests/s")
    print(
        f"daphne, bare WebSocket relay at {scale.latency_rate} msg/s: p50 {percentile(latencies, 50):.2f} ms,"
        f" p99 {percentile(latencies, 99):.2f} ms (add bench.db_floor's 1-message publish for the latency floor)"
    )
    if baselines.rabbit_reachable():
        scale.seconds = args.seconds
        rabbit = baselines.rabbit_confirm_each(scale).rate or float("nan")
        print(f"RabbitMQ, confirm each: {rabbit:,.0f} msg/s; daphne's ceiling is {rate / rabbit:.2f}x of it "
              f"(the target is 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
