"""Daphne's own ceiling for one request per message: `python -m bench.daphne_ceiling`.

Serves a bare ASGI app with daphne (no Django, no database): every POST is answered 201 with
the JSON a one-message publish gets. The bench's own HTTP client (bench/http.py) posts one
256-byte message per request from 8 keep-alive clients for a few seconds, as the
"durable publish, 1 per request" stage does, and the same run measures RabbitMQ's
confirm-each rate (when reachable). What daphne does here is the least any request to
Pegasus costs, so the ratio printed is the most that stage could reach against RabbitMQ on
this machine before any broker work (docs/performance.md, "Why the remaining targets are not
met").
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
from bench.common import BODY, Scale
from bench.http import Client
from bench.pegasus import publish_for

ANSWER = json.dumps({"messages": [{"id": "1", "duplicate": False}]}).encode()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The bare app daphne serves: read the whole body, answer 201 with a publish's JSON."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


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
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"daphne, bare ASGI app, 1 message per request, {args.clients} clients: {rate:,.0f} requests/s")
    if baselines.rabbit_reachable():
        scale = Scale.full()
        scale.seconds = args.seconds
        rabbit = baselines.rabbit_confirm_each(scale).rate or float("nan")
        print(f"RabbitMQ, confirm each: {rabbit:,.0f} msg/s; daphne's ceiling is {rate / rabbit:.2f}x of it "
              f"(the target is 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
