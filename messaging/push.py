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
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from channels.db import DatabaseSyncToAsync, database_sync_to_async
from django.conf import settings
from django.db import connection, transaction

from messaging import broker
from messaging.broker.common import in_one_statement
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

    A pusher waiting for messages is "takeable": a transaction of this process that makes its
    queue's messages deliverable (a publish, say) claims them for it inside that same
    transaction (`hand_off`, called by messaging.events), and they are pushed as soon as it
    commits, without a claim of their own. At most one claim (its own or a hand-off) is in
    flight per pusher, so it never has more than `prefetch` messages out unacked.
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
        self._busy = asyncio.Lock()  # one claim of our own (and the delivery of what it got) at a time
        self._auto_acks: list[str] = []  # pushed with ack "auto": acked with the next claim, or
        # by _ack_auto at most ACK_DELAY_SECONDS after they were pushed
        self._ack_timer: asyncio.TimerHandle | None = None
        self._acking: asyncio.Future[None] | None = None
        self._stale = False  # waiting, with messages left behind a claim of ours (see _wait)
        self._task: asyncio.Task[None] | None = None
        self._bell: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Hand-off state, shared with database threads (guarded by _TAKEABLE_LOCK):
        self._takeable = False  # waiting, registered in _TAKEABLE: a commit may claim for us
        self._taken = False  # a transaction claimed for us and has not finished yet
        self._handed: asyncio.Future[_Outcome | None] | None = None  # its outcome (None: rolled back)
        self._look = True  # look at the database before waiting

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._bell = doorbell.listen([self.queue.pk])
        self._task = asyncio.create_task(self._run(), name=f"pusher {self.key}")

    async def stop(self) -> None:
        """Stop pushing; afterwards `unacked` holds every receipt that went out unacked."""
        self._untake()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._handed is not None and not self._untake():  # a hand-off in flight: its
            try:  # messages are held (never pushed), so the connection gives them back
                self._accept(await asyncio.wait_for(asyncio.shield(self._handed), 30))
            except TimeoutError:
                log.warning("hand-off to %s did not finish; its leases will expire", self.key)
            self._handed = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._acking is not None:
            await asyncio.gather(asyncio.shield(self._acking), return_exceptions=True)
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

    @property
    def bell(self) -> Listener | None:
        return self._bell

    def behind(self) -> bool:
        """Under _TAKEABLE_LOCK, any thread: may messages of the queue be waiting for us that a
        lease at insert would overtake? Either we were rung during our own claim (stale, see
        _wait), or a commit rang us since we began to wait and we have not looked yet (a
        connection's next publish can come before we wake). Left to hand_off's claim, which
        takes the older messages first."""
        return self._stale or (self._bell is not None and self._bell.rung)

    def room(self) -> int:
        """How many messages a claim for us may take now (auto-acks pending count as room:
        they are acked with it, or just after)."""
        return min(self.prefetch - len(self.unacked) + len(self._auto_acks), 1000)

    def holds_all(self, receipts: Sequence[str]) -> bool:
        return bool(receipts) and all(r in self.unacked for r in receipts)

    async def ack_and_refill(
        self, receipts: Sequence[str], *, user: Any, authorize: Authorize | None
    ) -> list[str] | None:
        """Ack receipts this subscriber holds and claim the room that makes, in one transaction,
        then push what was claimed. Returns ack's statuses, or None if the pusher is claiming
        right now (the caller then acks on its own)."""
        if self._busy.locked() or self._task is None or not self._untake():
            return None
        try:
            async with self._busy:
                statuses, messages = await self._claim(list(receipts), user=user, authorize=authorize)
                await self._push(messages)
        finally:
            # We took the pusher out of its wait; let it wait again, takeable, without looking
            # (we just did; a ring meanwhile still makes it look).
            if self._handed is not None and not self._handed.done():
                self._handed.set_result(([], [], False))
        return statuses

    # ------------------------------------------------------------------ the loop

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
        """Claim and deliver what there is room for, or wait for room, the doorbell or a hand-off."""
        if self.prefetch - len(self.unacked) + len(self._auto_acks) <= 0:
            self._room.clear()
            await self._room.wait()
            return
        assert self._bell is not None
        if self._look:
            self._bell.clear()  # listen before looking, so a ring during the claim is not missed
            async with self._busy:
                asked = self.room()
                acks, self._auto_acks = self._auto_acks, []
                _, messages = await self._claim(acks)
                await self._push(messages)
            if messages and len(messages) >= asked:  # filled what it asked for: there may be more
                return
        self._look = await self._wait()

    async def _wait(self) -> bool:
        """Wait, takeable, for the doorbell or a hand-off. True: look at the database (rung,
        timed out, or a hand-off that filled what it asked for, or found an expired lease on
        the queue, may have left more behind)."""
        assert self._bell is not None and self._loop is not None
        handed: asyncio.Future[_Outcome | None] = self._loop.create_future()
        # Rung while we claimed: messages committed meanwhile wait for us. Looking at once would
        # find the few committed during that look too, and so on, a claim of our own per
        # publish under steady load. Instead the next commit's hand-off claims them with its own
        # (a claim, not a lease at insert: take_waiting skips a stale pusher); if none comes
        # within STALE_WAIT_SECONDS, we look.
        stale = self._bell.rung
        if stale:
            self._bell.clear()
        with _TAKEABLE_LOCK:
            self._handed = handed
            self._takeable = True
            self._stale = stale
            _TAKEABLE.setdefault(self.queue.pk, {})[self] = None
        try:
            await self._bell.wait(STALE_WAIT_SECONDS if stale else self._recheck, unless=handed)
            if not handed.done() and self._untake():
                return True  # rung or timed out, and nobody took us
            outcome = await asyncio.shield(handed)  # taken: wait for that transaction to end
            self._handed = None
            messages = self._accept(outcome)
            await self._push(messages)
            return outcome is None or outcome[2]
        finally:
            if self._untake() and self._handed is handed:
                self._handed = None

    def _untake(self) -> bool:
        """Stop being takeable; False if a transaction has taken us and has not finished."""
        with _TAKEABLE_LOCK:
            if self._takeable:
                self._takeable = False
                waiting = _TAKEABLE.get(self.queue.pk)
                if waiting is not None:
                    waiting.pop(self, None)
                    if not waiting:
                        del _TAKEABLE[self.queue.pk]
            return not self._taken

    def _accept(self, outcome: _Outcome | None) -> list[broker.ReceivedMessage]:
        """A hand-off's transaction finished: committed (`outcome`) or rolled back (None).
        Returns the messages it claimed for us, now held, to push."""
        with _TAKEABLE_LOCK:
            self._taken = False
        if outcome is None:
            return []
        acks, messages, _ = outcome
        self.settled(acks)
        done = set(acks)
        self._auto_acks = [r for r in self._auto_acks if r not in done]
        self._hold(messages)
        return messages

    async def _claim(
        self, acks: list[str], *, user: Any = None, authorize: Authorize | None = None
    ) -> tuple[list[str], list[broker.ReceivedMessage]]:
        """One hop: ack `acks` (ours) and lease what fits in the prefetch window after them."""
        room = min(self.prefetch - len(self.unacked) + sum(1 for r in acks if r in self.unacked), 1000)
        claim = asyncio.ensure_future(
            push_hop(_claim_in_thread)(
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
                if self._ack_timer is None and self._loop is not None:
                    self._ack_timer = self._loop.call_later(ACK_DELAY_SECONDS, self._start_auto_ack)

    def _start_auto_ack(self) -> None:
        self._ack_timer = None
        if self._acking is None and self._auto_acks:
            self._acking = asyncio.ensure_future(self._ack_auto())

    async def _ack_auto(self) -> None:
        """Ack the auto-ack messages that no claim carried within ACK_DELAY_SECONDS (a pusher fed
        by hand-offs makes no claim of its own), beside the claims: the pusher stays takeable."""
        receipts, self._auto_acks = self._auto_acks, []
        try:
            await push_hop(broker.ack)(receipts=receipts)
            self.settled(receipts)
        except Exception:  # kept for the next try; the connection gives back what stays unacked
            log.warning("auto-ack on %s failed; trying again", self.key, exc_info=True)
            self._auto_acks[:0] = receipts
        finally:
            self._acking = None
            if self._auto_acks and self._ack_timer is None and self._loop is not None and self._task is not None:
                self._ack_timer = self._loop.call_later(ACK_DELAY_SECONDS, self._start_auto_ack)

    def _hold(self, messages: Sequence[broker.ReceivedMessage]) -> None:
        for m in messages:
            self.unacked[m.receipt] = m.id


# A committed hand-off: receipts it acked, messages it claimed, whether it claimed all it asked for.
_Outcome = tuple[list[str], list[broker.ReceivedMessage], bool]

# How long pushed auto-ack messages wait for a claim to carry their ack before the pusher acks
# them in a commit of their own (they are acked either way; this only saves commits).
ACK_DELAY_SECONDS = 0.02

# How long a pusher rung during its own claim waits for a commit's hand-off before it looks.
STALE_WAIT_SECONDS = 0.005

# Pushers waiting for messages, by queue pk (insertion-ordered: the longest waiting first).
_TAKEABLE: dict[int, dict[Pusher, None]] = {}
_TAKEABLE_LOCK = threading.Lock()
_claiming = threading.local()  # set while a pusher's own claim runs in this thread


def _claim_in_thread(**kwargs: Any) -> tuple[list[str], list[broker.ReceivedMessage]]:
    _claiming.active = True
    try:
        return broker.ack_and_receive(**kwargs)
    finally:
        _claiming.active = False


class _Token:
    """Lives exactly as long as a hand-off's on_commit callback: freed without the callback
    having run, it means Django dropped the callback, i.e. the transaction rolled back."""


def is_waiting(queue_id: int) -> bool:
    """Is a pusher of this process waiting on the queue? (A hint: taking it may still fail.)"""
    return queue_id in _TAKEABLE


def take_waiting(queue_ids: Iterable[int]) -> dict[int, tuple[Pusher, int]]:
    """Inside a transaction that is about to insert messages for these queues (any thread):
    take one waiting pusher with room for each, for the insert to lease messages to
    (broker.publishing). Returns {queue pk: (pusher, room)}. Every pusher taken must be given
    `hand_over` or `give_back` in this transaction. The transaction may be the insert alone
    (broker.common.one_statement): it commits when the statement returns."""
    if not _may_take(lease_at_insert=True):
        return {}
    taken: dict[int, tuple[Pusher, int]] = {}
    with _TAKEABLE_LOCK:
        for qid in queue_ids:
            pusher = _longest_waiting(qid)
            if pusher is None or pusher.behind():
                continue
            room = pusher.room()
            if room > 0:
                _take(qid, pusher)
                taken[qid] = (pusher, room)
    return taken


def waits_behind(*, queue: Queue | None, topic: Any) -> bool:
    """Does a pusher of this process wait, behind (see Pusher.behind), on the queue or on a
    subscription of the topic? A publish there needs a transaction its hand-off can claim in."""
    if not _TAKEABLE:
        return False
    with _TAKEABLE_LOCK:
        return any(
            pusher.behind()
            for waiting in _TAKEABLE.values()
            for pusher in waiting
            if (queue is not None and pusher.queue.pk == queue.pk)
            or (topic is not None and pusher.queue.topic_id == topic.pk)
        )


def hand_over(pusher: Pusher, messages: list[broker.ReceivedMessage], *, filled: bool) -> None:
    """`messages` were leased to `pusher` (taken by take_waiting) in this transaction: push them
    when it commits; if it rolls back, the pusher is told and looks again. `filled`: it may
    have more to claim."""
    assert pusher._loop is not None and pusher._handed is not None
    _after_commit(pusher._loop, pusher._handed, ([], messages, filled))


def give_back(pushers: Iterable[Pusher]) -> None:
    """Pushers taken by this transaction that get nothing from it (the insert or the claim
    failed, or found nothing): they look again."""
    for pusher in pushers:
        assert pusher._loop is not None and pusher._handed is not None
        pusher._loop.call_soon_threadsafe(_settle, pusher._handed, None)


def _may_take(*, lease_at_insert: bool = False) -> bool:
    """Can this thread take a waiting pusher? Only inside a transaction (its commit pushes), and
    not in a pusher's own claim. For a lease at insert the transaction may be the insert's own
    statement (one_statement); a hand-off's claim is a statement of its own, so it needs one
    the publish is part of."""
    if not _TAKEABLE or getattr(_claiming, "active", False):
        return False
    return connection.in_atomic_block or (lease_at_insert and in_one_statement())


def _longest_waiting(queue_id: int) -> Pusher | None:
    """Under _TAKEABLE_LOCK: the pusher that has waited longest on the queue, if any."""
    return next(iter(_TAKEABLE.get(queue_id, ())), None)


def _take(queue_id: int, pusher: Pusher) -> None:
    """Under _TAKEABLE_LOCK: `pusher`, waiting on the queue, is taken by this transaction."""
    waiting = _TAKEABLE[queue_id]
    del waiting[pusher]
    if not waiting:
        del _TAKEABLE[queue_id]
    pusher._takeable = False
    pusher._taken = True


def hand_off(queue_ids: Sequence[int]) -> set[Pusher]:
    """Inside a transaction that makes messages of these queues deliverable (any thread): claim
    them, in this same transaction, for a pusher of this process that waits on the queue, and
    push them when it commits. Returns the pushers served, whose doorbell ring for this
    transaction is redundant. A failed claim is rolled back to its savepoint and changes
    nothing; the pusher then claims on its own when the doorbell rings. (A plain publish on
    PostgreSQL leases to waiting pushers as it inserts instead: take_waiting.)"""
    if not _may_take():
        return set()
    taken: list[Pusher] = []
    with _TAKEABLE_LOCK:
        for qid in queue_ids:
            pusher = _longest_waiting(qid)
            if pusher is not None:
                _take(qid, pusher)
                taken.append(pusher)
    served: set[Pusher] = set()
    for n, pusher in enumerate(taken):
        handed, loop = pusher._handed, pusher._loop
        assert handed is not None and loop is not None
        acks = list(pusher._auto_acks)
        room = pusher.room()
        try:  # ack_and_receive's atomic block is a savepoint here
            _, messages = broker.ack_and_receive(receipts=acks, queue=pusher.queue, max_messages=max(room, 0))
        except Exception:
            log.warning("hand-off to %s failed; it will claim on its own", pusher.key, exc_info=True)
            if connection.needs_rollback or connection.closed_in_transaction:
                # The savepoint could not be rolled back (the connection died): the caller's
                # whole transaction is lost, and it must fail, not go on to "commit" (which
                # Django would turn into a silent rollback, broker.common.atomic).
                give_back(taken[n:])
                raise
            give_back([pusher])
            continue
        if not messages and not acks:  # nothing for it yet (delayed messages, say)
            give_back([pusher])
            continue
        _after_commit(loop, handed, (acks, messages, len(messages) >= room))
        served.add(pusher)
    return served


def _after_commit(loop: asyncio.AbstractEventLoop, handed: asyncio.Future[_Outcome | None], outcome: _Outcome) -> None:
    ran = [False]
    token = _Token()

    def committed(token: _Token = token) -> None:
        ran[0] = True
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, handed, outcome)

    def finished() -> None:
        if not ran[0] and not loop.is_closed():  # rolled back: nothing was acked or claimed
            loop.call_soon_threadsafe(_settle, handed, None)

    weakref.finalize(token, finished)
    transaction.on_commit(committed)


def _settle(handed: asyncio.Future[_Outcome | None], outcome: _Outcome | None) -> None:
    if not handed.done():
        handed.set_result(outcome)
