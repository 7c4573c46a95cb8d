"""Helpers for async tests that touch the database from worker threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection


def in_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` on a worker thread that closes its database connection afterwards (or the test
    database could not be dropped at the end of the session)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return sync_to_async(run, thread_sensitive=False)


async def until(check: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until `check()` is true, polling; fails after `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def recording_pusher(queue: Any) -> tuple[Any, list[Any]]:
    """A started in-process pusher on `queue` (client acks, prefetch 10, looking on its own
    only every 30 s) and the list of messages it pushes."""
    from messaging import push

    pushed: list[Any] = []

    async def deliver(_: Any, messages: Any) -> None:
        pushed.extend(messages)

    pusher = push.Pusher(key="s", queue=queue, prefetch=10, auto_ack=False, deliver=deliver, recheck_seconds=30)
    pusher.start()
    return pusher, pushed
