"""Group commit for publishes arriving concurrently in one server process.

Every durable publish must be committed (flushed to disk) before it is confirmed, and a commit
costs a WAL flush. Requests that arrive while a round is in flight wait in a queue; when it
finishes they all go to the database together as the next round: ONE hop that checks each
request's access (`resolve`) and publishes them all in one transaction (`broker.publish_many`).
An idle server adds no delay (the first request goes at once); a busy one answers many
publishers with one hop and one flush per round. Each request still gets its own outcome: its
results, or the error it alone caused (a refused access check, a bad message).

REST publish views and the WebSocket consumer call `await group_commit.publish(...)` where they
would call `await database_sync_to_async(broker.publish)(...)`. The round is one hop
(longpoll.hop: the connection goes back after it, unless a test's transaction holds it).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from messaging import broker, longpoll
from messaging.exceptions import BrokerError

# One round carries at most this many messages: bounds the transaction and the wait behind it.
MAX_ROUND_MESSAGES = 5000

Resolve = Callable[[], broker.PublishRequest]


@dataclass
class _Pending:
    resolve: Resolve  # runs inside the round's hop: access checks and lookups, then the request
    size: int  # messages, for MAX_ROUND_MESSAGES
    future: asyncio.Future[list[broker.PublishResult]]


class GroupCommitter:
    """Publishes for one event loop, sent to the database in rounds."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []
        self._running = False
        self._task: asyncio.Future[None] | None = None  # kept: the loop holds tasks only weakly

    async def publish(self, resolve: Resolve, size: int) -> list[broker.PublishResult]:
        future: asyncio.Future[list[broker.PublishResult]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(resolve, size, future))
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
        for pending in self._pending:
            if taken and count + pending.size > MAX_ROUND_MESSAGES:
                break
            taken += 1
            count += pending.size
        round_, self._pending = self._pending[:taken], self._pending[taken:]
        return round_

    async def _commit(self, round_: list[_Pending]) -> None:
        try:
            outcomes: Sequence[Any] = await longpoll.hop(run_round)([p.resolve for p in round_])
        except Exception as exc:  # the hop itself failed: every publish of the round failed
            outcomes = [exc] * len(round_)
        for pending, outcome in zip(round_, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


def run_round(resolvers: Sequence[Resolve]) -> list[list[broker.PublishResult] | Exception]:
    """One round, in the database thread: resolve each request, then publish them together."""
    outcomes: list[list[broker.PublishResult] | Exception | None] = [None] * len(resolvers)
    requests: list[broker.PublishRequest] = []
    indexes: list[int] = []
    for i, resolve in enumerate(resolvers):
        try:
            requests.append(resolve())
            indexes.append(i)
        except BrokerError as exc:
            outcomes[i] = exc
    for i, outcome in zip(indexes, broker.publish_many(requests=requests), strict=True):
        outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommitter] = weakref.WeakKeyDictionary()


async def publish(resolve: Resolve, *, size: int) -> list[broker.PublishResult]:
    """Publish what `resolve()` returns (called in the round's database hop; it may raise a
    BrokerError, e.g. from an access check), committed together with the publishes around it.
    Same contract as `broker.publish`; `size` is the number of messages."""
    loop = asyncio.get_running_loop()
    committer = _committers.get(loop)
    if committer is None:
        committer = _committers[loop] = GroupCommitter()
    return await committer.publish(resolve, size)
