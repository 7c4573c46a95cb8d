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
from messaging.doorbell import doorbell
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
    """Pushes one queue's (or subscription's) messages to one subscriber of a connection."""

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
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pusher {self.key}")

    async def stop(self) -> None:
        """Stop pushing; afterwards `unacked` holds every receipt that went out unacked."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
        room = self.prefetch - len(self.unacked)
        if room <= 0:
            self._room.clear()
            await self._room.wait()
            return
        # Listen before looking, so a ring during the claim is not missed.
        bell = asyncio.create_task(doorbell.wait([self.queue.pk], self._recheck))
        try:
            messages = await self._claim(min(room, 1000))
            if messages:
                await self._deliver(self, messages)
                if self.auto_ack:
                    await self._ack_now([m.receipt for m in messages])
                return
            await bell
        finally:
            bell.cancel()

    async def _claim(self, limit: int) -> list[broker.ReceivedMessage]:
        claim = asyncio.ensure_future(push_hop(broker.receive)(queue=self.queue, max_messages=limit))
        try:
            messages = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # The claim may still commit: record its receipts so the connection returns them.
            messages = await claim
            self._hold(messages)
            raise
        self._hold(messages)
        return messages

    def _hold(self, messages: Sequence[broker.ReceivedMessage]) -> None:
        for m in messages:
            self.unacked[m.receipt] = m.id

    async def _ack_now(self, receipts: list[str]) -> None:
        await push_hop(broker.ack)(receipts=receipts)
        self.settled(receipts)
