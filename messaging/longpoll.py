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
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from messaging import broker, listener
from messaging.doorbell import doorbell
from messaging.models import Queue

# How often a waiting receive looks again without a ring (a lost notification costs at most
# this much delay). PEGASUS_LONGPOLL_RECHECK_SECONDS lets tests prove the ring alone is prompt.
RECHECK_SECONDS = float(os.environ.get("PEGASUS_LONGPOLL_RECHECK_SECONDS", "1"))

P = ParamSpec("P")
R = TypeVar("R")


def hop(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """One database hop from async code: run `fn` in the request's worker thread, then close
    the connection (CONN_MAX_AGE=0), so nothing is held while the caller waits. channels'
    database_sync_to_async does the same, but would also "close" a connection inside an atomic
    block (a test's transaction), which poisons it."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:
                close_old_connections()

    return sync_to_async(run)


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
