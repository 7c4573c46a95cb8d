"""WebSocket throughput: one consumer, one producer, and RabbitMQ (pika) doing the same.

    .venv/bin/python -m bench.ws_bench [--messages 50000] [--window 1000]

- producer: one JSON WebSocket connection publishes N durable 256-byte messages, one per
  `publish` frame, keeping up to `window` publishes unconfirmed (pipelined publisher confirms:
  a `published` frame is sent only after the durable commit);
- consumer: one JSON WebSocket connection subscribes with prefetch 100 and drains those N
  messages, acking every 50 receipts in one `ack` frame (half the prefetch window);
- RabbitMQ: a durable queue, persistent messages; pipelined confirms (window as above) with an
  asynchronous pika publisher, and a prefetch-100 consumer acking multiple every 50.

Runs its own daphne on its own PostgreSQL database (PEGASUS_WS_BENCH_DB, default
pegasus_ws_bench on PEGASUS_BENCH_PG). Not a test: prints a table and writes
bench/results/ws_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
BODY = ("pegasus-bench-" * 20)[:256]
PG_ADMIN_URL = os.environ.get("PEGASUS_BENCH_PG", "postgres://postgres@127.0.0.1:5432/postgres")
DB = os.environ.get("PEGASUS_WS_BENCH_DB", "pegasus_ws_bench")
DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + DB
PREFETCH = 100


def server_env() -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": DB_URL, "PEGASUS_DEBUG": "0", "PEGASUS_SSL_REDIRECT": "0",
            "PEGASUS_SECRET_KEY": "pegasus-ws-bench-secret-key-not-for-production-0123456789",
            "PEGASUS_ALLOWED_HOSTS": "127.0.0.1,localhost"}  # fmt: skip


def manage(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=server_env(), capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def prepare() -> str:
    """A fresh database, migrated, with an admin token."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    manage("migrate", "--noinput")
    return manage("create_token", "wsbench", "--admin").strip().splitlines()[-1]


def start_daphne() -> tuple[subprocess.Popen[bytes], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    log = open(ROOT / "bench" / "results" / "ws_bench_server.log.tmp", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("daphne")), "--fd", str(sock.fileno()), "pegasus_site.asgi:application"],
        cwd=ROOT, env=server_env(), stdout=log, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()],
    )  # fmt: skip
    sock.close()
    return proc, port


async def connect(port: int, token: str) -> Any:
    import websockets

    for _ in range(300):
        try:
            return await websockets.connect(f"ws://127.0.0.1:{port}/ws/v1/?token={token}", max_size=None,
                                            compression=None, ping_interval=None)  # fmt: skip
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError("daphne did not come up")


async def produce(port: int, token: str, n: int, window: int) -> float:
    ws = await connect(port, token)
    sent = confirmed = 0
    frame = json.dumps({"op": "publish", "queue": "bench", "messages": [{"body": BODY, "durable": True}]})
    start = time.perf_counter()
    while confirmed < n:
        while sent < n and sent - confirmed < window:
            await ws.send(frame)
            sent += 1
        reply = json.loads(await ws.recv())
        if reply["op"] != "published":
            raise RuntimeError(reply)
        confirmed += 1
    secs = time.perf_counter() - start
    await ws.close()
    return secs


async def consume(port: int, token: str, n: int) -> float:
    ws = await connect(port, token)
    start = time.perf_counter()
    await ws.send(json.dumps({"op": "subscribe", "id": "c", "queue": "bench", "prefetch": PREFETCH, "ack": "client"}))
    got, pending = 0, []
    while got < n:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if frame["op"] != "message":
            continue
        got += 1
        pending.append(frame["message"]["receipt"])
        if len(pending) >= PREFETCH // 2 or got == n:
            await ws.send(json.dumps({"op": "ack", "receipts": pending}))
            pending = []
    secs = time.perf_counter() - start
    await ws.close()
    return secs


def pegasus(n: int, window: int) -> dict[str, float]:
    token = prepare()
    manage("shell", "-c", "from messaging import broker; broker.create_queue(name='bench')")
    proc, port = start_daphne()
    try:
        publish_secs = asyncio.run(produce(port, token, n, window))
        consume_secs = asyncio.run(consume(port, token, n))
    finally:
        proc.terminate()
        proc.wait(10)
    return {"publish": n / publish_secs, "consume": n / consume_secs}


def rabbit_publish(n: int, window: int) -> float:
    """Pipelined confirms with pika's asynchronous SelectConnection."""
    import pika

    state = {"sent": 0, "confirmed": 0, "start": 0.0, "end": 0.0}
    props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    params = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"))

    def pump(ch: Any) -> None:
        while state["sent"] < n and state["sent"] - state["confirmed"] < window:
            ch.basic_publish("", "ws-bench", BODY.encode(), props)
            state["sent"] += 1

    def on_confirm(frame: Any, ch: Any) -> None:
        method = frame.method
        done = state["confirmed"]
        state["confirmed"] = method.delivery_tag if method.multiple else done + 1
        if state["confirmed"] >= n:
            state["end"] = time.perf_counter()
            ch.connection.close()
        else:
            pump(ch)

    def on_channel(ch: Any) -> None:
        def declared(_: Any) -> None:
            ch.queue_purge("ws-bench", callback=lambda _f: start(ch))

        ch.queue_declare("ws-bench", durable=True, callback=declared)

    def start(ch: Any) -> None:
        def confirming(_: Any) -> None:  # publish only once confirm mode is on (Confirm.SelectOk)
            state["start"] = time.perf_counter()
            pump(ch)

        ch.confirm_delivery(lambda frame: on_confirm(frame, ch), callback=confirming)

    conn = pika.SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _reason: c.ioloop.stop(),
    )
    conn.ioloop.start()
    return n / (state["end"] - state["start"])


def rabbit_consume(n: int) -> float:
    import pika

    conn = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", credentials=pika.PlainCredentials("guest", "guest"))
    )
    ch = conn.channel()
    ch.basic_qos(prefetch_count=PREFETCH)
    got, start = 0, time.perf_counter()
    for method, _props, _body in ch.consume("ws-bench", inactivity_timeout=10):
        if method is None:
            break
        got += 1
        if got % (PREFETCH // 2) == 0 or got == n:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if got == n:
            break
    secs = time.perf_counter() - start
    ch.cancel()
    conn.close()
    return got / secs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1000, help="unconfirmed publishes in flight")
    parser.add_argument("--no-rabbit", action="store_true")
    args = parser.parse_args()
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    results = {"messages": args.messages, "window": args.window, "pegasus": pegasus(args.messages, args.window)}
    if not args.no_rabbit:
        results["rabbitmq"] = {"publish": rabbit_publish(args.messages, args.window),
                               "consume": rabbit_consume(args.messages)}  # fmt: skip
    print(f"{args.messages} durable 256-byte messages, one WebSocket connection each way")
    for system in ("pegasus", "rabbitmq"):
        if system in results:
            r = results[system]
            print(f"  {system:9} publish (pipelined confirms) {r['publish']:9.0f} msg/s   "
                  f"consume (prefetch {PREFETCH}, ack every 50) {r['consume']:9.0f} msg/s")  # fmt: skip
    (ROOT / "bench" / "results" / "ws_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
