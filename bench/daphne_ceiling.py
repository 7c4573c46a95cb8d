"""The floors: the most any broker on daphne and PostgreSQL could do for each target that
depends on them. `make bench` runs them as its "floor:" stages, after Pegasus's, and the
report sets each beside the target it bounds; `python -m bench.daphne_ceiling` runs them alone
(the durable ones after `make bench`, on the database it leaves), with RabbitMQ beside them.

Each serves a bare app with daphne of its own, and the bench's own client loops (bench/http.py,
bench.pegasus.publish_for and paced_latencies) drive it as they drive Pegasus:
- "1 per request, 8 clients": the bare ASGI app (`application`) answers every POST 201 with
  the JSON a one-message publish gets, at once (no commit: daphne's own ceiling), or under
  /grouped/ after committing the message together with those of the requests that arrived
  while the last commit was in flight (the least a group commit is; messaging/group_commit.py);
- "durable batch 100": under /durable/, each request's 100 messages are committed in one
  statement before the answer (one client);
- latency at 500 msg/s: the app relays each frame of a /publisher WebSocket to every /consumer
  and confirms it to the publisher, committing its message first under /durable/; the same
  relay as a Django Channels consumer (bench/channels_relay.py), the stack Pegasus's live
  consumers run on; and under /threaded/, group-committing on a thread of its own with a
  synchronous connection while it reads on, as Pegasus commits a WebSocket publish: what that
  design costs by itself.

A commit is one INSERT statement of a message row and a delivery row per message into copies
of Pegasus's tables (bench.baselines: the same columns and indexes, the delivery's deferred
foreign key to its message), in autocommit, on one async psycopg connection on the event loop.
No Django request path, no ninja, no pydantic, no authentication, no foreign key to a queue, no
hop to a thread: no broker that writes those rows can do better on this machine
(docs/performance.md, "Why the remaining targets are not met").
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench import baselines, report
from bench.common import BODY, Result, Scale, percentile
from bench.http import Client
from bench.pegasus import Ws, batch_payload, paced_latencies, publish_for
from bench.server import ROOT, bench_url, cpu_seconds, free_port

ANSWER = json.dumps({"messages": [{"id": "1", "duplicate": False}]}).encode()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# Under /durable/, a publish is committed before it is answered, relayed or confirmed: the
# messages and their deliveries in one INSERT statement, its own transaction (autocommit), as a
# plain publish to Pegasus is (docs/performance.md, item 25).
DURABLE = "/durable/"
# Under /grouped/, a one-message publish is committed with those of concurrent requests.
GROUPED = "/grouped/"
# Under /threaded/, the relay commits as Pegasus's WebSocket publishes are (messaging/consumers.py,
# messaging/group_commit.py): it goes on reading frames while publishes commit, in rounds of
# whatever arrived meanwhile, one round in flight, each on a thread of its own with a synchronous
# connection; each message is pushed and confirmed when its round returns. The latency floor of
# that design, without anything else Pegasus does.
THREADED = "/threaded/"
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


async def database() -> psycopg.AsyncConnection[Any]:
    """The app's one connection, opened on first use (a relay opens it when a client connects,
    so that the first measured message does not wait for it)."""
    global _database
    if _database is None:
        _database = await psycopg.AsyncConnection.connect(bench_url(), autocommit=True)
    return _database


_commit_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-commit")
_thread_database: psycopg.Connection[Any] | None = None


def commit_here(bodies: list[str]) -> list[int]:
    """`commit`, synchronously, on the one connection of the thread that calls it."""
    global _thread_database
    if _thread_database is None:
        _thread_database = psycopg.Connection.connect(bench_url(), autocommit=True)
    return [row[0] for row in _thread_database.execute(INSERT_BATCH, (bodies,), prepare=True).fetchall()]


async def commit_on_thread(bodies: list[str]) -> list[int]:
    """`commit` on the relay's commit thread, the event loop waiting for it."""
    return await asyncio.get_running_loop().run_in_executor(_commit_thread, commit_here, bodies)


async def commit(bodies: list[str], connection: psycopg.AsyncConnection[Any] | None = None) -> list[int]:
    """Insert and commit one message (and its delivery) per body; their ids."""
    cursor = await (connection or await database()).execute(INSERT_BATCH, (bodies,), prepare=True)
    return [row[0] for row in await cursor.fetchall()]


