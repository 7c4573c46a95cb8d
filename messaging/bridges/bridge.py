"""The forwarding loop of one bridge: store and forward, once and only once, in order.

One step: lease a batch from the source (highest priority, then oldest: broker.receive), publish
it to the target as one all-or-nothing batch whose dedup_ids come from the source messages,
and ack locally only after the target answered 201. A failed attempt is retried with the SAME
batch after an exponential backoff with jitter, extending the lease meanwhile, forever: never a
nack, which would let the batch come back behind newer messages or be dead-lettered. A retry
of a batch the target already stored is answered `duplicate` and enqueues nothing, so every
retry is harmless, provided the target's dedup window is longer than the retry horizon
(docs/bridges.md).

A Forwarder runs in one thread while that thread holds the bridge's runner lock (locks.py);
runner.py decides where and when.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from django.db import transaction
from django.db.models import F

from messaging import broker, clock
from messaging.bridges import conf, link, services
from messaging.bridges.exceptions import InvalidSource, TargetNotAllowed
from messaging.bridges.locks import RunnerLock
from messaging.bridges.models import Bridge, BridgeState, LinkStatus
from messaging.doorbell import doorbell
from messaging.exceptions import NotFound

log = logging.getLogger("pegasus.bridges")
HEARTBEAT_SECONDS = 5.0


class Stopped(Exception):
    """This runner must stop: the bridge was disabled or deleted, or its lock is gone."""


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Forwarder:
    def __init__(
        self,
        bridge_id: int,
        *,
        client: httpx.Client,
        lock: RunnerLock,
        sleep: Callable[[float], Any] = time.sleep,
        rng: Callable[[], float] = random.random,
        settings: conf.BridgeSettings | None = None,
    ) -> None:
        self.bridge_id = bridge_id
        self.client = client
        self.lock = lock
        self.sleep = sleep  # the runner passes its stop event's wait, so a backoff ends on shutdown
        self.rng = rng
        self.settings = settings or conf.get()
        self.failures = 0  # consecutive failed attempts: the backoff exponent
        self._last_heartbeat = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    def take_over(self) -> None:
        """Call once after acquiring the lock: claim the state row and give back the batch a
        previous runner (killed, or cut off from the database) left leased. Nothing newer has
        been forwarded since, so releasing it early keeps the order, and spares waiting out
        its lease."""
        self._bridge()
        state, _ = BridgeState.objects.get_or_create(bridge_id=self.bridge_id)
        if state.pending_receipts:
            broker.nack(receipts=state.pending_receipts)
        BridgeState.objects.filter(pk=self.bridge_id).update(
            runner=identity(), heartbeat_at=clock.now(), pending_receipts=[]
        )

    def release(self) -> None:
        """When stopping while still holding the lock: give back an unfinished batch now rather
        than when its lease lapses (order-safe for the same reason as in take_over)."""
        state = BridgeState.objects.filter(pk=self.bridge_id).first()
        if state is not None and state.pending_receipts:
            broker.nack(receipts=state.pending_receipts)
            BridgeState.objects.filter(pk=self.bridge_id).update(pending_receipts=[])

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # ------------------------------------------------------------------ one batch

    def step(self) -> bool:
        """Forward one batch. True if there may be more to do right away."""
        bridge = self._bridge()
        try:
            queue = services.source_queue(bridge)
        except (NotFound, InvalidSource) as exc:
            self._failed(f"source unavailable: {exc.message}")
            self.sleep(self._backoff())
            return False
        batch = broker.receive(
            queue=queue, max_messages=bridge.batch_size, visibility_timeout_seconds=self.settings.lease_seconds
        )
        if not batch:
            self._heartbeat()
            return False
        held = [m.receipt for m in batch]
        BridgeState.objects.filter(pk=self.bridge_id).update(pending_receipts=held, heartbeat_at=clock.now())
        # Usually one request; a batch of big messages goes out as several, in order.
        for chunk in link.chunks(batch, max_bytes=self.settings.max_request_bytes):
            published = self._publish_until_confirmed(bridge, held, link.payload(bridge, chunk))
            if published is None:
                return True
            done, held = held[: len(chunk)], held[len(chunk) :]
            self._confirmed(done, published, pending=held)
        return True

    def wait_for_messages(self, timeout: float | None = None) -> None:
        """Sleep until the source is rung (a local publish) or the idle poll interval passes."""
        try:
            queue_id = services.source_queue(self._bridge()).pk
        except (NotFound, InvalidSource):
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        wait = self.settings.idle_poll_seconds if timeout is None else timeout
        self._loop.run_until_complete(doorbell.wait([queue_id], wait))

    def _publish_until_confirmed(self, bridge: Bridge, held: list[str], body: dict[str, Any]) -> link.Published | None:
        """Retry the same request until the target confirms it, keeping the lease on every
        message `held` (this request's and the rest of the batch). None if that lease was lost
        meanwhile: the messages are then leased again, first in line, by the next step."""
        while True:
            retry_after = 0.0
            try:
                return self._attempt(bridge, body)
            except link.LinkError as exc:
                self._failed(str(exc))
                # A target that says when to come back (overloaded, rate limit) is listened to,
                # up to the longest backoff.
                retry_after = min(exc.retry_after or 0.0, self.settings.backoff_max_seconds)
            except TargetNotAllowed as exc:
                self._failed(str(exc))
            self.sleep(max(self._backoff(), retry_after))
            bridge = self._bridge()  # a fixed token or URL applies from the next attempt
            if not self._still_leased(held):
                return None

    def _attempt(self, bridge: Bridge, body: dict[str, Any]) -> link.Published:
        if not self.lock.held():
            raise Stopped("lost the runner lock")
        return link.publish(self.client, bridge, body)

    def _still_leased(self, receipts: list[str]) -> bool:
        statuses = broker.extend(receipts=receipts, visibility_timeout_seconds=self.settings.lease_seconds)
        if all(s == broker.ACK_OK for s in statuses):
            return True
        # Part of the batch is back in the queue: give back the rest so it leaves together.
        broker.nack(receipts=[r for r, s in zip(receipts, statuses, strict=True) if s == broker.ACK_OK])
        return False

    def _confirmed(self, receipts: list[str], published: link.Published, *, pending: list[str]) -> None:
        """Ack locally and count it, in one transaction, so the counters match the acks."""
        with transaction.atomic():
            statuses = broker.ack(receipts=receipts)
            acked = sum(1 for s in statuses if s == broker.ACK_OK)
            BridgeState.objects.filter(pk=self.bridge_id).update(
                status=LinkStatus.CONNECTED,
                forwarded_count=F("forwarded_count") + acked,
                duplicate_count=F("duplicate_count") + published.duplicates,
                last_success_at=clock.now(),
                heartbeat_at=clock.now(),
                pending_receipts=pending,
            )
        if self.failures:
            log.info("bridge %s: connected again after %d failed attempts", self.bridge_id, self.failures)
        self.failures = 0
        self._last_heartbeat = time.monotonic()

    # ------------------------------------------------------------------ state

    def _bridge(self) -> Bridge:
        bridge = Bridge.objects.filter(pk=self.bridge_id, enabled=True).first()
        if bridge is None:
            raise Stopped("the bridge was disabled or deleted")
        return bridge

    def _failed(self, error: str) -> None:
        if not self.failures:
            log.warning("bridge %s: %s; retrying with backoff", self.bridge_id, error)
        self.failures += 1
        now = clock.now()
        BridgeState.objects.filter(pk=self.bridge_id).update(
            status=LinkStatus.RETRYING, retry_count=F("retry_count") + 1,
            last_error=error[:500], last_error_at=now, heartbeat_at=now,
        )  # fmt: skip
        self._last_heartbeat = time.monotonic()

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        BridgeState.objects.filter(pk=self.bridge_id).update(heartbeat_at=clock.now(), runner=identity())
        self._last_heartbeat = time.monotonic()

    def _backoff(self) -> float:
        """Exponential in the consecutive failures, capped, with jitter: half fixed, half random,
        so that bridges cut off together do not retry in lockstep."""
        s = self.settings
        delay = min(s.backoff_max_seconds, s.backoff_base_seconds * 2.0 ** min(self.failures, 30))
        return delay / 2 + self.rng() * delay / 2
