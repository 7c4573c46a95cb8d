"""Group commit for publishes arriving concurrently in one server process.

Every durable publish must be committed (flushed to disk) before it is confirmed, and a commit
costs a WAL flush. Requests that arrive while a commit is in flight wait in a queue; when it
finishes they all go to the database together, in one transaction, as one `broker.publish_many`
hop. An idle server adds no delay (the first request goes at once); a busy one answers many
publishers with one flush each round. Each request still gets its own outcome: its results or
the error it alone caused (see broker.publish_many).

REST publish views and the WebSocket consumer call `await group_commit.publish(...)` where they
would call `await database_sync_to_async(broker.publish)(...)`. The round is one hop
(longpoll.hop: the connection goes back after it, unless a test's transaction holds it).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Any

from messaging import broker, longpoll

# One round carries at most this many messages: bounds the transaction and the wait behind it.
MAX_ROUND_MESSAGES = 5000

_Pending = tuple[broker.PublishRequest, "asyncio.Future[list[broker.PublishResult]]"]


class GroupCommitter:
    """Publishes for one event loop, sent to the database in rounds."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []
        self._running = False
        self._task: asyncio.Future[None] | None = None  # kept: the loop holds tasks only weakly

    async def publish(self, request: broker.PublishRequest) -> list[broker.PublishResult]:
        future: asyncio.Future[list[broker.PublishResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if not self._running:
            self._running = True
            self._task = asyncio.ensure_future(self._run())
        # shield: a client that goes away must not cancel the round its publish is part of.
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._pending:
                round_ = self._take_round()
                await self._commit(round_)
        finally:
            self._running = False

    def _take_round(self) -> list[_Pending]:
        taken, count = 0, 0
        for request, _ in self._pending:
            if taken and count + len(request.messages) > MAX_ROUND_MESSAGES:
                break
            taken += 1
            count += len(request.messages)
        round_, self._pending = self._pending[:taken], self._pending[taken:]
        return round_

    async def _commit(self, round_: list[_Pending]) -> None:
        try:
            outcomes: Sequence[Any] = await longpoll.hop(broker.publish_many)(
                requests=[request for request, _ in round_]
            )
        except Exception as exc:  # the hop itself failed: every publish of the round failed
            outcomes = [exc] * len(round_)
        for (_, future), outcome in zip(round_, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommitter] = weakref.WeakKeyDictionary()


async def publish(
    *,
    queue: Any = None,
    topic: Any = None,
    messages: Sequence[broker.OutgoingMessage],
    transaction_id: str | None = None,
    user: Any = None,
) -> list[broker.PublishResult]:
    """`broker.publish`, committed together with the publishes around it (same contract)."""
    loop = asyncio.get_running_loop()
    committer = _committers.get(loop)
    if committer is None:
        committer = _committers[loop] = GroupCommitter()
    request = broker.PublishRequest(
        queue=queue, topic=topic, messages=messages, transaction_id=transaction_id, user=user
    )
    return await committer.publish(request)
