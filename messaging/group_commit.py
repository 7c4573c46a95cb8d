"""Group commit for publishes arriving concurrently in one server process.

Every durable publish must be committed (flushed to disk) before it is confirmed, and a commit
costs a WAL flush. Requests that arrive while a round is in flight wait in a queue; when it
finishes they all go to the database together as the next round: ONE hop that checks each
request's access and publishes them all in one transaction (`broker.publish_many`).
An idle server adds no delay (the first request goes at once); a busy one answers many
publishers with one hop and one flush per round. Each request still gets its own outcome: its
results, or the error it alone caused (a refused access check, a bad message).

REST publish views and the WebSocket consumer call `await group_commit.publish(...)` where they
would call `await database_sync_to_async(broker.publish)(...)`. A round is one hop, on a thread
of its own (see _ROUND_THREAD), which keeps its connection from one round to the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connection

from messaging import access, broker, longpoll, write_behind
from messaging.broker import destinations
from messaging.exceptions import BrokerError

# One round carries at most this many messages: bounds the transaction and the wait behind it.
MAX_ROUND_MESSAGES = 5000


@dataclass(frozen=True)
class Publish:
    """One publish as an interface received it; access is checked inside the round.

    `ordered`: it must be committed after every publish that reached the committer before it
    (a WebSocket or STOMP connection pipelining its publishes). A REST request is answered
    before its client sends the next one, so its publishes are not ordered and may go in a
    round that runs beside another."""

    user: Any
    kind: access.Kind
    name: str
    messages: Sequence[broker.OutgoingMessage]
    ordered: bool = True
    ids: Sequence[int] | None = None  # taken in advance (messaging/write_behind.py)


@dataclass
class _Pending:
    publish: Publish
    future: asyncio.Future[list[broker.PublishResult]]


# Rounds in flight at once. With more than one, the next round inserts while one waits for its
# commit's WAL flush (PostgreSQL flushes concurrent commits together); ordered publishes still
# never overlap: at most one round holding any of them is in flight, so a connection's
# publishes commit in order. One is the default since 2026-12-07: two round threads busy at
# once take the GIL from the event loop, and one message per request from 8 clients ran at
# 1,236 msg/s on average with one against 989 with two, in six alternating pairs
# (docs/performance.md, item 29); with one, a round simply gathers what arrives meanwhile. A
# database several milliseconds away may still gain from 2 (not measured).
MAX_ROUNDS_IN_FLIGHT = int(os.environ.get("PEGASUS_GROUP_COMMIT_ROUNDS", "1"))


class GroupCommitter:
    """Publishes for one event loop, sent to the database in rounds."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []
        self._in_flight = 0
        self._ordered_in_flight = False
        self._tasks: set[asyncio.Future[None]] = set()  # kept: the loop holds tasks only weakly

    async def publish(self, publish: Publish) -> list[broker.PublishResult]:
        future: asyncio.Future[list[broker.PublishResult]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(publish, future))
        self._start_rounds()
        # A client that goes away cancels this future only, never the round its publish is part
        # of: the round is a task of its own, and answers only the futures not yet done. (No
        # asyncio.shield: its second future and two callbacks per publish bought nothing.)
        return await future

    def _start_rounds(self) -> None:
        while self._pending and self._in_flight < MAX_ROUNDS_IN_FLIGHT:
            round_ = self._take_round(unordered_only=self._ordered_in_flight)
            if not round_:
                return
            ordered = any(p.publish.ordered for p in round_)
            self._in_flight += 1
            self._ordered_in_flight |= ordered
            task = asyncio.ensure_future(self._commit(round_))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._round_done, ordered=ordered))

    def _round_done(self, task: asyncio.Future[None], *, ordered: bool) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if ordered:
            self._ordered_in_flight = False
        self._start_rounds()

    def _take_round(self, *, unordered_only: bool) -> list[_Pending]:
        """The next round, in arrival order; with `unordered_only`, ordered publishes wait (all
        of them: one that went ahead of an earlier one of its connection would break its order)."""
        round_: list[_Pending] = []
        left: list[_Pending] = []
        count = 0
        for i, pending in enumerate(self._pending):
            size = len(pending.publish.messages)
            if unordered_only and pending.publish.ordered:
                left.append(pending)
                continue
            if round_ and count + size > MAX_ROUND_MESSAGES:  # full: the rest wait, in order
                left += self._pending[i:]
                break
            round_.append(pending)
            count += size
        self._pending = left
        return round_

    async def _commit(self, round_: list[_Pending]) -> None:
        try:
            outcomes: Sequence[Any] = await _hop()([p.publish for p in round_])
        except Exception as exc:  # the hop itself failed: every publish of the round failed
            outcomes = [exc] * len(round_)
        for pending, outcome in zip(round_, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


# Rounds run on threads of their own, not on the one thread that runs every other
# thread-sensitive hop of the process: channels makes a hop (aclose_old_connections) before each
# WebSocket frame, and requests make their own, so a round waiting for its commit there would
# stop every connection from reading its next frame, which is exactly what a round should collect.
_ROUND_THREAD = ThreadPoolExecutor(max_workers=MAX_ROUNDS_IN_FLIGHT, thread_name_prefix="pegasus-group-commit")


# The test suite turns this off (tests/conftest.py): a test's transaction lives on the test's
# own connection, which only the thread-sensitive hop uses.
OWN_THREAD = os.environ.get("PEGASUS_GROUP_COMMIT_THREAD", "1") != "0"


def _hop() -> Callable[[Sequence[Publish]], Awaitable[list[list[broker.PublishResult] | Exception]]]:
    if not OWN_THREAD:
        return longpoll.hop(run_round)
    return _in_round_thread


async def _in_round_thread(publishes: Sequence[Publish]) -> list[list[broker.PublishResult] | Exception]:
    """The round on its thread, in a copy of the caller's context. Not asgiref's sync_to_async:
    what it adds (async_to_sync inside the hop) no round uses, and it cost ~0.1 ms a hop, a
    twentieth of a message's end-to-end latency (docs/performance.md, item 24)."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_ROUND_THREAD, context.run, _run_round_on_its_thread, publishes)


def _run_round_on_its_thread(publishes: Sequence[Publish]) -> list[list[broker.PublishResult] | Exception]:
    try:
        return run_round(publishes)
    finally:
        keep_connection_if_usable()


def keep_connection_if_usable() -> None:
    """After a round, on its thread: keep the connection for the next round, unless it may be
    broken or was left in a transaction (then it is closed: back to the pool, or dropped).

    The round thread is the one thread of the process that needs a connection for every
    durable publish, so it keeps one of the pool's for good, past CONN_MAX_AGE, rather than
    giving it back after each round and borrowing it again before the next: that cost 79,000
    instructions of a one-message round's 1,004,500 (callgrind; docs/performance.md, item 31).
    A connection that PostgreSQL dropped while it was kept fails its round's statement, which
    answers 503 and closes it here, as a connection borrowed from the pool does (no health
    check on borrowing: pegasus_site/settings.py)."""
    global _kept
    if connection.connection is not None:
        connection.close_at = None
        connection.close_if_unusable_or_obsolete()
        _kept = connection.connection is not None


_kept = False  # the round thread may hold a connection


def release_round_connection() -> None:
    """Give the round thread's connection back to the pool (tests do, before their database is
    flushed or dropped)."""
    global _kept
    if _kept:
        _ROUND_THREAD.submit(_close_connection).result()
        _kept = False


def _close_connection() -> None:
    connection.close()


def run_round(
    publishes: Sequence[Publish], allowed: dict[tuple[Any, access.Kind, str], Any] | None = None
) -> list[list[broker.PublishResult] | Exception]:
    """One round, in the database thread: check each publish's access (once per user and
    destination), then publish them together (broker.publish_many). `allowed`, when given, is
    filled with what each access check returned: {(user pk, kind, name): Queue or Topic}.

    Queues are looked up with recent_ok (a row read in the last second will do). If one was
    deleted meanwhile by another process, its publishes fail on the foreign key and nothing is
    written; those are tried once more with fresh lookups, so they answer as if looked up now
    (404, or published to the queue created again under that name)."""
    allowed = {} if allowed is None else allowed
    outcomes = _run_round(publishes, recent_ok=True, allowed=allowed)
    stale = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, IntegrityError)]
    if stale:
        destinations.forget_recent_queues()
        allowed.clear()
        retried = _run_round([publishes[i] for i in stale], recent_ok=False, allowed=allowed)
        for i, outcome in zip(stale, retried, strict=True):
            outcomes[i] = outcome
    return outcomes


def _run_round(
    publishes: Sequence[Publish], *, recent_ok: bool, allowed: dict[tuple[Any, access.Kind, str], Any]
) -> list[list[broker.PublishResult] | Exception]:
    outcomes: list[list[broker.PublishResult] | Exception | None] = [None] * len(publishes)
    refused: dict[tuple[Any, access.Kind, str], BrokerError] = {}
    requests: list[broker.PublishRequest] = []
    indexes: list[int] = []
    for i, p in enumerate(publishes):
        key = (getattr(p.user, "pk", None), p.kind, p.name)
        if key in refused:
            outcomes[i] = refused[key]
            continue
        if key not in allowed:
            try:
                allowed[key] = _access(p, recent_ok=recent_ok)
            except BrokerError as exc:
                outcomes[i] = refused[key] = exc
                continue
        target = allowed[key]
        is_queue = p.kind is access.Kind.QUEUE
        requests.append(
            broker.PublishRequest(
                queue=target if is_queue else None,
                topic=None if is_queue else target,
                messages=p.messages,
                user=p.user,
                ids=p.ids,
            )
        )
        indexes.append(i)
    for i, outcome in zip(indexes, broker.publish_many(requests=requests), strict=True):
        outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


def _access(p: Publish, *, recent_ok: bool) -> Any:
    if p.kind is access.Kind.QUEUE:
        return access.access_queue(user=p.user, name=p.name, action=access.Action.SEND, recent_ok=recent_ok)
    return access.access_topic(user=p.user, name=p.name, action=access.Action.SEND)


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommitter] = weakref.WeakKeyDictionary()


async def publish(
    *, user: Any, kind: access.Kind, name: str, messages: Sequence[broker.OutgoingMessage], ordered: bool = True
) -> list[broker.PublishResult]:
    """Publish `messages` to the queue or topic `name` as `user` (send access is checked in the
    round), committed together with the publishes around it. Same contract as `broker.publish`
    outside a transaction; publishes inside one call broker.publish directly. Publishes of only
    non-durable messages go to this process's writer instead (messaging/write_behind.py), which
    may answer them before they are written."""
    if write_behind.takes(messages):
        return await write_behind.WRITER.publish(Publish(user=user, kind=kind, name=name, messages=messages))
    loop = asyncio.get_running_loop()
    committer = _committers.get(loop)
    if committer is None:
        committer = _committers[loop] = GroupCommitter()
    return await committer.publish(Publish(user=user, kind=kind, name=name, messages=messages, ordered=ordered))
