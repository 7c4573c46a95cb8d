"""Receive with a wait (long poll) that holds neither a database connection nor a thread.

Each attempt is one hop to the broker (`hop` closes the connection after it).
Between attempts the coroutine waits on the doorbell, which is rung after a commit that made
messages deliverable: by the broker's on_commit callback in this process, and by the LISTEN
connection (messaging/listener.py) for commits made by other processes on PostgreSQL. A ring
can be missed (the listener was reconnecting, say), so the wait also ends every RECHECK_SECONDS
and the database is asked again: a lost notification delays a receive, it never loses a message.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import AsyncToSync, sync_to_async
from django.db import IntegrityError, close_old_connections, connection

from messaging import broker, listener, write_behind
from messaging.broker import destinations
from messaging.doorbell import doorbell
from messaging.models import Queue

# How often a waiting receive looks again without a ring (a lost notification costs at most
# this much delay). PEGASUS_LONGPOLL_RECHECK_SECONDS lets tests prove the ring alone is prompt.
RECHECK_SECONDS = float(os.environ.get("PEGASUS_LONGPOLL_RECHECK_SECONDS", "1"))

P = ParamSpec("P")
R = TypeVar("R")


# The threads database hops run in, shared by all requests of this process: a waiting long poll
# holds none of them (Django would otherwise give each request its own thread for its whole
# life). As many as connections the process may use (PEGASUS_DB_POOL_SIZE, settings.py).
HOP_THREADS = int(os.environ.get("PEGASUS_DB_POOL_SIZE", "16"))
_hop_executor = ThreadPoolExecutor(max_workers=HOP_THREADS, thread_name_prefix="pegasus-hop")


def hop(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """One database hop from async code: run `fn` in a shared worker thread, then close the
    connection (back to the pool, or closed: CONN_MAX_AGE=0), so nothing is held between hops.

    Called from sync code through async_to_sync (Django's test client, WSGI), the hop runs in
    that calling thread instead, as thread-sensitive code would: its connection may be inside a
    test's transaction, which is then left alone (channels' database_sync_to_async would
    "close" it, which poisons the transaction)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                close_old_connections()

    shared = sync_to_async(run, thread_sensitive=False, executor=_hop_executor)
    in_caller = sync_to_async(run)

    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if getattr(AsyncToSync.executors, "current", None) is not None:
            return await in_caller(*args, **kwargs)
        return await shared(*args, **kwargs)

    return call


async def receive(
    *,
    queue: Queue,
    max_messages: int = 1,
    wait_seconds: float = 0,
    visibility_timeout_seconds: int | None = None,
) -> list[broker.ReceivedMessage]:
    """broker.receive, waiting up to `wait_seconds` for the first message to arrive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    if wait_seconds > 0:
        listener.ensure_started()
    while True:
        remaining = deadline - loop.time()
        # Listen before looking, so a message committed while we look still wakes us up.
        bell = asyncio.ensure_future(doorbell.wait([queue.pk], min(RECHECK_SECONDS, max(remaining, 0))))
        await asyncio.sleep(0)  # let the waiter register
        try:
            messages = await hop(broker.receive)(
                queue=queue, max_messages=max_messages, visibility_timeout_seconds=visibility_timeout_seconds
            )
            if messages or remaining <= 0:
                return messages
            await bell
        finally:
            bell.cancel()


async def receive_from(
    lookup: Callable[[bool], Queue],
    *,
    max_messages: int = 1,
    wait_seconds: float = 0,
    visibility_timeout_seconds: int | None = None,
    ack: AckFirst | None = None,
    published_to: write_behind.Destination | None = None,
    recent_rows: bool = False,
) -> tuple[list[str], list[broker.ReceivedMessage]]:
    """receive() from the queue `lookup` returns (an access check that fetches it): the lookup
    and the first attempt share ONE hop, which is all a receive from a non-empty queue takes.
    With `ack`, that first attempt acks those receipts in the same commit (broker.ack_and_receive),
    once: a wait that follows only receives. Returns (ack statuses, messages).

    `lookup(recent_ok)`: with `recent_rows`, the first lookup passes recent_ok, and a queue row
    this process read in the last QUEUE_CACHE_SECONDS will do (broker.get_queue), which spares a
    receive that finds messages its round trip. A receive that finds none then looks again
    afresh, so a queue deleted meanwhile by another process answers 404 as before (one created
    again under its name is received from). One whose row was stale in a way the database
    refuses (its dead-letter queue deleted elsewhere) is rolled back and tried once more on a
    fresh row, as a publish is (group_commit.run_round). A pause made by another process reaches
    receives here up to that second later; this process's own changes apply at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    # What this process answered is there to receive (publishes to `published_to`, the queue or
    # the subscription's topic; to anything, when not given).
    await write_behind.WRITER.caught_up(published_to)

    def attempt(queue: Queue, acking: AckFirst | None) -> tuple[list[str], list[broker.ReceivedMessage]]:
        if acking is None:
            return [], broker.receive(
                queue=queue, max_messages=max_messages, visibility_timeout_seconds=visibility_timeout_seconds
            )  # fmt: skip
        return broker.ack_and_receive(
            receipts=acking.receipts, queue=queue, max_messages=max_messages,
            visibility_timeout_seconds=visibility_timeout_seconds, user=acking.user, authorize=acking.authorize,
        )  # fmt: skip

    def first() -> tuple[Queue, list[str], list[broker.ReceivedMessage]]:
        queue = lookup(recent_rows)
        if not recent_rows:
            return queue, *attempt(queue, ack)
        try:
            statuses, messages = attempt(queue, ack)
        except IntegrityError:
            if connection.in_atomic_block:  # inside a caller's transaction: nothing to retry on
                raise
            destinations.forget_recent_queues()
            queue = lookup(False)
            statuses, messages = attempt(queue, ack)
        else:
            if not messages:
                fresh = lookup(False)
                if fresh.pk != queue.pk:  # deleted and created again elsewhere: receive from the new one
                    _, messages = attempt(fresh, None)  # the acks are done
                queue = fresh
        return queue, statuses, messages

    queue, statuses, messages = await hop(first)()
    remaining = deadline - loop.time()
    if messages or remaining <= 0:
        return statuses, messages
    return statuses, await receive(
        queue=queue, max_messages=max_messages, wait_seconds=remaining,
        visibility_timeout_seconds=visibility_timeout_seconds,
    )  # fmt: skip


@dataclass(frozen=True)
class AckFirst:
    """Receipts a receive acks before it leases (and who acks them, for the permission check)."""

    receipts: Sequence[str]
    user: Any
    authorize: Callable[[Queue], bool]


def unpin_request_threads() -> None:
    """For ASGI servers only (pegasus_site/asgi.py): keep a waiting request free of threads.

    Django's ASGI handler gives each request a fresh thread for its thread-sensitive sync work,
    created on first use and kept until the request ends. Its request_started receivers
    (reset_queries, close_old_connections) are sync, so they would create that thread for every
    request, and a long poll would keep an idle thread for up to 20 s. On a fresh thread they
    have nothing to reset or close; request_finished still closes what the request opened.
    """
    from django.core import signals
    from django.db import reset_queries

    signals.request_started.disconnect(reset_queries)
    signals.request_started.disconnect(close_old_connections)