class GroupCommit:
    """The least a group commit is: bodies that arrive while the rounds in flight commit go
    together in the next round (one statement). As in messaging/group_commit.py, two rounds
    may be in flight at once, each on a connection of its own."""

    def __init__(self, lanes: int = 2) -> None:
        self._pending: list[tuple[str, asyncio.Future[int]]] = []
        self._idle: list[psycopg.AsyncConnection[Any] | None] = [None] * lanes  # opened on first use
        self._tasks: set[asyncio.Future[None]] = set()  # kept: the loop holds tasks only weakly

    async def commit(self, body: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((body, future))
        if self._idle:
            task = asyncio.ensure_future(self._rounds(self._idle.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _rounds(self, connection: psycopg.AsyncConnection[Any] | None) -> None:
        try:
            if connection is None:
                connection = await psycopg.AsyncConnection.connect(bench_url(), autocommit=True)
            lane = connection
            while self._pending:
                round_, self._pending = self._pending, []
                await _answer(round_, lambda bodies: commit(bodies, lane))  # an error: each request 500
        finally:
            self._idle.append(connection)


_grouped = GroupCommit()


class ThreadedGroupCommit:
    """Bodies that arrive while a round commits go together in the next round, on the commit
    thread: one round in flight, as messaging/group_commit.py has by default."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, asyncio.Future[int]]] = []
        self._rounds: asyncio.Future[None] | None = None

    async def commit(self, body: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((body, future))
        if self._rounds is None:
            self._rounds = asyncio.ensure_future(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._pending:
                round_, self._pending = self._pending, []
                await _answer(round_, commit_on_thread)
        finally:
            self._rounds = None


async def _answer(
    round_: list[tuple[str, asyncio.Future[int]]], write: Callable[[list[str]], Awaitable[list[int]]]
) -> None:
    """Commit a round's bodies with `write` and answer each caller with its id (or, if the
    commit failed, every caller of the round with its error)."""
    try:
        ids = await write([body for body, _ in round_])
    except Exception as exc:
        for _, future in round_:
            future.set_exception(exc)
        return
    for (_, future), id_ in zip(round_, ids, strict=True):
        future.set_result(id_)


_threaded = ThreadedGroupCommit()


def pushed_and_confirm(frame: dict[str, Any], message_id: int) -> tuple[str, str]:
    """The relay's two frames for a publish frame: the push, framed as Pegasus pushes, and the
    publisher's `published` confirm."""
    pushed = json.dumps({"op": "message", "sub": "l", "message": frame["messages"][0]})
    confirmed = [{"id": str(message_id), "duplicate": False}]
    return pushed, json.dumps({"op": "published", "corr": frame["corr"], "messages": confirmed})


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
        ids = await commit([m["body"] for m in json.loads(body)["messages"]])
        answer = json.dumps({"messages": [{"id": str(i), "duplicate": False} for i in ids]}).encode()
    elif scope["path"].startswith(GROUPED):
        id_ = await _grouped.commit(json.loads(body)["body"])
        answer = json.dumps({"messages": [{"id": str(id_), "duplicate": False}]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def _relay(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """/consumer: gets every message published on /publisher, framed as Pegasus pushes it; the
    publisher gets a `published` confirm for each publish frame."""
    await receive()  # websocket.connect
    consumer = scope["path"].endswith("/consumer")
    durable = scope["path"].startswith(DURABLE)
    threaded = scope["path"].startswith(THREADED)
    if durable:
        await database()
    if threaded:
        await commit_on_thread([])  # opens the thread's connection before the first message
    await send({"type": "websocket.accept"})
    if consumer:
        _consumers.append(send)
    in_flight: set[asyncio.Future[None]] = set()  # /threaded/: publishes awaiting their round
    try:
        while (event := await receive())["type"] == "websocket.receive":
            if consumer:
                continue
            frame = json.loads(event["text"])
            if threaded:  # read on while it commits; pushed and confirmed when its round returns
                task = asyncio.ensure_future(_relay_when_committed(frame, send))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                continue
            ids = await commit([frame["messages"][0]["body"]]) if durable else [1]
            await _push_and_confirm(frame, ids[0], send)
    finally:
        if consumer:
            _consumers.remove(send)


async def _relay_when_committed(frame: dict[str, Any], send: Send) -> None:
    await _push_and_confirm(frame, await _threaded.commit(frame["messages"][0]["body"]), send)


async def _push_and_confirm(frame: dict[str, Any], message_id: int, send: Send) -> None:
    pushed, confirm = pushed_and_confirm(frame, message_id)
    for deliver in _consumers:
        await deliver({"type": "websocket.send", "text": pushed})
    await send({"type": "websocket.send", "text": confirm})


BARE_APP = "bench.daphne_ceiling:application"
CHANNELS_APP = "bench.channels_relay:application"


@contextlib.contextmanager
def serve(app: str) -> Iterator[tuple[int, int]]:
    """daphne serving `app` on a free port, listening: (port, pid)."""
    port = free_port()
    daphne = str(Path(sys.executable).with_name("daphne"))
    proc = subprocess.Popen(
        [daphne, "-b", "127.0.0.1", "-p", str(port), app], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(port, proc)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"daphne exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("daphne did not start listening in 10 s")


# ---------------------------------------------------------------------- the floors, as bench stages
# Each serves its app in a daphne of its own and returns a Result of system "floor"; the report
# sets each beside the target it bounds (bench/report.py). The durable ones need the raw tables
# (bench.baselines.create_raw_tables), which `make bench` creates. A floor is the best of
# `scale.floor_runs` runs (three in a full run): the most a bare app could do, so a run the
# machine disturbed (another process, a pause) does not make a target look out of reach.
# Pegasus's own stage runs once, so the comparison leans Pegasus's way.


def single_floor(scale: Scale, *, durable: bool, clients: int = 8) -> Result:
    """The "durable publish, 1 per request" stage's loop against the bare app: answered at once,
    or (`durable`) after a group commit of the concurrent requests' messages."""
    name = report.FLOOR_SINGLE if durable else report.FLOOR_BARE_SINGLE
    prefix = GROUPED if durable else "/"
    return _best_rate(name, scale, durable, lambda port: publish(port, clients, scale.seconds, prefix=prefix))


def batch_floor(scale: Scale) -> Result:
    """The "durable publish, batch 100" stage's loop (one client) against the bare app that
    commits each request's 100 messages in one statement before it answers."""
    return _best_rate(
        report.FLOOR_BATCH, scale, True, lambda port: publish(port, 1, scale.seconds, size=100, prefix=DURABLE)
    )


def _best_rate(
    name: str, scale: Scale, durable: bool, loop: Callable[[int], Coroutine[Any, Any, tuple[int, float]]]
) -> Result:
    runs: list[Result] = []
    with serve(BARE_APP) as (port, pid):
        for _ in range(scale.floor_runs):
            if durable:
                baselines.truncate_raw_tables()
            (n, secs), cpu = with_cpu_share(pid, loop(port))
            runs.append(Result(name, "floor", n, secs, {"server_cpu_pct": cpu * 100}))
    best = max(runs, key=lambda r: r.rate or 0)
    best.extra["runs_msg_per_s"] = [round(r.rate or 0) for r in runs]
    return best


def relay_floor(scale: Scale, *, app: str = BARE_APP, durable: bool = True, threaded: bool = False) -> Result:
    """The latency stage's loop against a relay that (`durable`) commits each message before
    it pushes and confirms it, on the event loop or (`threaded`, the bare app only) on a thread
    of its own: the best p50 and the best p99 of the runs, and the server's share of a core."""
    runs: list[tuple[float, float, float]] = []  # p50, p99, share of a core
    prefix = THREADED if threaded else DURABLE if durable else "/"
    with serve(app) as (port, pid):
        for _ in range(scale.floor_runs):
            if durable or threaded:
                baselines.truncate_raw_tables()
            ms, cpu = with_cpu_share(pid, relay_latency(port, scale.latency_rate, scale.latency_seconds, prefix))
            runs.append((percentile(ms, 50), percentile(ms, 99), cpu * 100))
    name = report.FLOOR_RELAY if app == CHANNELS_APP else report.FLOOR_ASGI_RELAY
    if threaded:
        name = report.FLOOR_THREADED_RELAY
    elif not durable:
        name = name.replace("commit each message", "no commit")
    extra = {
        "p50_ms": min(r[0] for r in runs), "p99_ms": min(r[1] for r in runs),
        "server_cpu_pct": min(r[2] for r in runs), "runs_p50_p99_cpu": runs, "rate": scale.latency_rate,
    }  # fmt: skip
    return Result(name, "floor", len(ms), scale.latency_seconds, extra)


T = TypeVar("T")


def with_cpu_share(pid: int, stage: Coroutine[Any, Any, T]) -> tuple[T, float]:
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


async def publish(port: int, clients: int, seconds: float, *, size: int = 1, prefix: str = "/") -> tuple[int, float]:
    """The publish stages' own loop (bench.pegasus.publish_for), `size` messages a request:
    (messages, seconds)."""
    payload = {"body": BODY} if size == 1 else batch_payload(size)
    return await publish_for(
        lambda: Client("127.0.0.1", port, "ceiling"), f"{prefix}api/v1/queues/ceiling/messages", payload, size,
        clients, seconds,
    )  # fmt: skip


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
    args = parser.parse_args()
    scale = Scale.full()
    scale.seconds = args.seconds
    stages: list[Callable[[], Result]] = [
        lambda: single_floor(scale, durable=False),
        lambda: relay_floor(scale, durable=False),
        lambda: relay_floor(scale, app=CHANNELS_APP, durable=False),
    ]
    if bench_database_ready():
        baselines.create_raw_tables()
        stages += [
            lambda: single_floor(scale, durable=True),
            lambda: batch_floor(scale),
            lambda: relay_floor(scale),
            lambda: relay_floor(scale, app=CHANNELS_APP),
            lambda: relay_floor(scale, threaded=True),
        ]
    else:
        print("durable floors skipped: run `make bench` first (it leaves the database they write to)")
    if baselines.rabbit_reachable():
        stages += [lambda: baselines.rabbit_confirm_each(scale), lambda: baselines.rabbit_tx100(scale)]
    results = [stage() for stage in stages]
    print(report.table(results))


if __name__ == "__main__":
    main()
