"""Non-durable publishes answered from memory and written just behind (PostgreSQL).

A non-durable message "may be lost on a crash" (docs/API.md), so its publisher need not wait for
the database: like JMS NON_PERSISTENT messages (ActiveMQ sends them asynchronously by default),
such a publish is answered as soon as this process holds it, and a writer thread of the process
puts it into the UNLOGGED tables a few milliseconds later. That is what makes non-durable
publishing faster than durable, whose answer waits for a flushed commit (docs/performance.md).

- `group_commit.publish` hands every publish of only non-durable messages here (on PostgreSQL,
  with rounds on their own thread: servers, not the test process). ONE writer thread takes them
  in arrival order and writes them in rounds (`group_commit.run_round`), so the non-durable
  messages of a connection keep their order.
- A publish is answered at once ("early", with its message ids) when all of this holds; else it
  waits for its round like a durable one, and gets that round's answer (or error):
  * no message has a dedup_id (a duplicate's answer needs the database);
  * the same user published to the same destination in the last QUEUE_CACHE_SECONDS (the access
    check and the destination lookup of that round are reused; validation runs again here);
  * the process holds enough message ids taken in advance from the non-durable store's sequence;
  * fewer than MAX_BEHIND messages are answered and not yet written (the backlog is bounded:
    past it, publishers wait for the writer, which is how they are slowed to its pace).
- Reads in this process see every publish answered before them: a receive first waits for the
  writer to catch up (`caught_up`). Another process may see them a few milliseconds later.
- Failures after an early answer: a lost database connection is retried, with a backoff, until
  the round is written; a destination deleted (or an access rule revoked) within the cache
  second drops the messages, as if published just before the delete, logged and counted in
  `dropped`; ids that collide (only after a PostgreSQL crash restarted the UNLOGGED sequence)
  are replaced by fresh ones. At exit the writer gets a few seconds to write what is left.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    connections,
)
from django.db.utils import load_backend

from messaging import access, broker, group_commit
from messaging.broker import destinations
from messaging.broker.common import TRANSIENT
from messaging.exceptions import BrokerError

log = logging.getLogger("pegasus.write_behind")

ENABLED = os.environ.get("PEGASUS_WRITE_BEHIND", "1") != "0"
# Messages answered early and not yet written, at most (per process).
MAX_BEHIND = int(os.environ.get("PEGASUS_WRITE_BEHIND_MESSAGES", "10000"))
# How long a receive waits for the writer before it reads anyway (the database may be down).
CATCH_UP_SECONDS = 10.0
EXIT_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 2.0

AccessKey = tuple[Any, access.Kind, str]
Destination = tuple[access.Kind, str]  # what a publish names: a queue, or a topic


def id_reserve() -> int:
    """Message ids held in advance; refilled when half are used, before each round (one round
    trip). Half the reserve covers what a publisher can take while one round is written: up to
    MAX_BEHIND answered early, plus a round's worth waiting for room. A publish that finds the
    reserve empty must wait for its own round: with a reserve of MAX_BEHIND, that stalled a
    steady publisher for ~150 ms a few times a second (docs/performance.md)."""
    return 2 * (max(MAX_BEHIND, 1000) + group_commit.MAX_ROUND_MESSAGES)


@dataclass(eq=False)
class _Entry:
    publish: group_commit.Publish
    seq: int
    early: bool
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None = None
    unnumbered: bool = False  # accepted without ids: the writer numbers it (see _number)
    eligible: bool = False  # could have been answered early but for MAX_BEHIND: answered once there is room
    renumbered: bool = False  # its ids collided once and were replaced

    @property
    def size(self) -> int:
        return len(self.publish.messages)


def takes(messages: Sequence[broker.OutgoingMessage]) -> bool:
    """Does a publish of `messages` (outside a transaction) go through the writer?"""
    return (
        ENABLED
        and group_commit.OWN_THREAD
        and bool(messages)
        and not any(msg.durable for msg in messages)
        and _on_postgresql()
    )


@functools.cache
def _on_postgresql() -> bool:
    """`connection.vendor == "postgresql"`, without `connection`: this runs on the event loop,
    where every request is a task with a context of its own, so reading `connection` built a new
    DatabaseWrapper for each request (12-18 us of CPU each, docs/performance.md item 27)."""
    backend = load_backend(connections.settings[DEFAULT_DB_ALIAS]["ENGINE"])
    return bool(backend.DatabaseWrapper.vendor == "postgresql")


class WriteBehind:
    """The writer of one process: its queue, its id reserve and its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Entry] = deque()
        self._writing: list[_Entry] = []
        self._ids: deque[int] = deque()
        self._next_seq = 0
        self._behind = 0  # messages answered early, not yet written or dropped
        self._unnumbered = 0  # entries accepted without ids, not yet numbered by the writer
        self._waiting_for_room = 0  # eligible entries not yet answered
        self._allowed: dict[AccessKey, tuple[float, Any]] = {}  # key -> (valid until, Queue or Topic)
        self._waiters: list[tuple[int, Destination | None, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # messages answered early that could not be written (logged)

    # ----------------------------------------------------------------- the event loop's side

    async def publish(self, publish: group_commit.Publish) -> list[broker.PublishResult]:
        may_answer_now = self._may_answer_now(publish)
        loop = asyncio.get_running_loop()
        n = len(publish.messages)
        with self._lock:
            ids = self._number(n)
            eligible = ids is not None and may_answer_now
            # Answers go out in arrival order: none before an earlier publish still waiting for room.
            early = eligible and not self._waiting_for_room and self._behind + n <= MAX_BEHIND
            entry = _Entry(replace(publish, ids=ids), self._next_seq, early=early, unnumbered=ids is None)
            if early:
                self._behind += n
            else:
                future: asyncio.Future[list[broker.PublishResult]] = loop.create_future()
                entry.waiter = (loop, future)
                entry.eligible = eligible
                self._waiting_for_room += eligible
            self._unnumbered += entry.unnumbered
            self._next_seq += 1
            self._queue.append(entry)
            self._start_writer()
            self._wake.notify()
        if early:
            return _results(ids)  # type: ignore[arg-type]
        # shield: a client that goes away must not cancel its place in the writer's queue.
        return await asyncio.shield(future)

    def _may_answer_now(self, publish: group_commit.Publish) -> bool:
        """No dedup ids, and its access was granted in a round within the cache time; raises
        the BrokerError that validating the messages against that destination gives."""
        if any(msg.dedup_id is not None for msg in publish.messages):
            return False
        cached = self._allowed.get((getattr(publish.user, "pk", None), publish.kind, publish.name))
        if cached is None or cached[0] < time.monotonic():
            return False
        target = cached[1]
        is_queue = publish.kind is access.Kind.QUEUE
        broker.check_publish(
            broker.PublishRequest(
                queue=target if is_queue else None, topic=None if is_queue else target, messages=publish.messages
            )
        )
        return True

    def _number(self, n: int) -> list[int] | None:
        """Under the lock: `n` ids from the reserve, or None when it holds too few or when an
        earlier publish waits for the writer to number it: ids must follow arrival order,
        because consumers get messages of one priority in id order."""
        if self._unnumbered or len(self._ids) < n:
            return None
        return [self._ids.popleft() for _ in range(n)]

    async def caught_up(self, destination: Destination | None = None) -> None:
        """Return once every publish handed over before this call (to `destination`, a (kind,
        name) pair, when given) is written or failed, or after CATCH_UP_SECONDS. Immediate when
        none is pending: a receive from one queue never waits for publishes to another."""
        with self._lock:
            seq = self._next_seq - 1
            if not self._pending_up_to(seq, destination):
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((seq, destination, asyncio.get_running_loop(), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), CATCH_UP_SECONDS)
        except TimeoutError:
            log.warning("A receive waited %ss for non-durable publishes to be written; reads anyway.", CATCH_UP_SECONDS)

    # ----------------------------------------------------------------- the writer thread

    def _start_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pegasus-write-behind", daemon=True)
            self._thread.start()
            atexit.register(self.flush, EXIT_SECONDS)

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._wake:
                while not self._queue and (self._closed or len(self._ids) >= id_reserve() // 2):
                    if self._closed:
                        return
                    self._wake.wait()
                batch = self._take_batch()
            try:
                # Ids first: the publishes that wait for this round find them when it is answered.
                retry = not self._refill_ids() if len(self._ids) < id_reserve() // 2 else False
                if batch:
                    self._number_late(batch)
                    retry = self._write(batch) or retry
            except Exception:  # a bug: keep the thread (every non-durable publish needs it) and the batch
                log.exception("Non-durable writer: unexpected error; trying again.")
                with self._lock:
                    self._queue.extendleft(reversed(self._writing))
                    self._writing = []
                retry = True
            finally:
                close_old_connections()  # give the connection back to the pool
            backoff = min(MAX_BACKOFF_SECONDS, max(0.05, backoff * 2)) if retry else 0.0
            if backoff:
                time.sleep(backoff)

    def _take_batch(self) -> list[_Entry]:
        """Under the lock: the oldest publishes, up to one round's worth of messages."""
        count = 0
        while self._queue and (not self._writing or count + self._queue[0].size <= group_commit.MAX_ROUND_MESSAGES):
            entry = self._queue.popleft()
            self._writing.append(entry)
            count += entry.size
        return list(self._writing)

    def _number_late(self, batch: list[_Entry]) -> None:
        """Ids for the entries of `batch` that have none, in order, from the reserve (topped up
        first). If the reserve cannot be topped up, they get the sequence's ids as they are
        written, and the ids left in the reserve, which are smaller, are thrown away."""
        need = sum(e.size for e in batch if e.publish.ids is None)
        if need > len(self._ids):
            self._refill_ids(at_least=need)
        with self._lock:
            for entry in batch:
                if entry.publish.ids is None and len(self._ids) >= entry.size:
                    entry.publish = replace(entry.publish, ids=[self._ids.popleft() for _ in range(entry.size)])
                elif entry.publish.ids is None:
                    self._ids.clear()
                self._unnumbered -= entry.unnumbered
                entry.unnumbered = False

    def _write(self, batch: list[_Entry]) -> bool:
        """Write one round; settle what can be settled. True if some of it must be tried again."""
        allowed: dict[AccessKey, Any] = {}
        try:
            outcomes: Sequence[Any] = group_commit.run_round([e.publish for e in batch], allowed)
        except Exception as exc:
            outcomes = [exc] * len(batch)
        until = time.monotonic() + destinations.QUEUE_CACHE_SECONDS
        retry: list[_Entry] = []
        answered_when_written = 0
        collided = False
        for entry, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, IntegrityError) and entry.publish.ids is not None and not entry.renumbered:
                # The ids were taken (only after a PostgreSQL crash restarted the sequence):
                # throw the reserve away and write it again under fresh ids (_number_late).
                collided = True
                entry.publish = replace(entry.publish, ids=None)
                entry.renumbered = True
                answered_when_written += entry.eligible  # no ids to answer with until written
                entry.eligible = False
                retry.append(entry)
            elif not entry.early:
                _resolve(entry.waiter, outcome)
                answered_when_written += entry.eligible
            elif isinstance(outcome, OperationalError | InterfaceError):
                retry.append(entry)
            elif isinstance(outcome, Exception):
                self._drop(entry, outcome)
        with self._lock:
            if collided:
                self._ids.clear()
            self._waiting_for_room -= answered_when_written
            if len(self._allowed) > 10_000:
                self._allowed.clear()
            for key, target in allowed.items():
                self._allowed[key] = (until, target)
            retried = {id(e) for e in retry}  # a set: a round may hold thousands of publishes
            self._behind -= sum(e.size for e in batch if e.early and id(e) not in retried)
            self._writing = []
            self._queue.extendleft(reversed(retry))
            self._answer_those_with_room()
            self._wake_waiters()
        return bool(retry)

    def _answer_those_with_room(self) -> None:
        """Under the lock: answer, in arrival order, the publishes that waited only for the
        backlog to shrink, as far as MAX_BEHIND allows now. They need not wait for their own
        round, so the writer always has the next ones queued while a fast publisher is held
        to its pace (waiting for its own round instead left the writer idle between them)."""
        if not self._waiting_for_room:
            return
        for entry in self._queue:
            if not entry.eligible or entry.early:
                continue
            if self._behind + entry.size > MAX_BEHIND:
                return
            entry.early, entry.eligible = True, False
            self._behind += entry.size
            self._waiting_for_room -= 1
            _resolve(entry.waiter, _results(entry.publish.ids or []))
            entry.waiter = None

    def _drop(self, entry: _Entry, reason: Exception) -> None:
        self.dropped += entry.size
        level = logging.WARNING if isinstance(reason, BrokerError) else logging.ERROR
        log.log(
            level, "Dropped %d non-durable message(s) for %s %r, answered before they were written: %s",
            entry.size, entry.publish.kind, entry.publish.name, reason,
        )  # fmt: skip

    def _refill_ids(self, at_least: int = 0) -> bool:
        """Take ids in advance, up to id_reserve() (and `at_least`); False if the database could
        not be reached (publishes then wait for their rounds meanwhile)."""
        table = TRANSIENT.message._meta.db_table
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                    [table, max(id_reserve(), at_least) - len(self._ids)],
                )
                fresh = [row[0] for row in cursor.fetchall()]
        except DatabaseError:
            log.warning("Non-durable writer: could not take ids in advance; trying again.", exc_info=True)
            return False
        with self._lock:
            self._ids.extend(fresh)
        return True

    def _pending_up_to(self, seq: int, destination: Destination | None) -> bool:
        """Under the lock: is a publish handed over at or before `seq` (to `destination`) not
        yet written?"""
        return any(
            e.seq <= seq and (destination is None or (e.publish.kind, e.publish.name) == destination)
            for entries in (self._writing, self._queue)
            for e in entries
        )

    def _wake_waiters(self) -> None:
        """Under the lock: wake the receives whose publishes are all written."""
        still = []
        for seq, destination, loop, future in self._waiters:
            if self._pending_up_to(seq, destination):
                still.append((seq, destination, loop, future))
            else:
                _resolve((loop, future), None)
        self._waiters = still
        self._wake.notify_all()

    def close(self, timeout: float = EXIT_SECONDS) -> bool:
        """Write what is pending (flush), then end the writer thread (tests)."""
        written = self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return written

    def flush(self, timeout: float) -> bool:
        """Wait (in a thread, not on an event loop) until nothing is pending; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("Exit: %d non-durable message(s) not written.", self._behind)
                    return False
                self._wake.wait(left)
        return True


def _results(ids: Sequence[int]) -> list[broker.PublishResult]:
    """The answer to a publish written under `ids` (message pks of the non-durable store)."""
    return [broker.PublishResult(id=TRANSIENT.public_id(pk), duplicate=False) for pk in ids]


def _resolve(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None, outcome: Any) -> None:
    """Settle a future of another thread's event loop with a result or an exception."""
    if waiter is None:
        return
    loop, future = waiter

    def settle() -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        pass


WRITER = WriteBehind()
