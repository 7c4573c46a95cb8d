"""Push delivery for live consumers (JSON WebSocket and STOMP): one Pusher per subscription.

A pusher loops: claim up to (prefetch - unacked) messages with broker.receive (one hop to the
database thread), hand them to the connection, then wait for the doorbell (or a re-check timer,
because a missed ring must only delay). It never has more than `prefetch` messages out unacked.
Acks and nacks go through the connection, which tells the pusher with `settled()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from channels.db import DatabaseSyncToAsync, database_sync_to_async
from django.conf import settings

from messaging import broker
from messaging.broker.delivery import Authorize
from messaging.doorbell import Listener, doorbell
from messaging.models import Queue

log = logging.getLogger("pegasus.push")

P = ParamSpec("P")
R = TypeVar("R")


def hop(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`database_sync_to_async`, typed: one operation in the database thread."""
    return cast(Callable[P, Awaitable[R]], database_sync_to_async(func))


# Pushers claim and auto-ack on threads of their own (each with its own pooled connection), not
# on the one thread-sensitive thread every other hop of the process queues on: a pusher's claim
# waits for its commit, and nothing else needs to wait for it.
_PUSH_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pegasus-push")


def push_hop(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    return cast(Callable[P, Awaitable[R]], DatabaseSyncToAsync(func, thread_sensitive=False, executor=_PUSH_THREADS))


Deliver = Callable[["Pusher", Sequence[broker.ReceivedMessage]], Awaitable[None]]


# WebSocket close codes (autobahn lets a server send only 1000 and 3000-4999): 4000 + an HTTP status.
CLOSE_NORMAL = 1000
CLOSE_BAD_FRAME = 4400  # malformed or out-of-order frame, or a STOMP ERROR
CLOSE_UNAUTHORIZED = 4401  # the token was revoked or expired while connected
CLOSE_TIMEOUT = 4408  # no CONNECT, or no heart-beat, in time
CLOSE_TOO_LARGE = 4413  # a frame over the size limit


@dataclass(frozen=True)
class LiveSettings:
    max_frame_bytes: int  # larger frames get an error frame and the connection closes
    recheck_seconds: float  # a pusher looks again this often even without a doorbell ring
    tick_seconds: float  # consumer heartbeats, lease extension and keep-alives
    stomp_heartbeat_ms: int  # what the server offers in CONNECTED heart-beat
    connect_timeout_seconds: float  # STOMP: time allowed between the upgrade and CONNECT
    default_prefetch: int
    max_prefetch: int


def live_settings() -> LiveSettings:
    """From settings.PEGASUS["WS_..."], else the environment (PEGASUS_WS_...), else defaults."""
    raw: dict[str, Any] = getattr(settings, "PEGASUS", {})

    def get(name: str, default: float) -> float:
        return float(raw.get(name, os.environ.get(f"PEGASUS_{name}", default)))

    return LiveSettings(
        max_frame_bytes=int(get("WS_MAX_FRAME_BYTES", 1024 * 1024 + 64 * 1024)),
        recheck_seconds=get("WS_RECHECK_SECONDS", 1.0),
        tick_seconds=get("WS_TICK_SECONDS", 10.0),
        stomp_heartbeat_ms=int(get("STOMP_HEARTBEAT_MS", 10_000)),
        connect_timeout_seconds=get("WS_CONNECT_TIMEOUT_SECONDS", 10.0),
        default_prefetch=int(get("WS_DEFAULT_PREFETCH", 100)),
        max_prefetch=int(get("WS_MAX_PREFETCH", 10_000)),
    )


class Pusher:
    """Pushes one queue's (or subscription's) messages to one subscriber of a connection.

    Every claim is one database transaction that also acks what this subscriber settled since
    the last one (`broker.ack_and_receive`): the auto-acks of the messages it just pushed, or the
    client's ack that made room (`ack_and_refill`). A subscriber that acks every half prefetch
    window thus costs one commit per window, not two.
    """

    def __init__(
        self,
        *,
        key: str,
        queue: Queue,
        prefetch: int,
        auto_ack: bool,
        deliver: Deliver,
        recheck_seconds: float,
        consumer_id: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.key = key
        self.queue = queue
        self.prefetch = prefetch
        self.auto_ack = auto_ack
        self.consumer_id = consumer_id
        self.extra = extra or {}  # protocol details: ack mode, destination as the client named it
        self.unacked: dict[str, str] = {}  # receipt → message id, in delivery order
        self._deliver = deliver
        self._recheck = recheck_seconds
        self._room = asyncio.Event()
        self._busy = asyncio.Lock()  # one claim (and the delivery of what it got) at a time
        self._auto_acks: list[str] = []  # pushed with ack "auto", acked with the next claim
        self._task: asyncio.Task[None] | None = None
        self._bell: Listener | None = None

    def start(self) -> None:
        self._bell = doorbell.listen([self.queue.pk])
        self._task = asyncio.create_task(self._run(), name=f"pusher {self.key}")

    async def stop(self) -> None:
        """Stop pushing; afterwards `unacked` holds every receipt that went out unacked."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self._auto_acks:  # pushed with ack "auto": ack them now rather than give them back
            receipts, self._auto_acks = self._auto_acks, []
            try:
                await push_hop(broker.ack)(receipts=receipts)
                self.settled(receipts)
            except Exception:  # left in unacked: the connection gives them back (at least once)
                log.warning("auto-ack on %s failed", self.key, exc_info=True)

    def settled(self, receipts: Sequence[str]) -> list[str]:
        """Forget receipts that were acked or nacked; returns those that were ours."""
        ours = [r for r in receipts if self.unacked.pop(r, None) is not None]
        if ours:
            self._room.set()
        return ours

    def up_to(self, receipt: str) -> list[str]:
        """The receipts out on this subscription up to and including `receipt` (STOMP `client`
        mode acks cumulatively), or [] if it is not one of ours."""
        if receipt not in self.unacked:
            return []
        out: list[str] = []
        for r in self.unacked:
            out.append(r)
            if r == receipt:
                return out
        return out

    def receipt_for(self, message_id: str) -> str | None:
        return next((r for r, mid in self.unacked.items() if mid == message_id), None)

    def holds_all(self, receipts: Sequence[str]) -> bool:
        return bool(receipts) and all(r in self.unacked for r in receipts)

    async def ack_and_refill(self, receipts: Sequence[str], *, user: Any, authorize: Authorize) -> list[str] | None:
        """Ack receipts this subscriber holds and claim the room that makes, in one transaction,
        then push what was claimed. Returns ack's statuses, or None if the pusher is busy
        claiming right now (the caller then acks on its own)."""
        if self._busy.locked() or self._task is None:
            return None
        async with self._busy:
            statuses, messages = await self._claim(list(receipts), user=user, authorize=authorize)
            await self._push(messages)
        return statuses

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be away: retry, never kill the connection
                log.warning("push to %s failed; retrying", self.key, exc_info=True)
                await asyncio.sleep(self._recheck)

    async def _step(self) -> None:
        """Claim and deliver what there is room for, or wait for room or for the doorbell."""
        if self.prefetch - len(self.unacked) + len(self._auto_acks) <= 0:
            self._room.clear()
            await self._room.wait()
            return
        assert self._bell is not None
        self._bell.clear()  # listen before looking, so a ring during the claim is not missed
        async with self._busy:
            acks, self._auto_acks = self._auto_acks, []
            _, messages = await self._claim(acks)
            await self._push(messages)
        if messages or self._auto_acks:
            return
        await self._bell.wait(self._recheck)

    async def _claim(
        self, acks: list[str], *, user: Any = None, authorize: Authorize | None = None
    ) -> tuple[list[str], list[broker.ReceivedMessage]]:
        """One hop: ack `acks` (ours) and lease what fits in the prefetch window after them."""
        room = min(self.prefetch - len(self.unacked) + sum(1 for r in acks if r in self.unacked), 1000)
        claim = asyncio.ensure_future(
            push_hop(broker.ack_and_receive)(
                receipts=acks, queue=self.queue, max_messages=max(room, 0), user=user, authorize=authorize
            )
        )
        try:
            statuses, messages = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # The claim may still commit: record its receipts so the connection returns them.
            statuses, messages = await claim
            self.settled(acks)
            self._hold(messages)
            raise
        except Exception:
            if acks and user is None:  # our own auto-acks: try them again with the next claim
                self._auto_acks[:0] = acks
            raise
        self.settled(acks)
        self._hold(messages)
        return statuses, messages

    async def _push(self, messages: list[broker.ReceivedMessage]) -> None:
        if messages:
            await self._deliver(self, messages)
            if self.auto_ack:
                self._auto_acks += [m.receipt for m in messages]

    def _hold(self, messages: Sequence[broker.ReceivedMessage]) -> None:
        for m in messages:
            self.unacked[m.receipt] = m.id
