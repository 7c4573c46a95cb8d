"""Scenario 7: a hypothesis state machine drives the core and checks it against a model.

The model is the contract of docs/API.md ("Concepts") written as plain Python: one queue `work`
(max_deliveries 3, dead letters to `dlq`), a dead-letter queue `dlq` (max_deliveries 2, no
dead-letter queue of its own, so exhausted messages stay there as dead), messages in both
stores, dedup ids, delays, TTLs, leases, acks, nacks, extends, transactions with prepare, the
housekeeping round, and a clock that only moves when the machine says so (messaging.clock,
frozen at a fixed instant so that "lease deadline == now" is an exact comparison).

Where the core may choose (which of several equally ranked messages a receive returns), the
model checks the choice is allowed and then adopts it.

PEGASUS_FAULTS=full runs many more and longer examples.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from django.db import connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from messaging import broker, clock, queries
from messaging.exceptions import Conflict, TransactionNotFound, TransactionStateError
from messaging.models import (
    DedupRecord,
    Delivery,
    Message,
    Queue,
    Transaction,
    TransientDelivery,
    TransientMessage,
)
from tests.faults.ledger import note

pytestmark = pytest.mark.django_db

FULL = os.environ.get("PEGASUS_FAULTS") == "full"
FROZEN = datetime(2030, 1, 1, tzinfo=UTC)
WORK, DLQ = "work", "dlq"
MAX_DELIVERIES = {WORK: 3, DLQ: 2}
VISIBILITY = 30
DEDUP_WINDOW = 600
ACK_RETENTION = 300  # settings.PEGASUS["ACK_RETENTION_SECONDS"]
TXN_TIMEOUT = 60  # settings.PEGASUS["TRANSACTION_TIMEOUT_SECONDS"]
FINISHED_TXN_KEPT = 3600  # housekeeping removes finished transactions after an hour
COUNTS = {"examples": 0, "steps": 0}


@dataclass
class Msg:
    """The model of one message's one delivery row (no topics here: one row per message)."""

    id: str
    key: str
    queue: str
    priority: int
    state: str  # staged, ready, leased, acked, dead, gone
    visible_at: float
    expires_at: float | None
    txn: str | None = None
    count: int = 0
    receipt: str | None = None
    reason: str = ""


@dataclass
class Txn:
    state: str = "open"  # open, prepared, committed, rolled_back, deleted
    last_activity: float = 0.0
    finished_at: float = 0.0


@dataclass
class Dedup:
    message_id: str
    created_at: float
    txn: str | None = None  # the transaction that staged the first message, if any


@dataclass
class Model:
    now: float = 0.0
    msgs: dict[str, Msg] = field(default_factory=dict)
    receipts: list[str] = field(default_factory=list)
    receipt_msg: dict[str, str] = field(default_factory=dict)
    txns: dict[str, Txn] = field(default_factory=dict)
    dedup: dict[str, Dedup] = field(default_factory=dict)


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = Model()
        self.counter = 0

    @initialize()
    def fresh_database(self) -> None:
        COUNTS["examples"] += 1
        for model in (Delivery, TransientDelivery, Message, TransientMessage, DedupRecord, Transaction, Queue):
            model.objects.all().delete()
        clock.reset()
        dlq, _ = broker.create_queue(
            name=DLQ, settings=broker.QueueSettings(max_deliveries=MAX_DELIVERIES[DLQ], visibility_timeout_seconds=30)
        )
        work, _ = broker.create_queue(
            name=WORK,
            settings=broker.QueueSettings(
                max_deliveries=MAX_DELIVERIES[WORK],
                visibility_timeout_seconds=VISIBILITY,
                dead_letter_queue=DLQ,
                dedup_window_seconds=DEDUP_WINDOW,
            ),
        )
        self.queues = {WORK: work, DLQ: dlq}

    # ------------------------------------------------------------------ model helpers

    def _txn_or_none(self, pick: int | None) -> str | None:
        if pick is None or not self.m.txns:
            return None
        ids = list(self.m.txns)  # creation order: ids are random, replays must pick the same one
        return ids[pick % len(ids)]

    def _require_open(self, txn_id: str | None) -> type[Exception] | None:
        """The error the core must raise for using this transaction for a publish or ack."""
        if txn_id is None:
            return None
        txn = self.m.txns[txn_id]
        if txn.state == "deleted":
            return TransactionNotFound
        if txn.state != "open":
            return TransactionStateError
        txn.last_activity = self.m.now
        return None

    def _holds_lease(self, msg: Msg, receipt: str) -> bool:
        return msg.state == "leased" and msg.receipt == receipt and msg.txn is None and msg.visible_at > self.m.now

    def _return_to_queue(self, msg: Msg, visible_at: float, reason: str) -> None:
        msg.txn, msg.receipt = None, None
        if msg.count >= MAX_DELIVERIES[msg.queue]:
            self._dead_letter(msg, reason)
        else:
            msg.state, msg.visible_at = "ready", visible_at

    def _dead_letter(self, msg: Msg, reason: str) -> None:
        msg.reason, msg.expires_at, msg.txn, msg.receipt = reason, None, None, None
        if msg.queue == WORK:
            msg.queue, msg.state, msg.visible_at, msg.count = DLQ, "ready", self.m.now, 0
        else:
            msg.state = "dead"

    def _expire(self, queue: str) -> None:
        """What a receive does first: return expired leases, drop messages past their TTL."""
        for msg in self._in(queue, "leased"):
            if msg.txn is None and msg.visible_at <= self.m.now:
                self._return_to_queue(msg, self.m.now, "max_deliveries")
        for msg in self._in(queue, "ready"):
            if msg.expires_at is not None and msg.expires_at <= self.m.now:
                msg.state = "gone"

    def _in(self, queue: str, state: str) -> list[Msg]:
        return [m for m in self.m.msgs.values() if m.queue == queue and m.state == state]

    def _deliverable(self, queue: str) -> list[Msg]:
        now = self.m.now
        return [
            m for m in self._in(queue, "ready") if m.visible_at <= now and (m.expires_at is None or m.expires_at > now)
        ]

    def _dedup_hit(self, dedup_id: str | None) -> Dedup | None:
        rec = self.m.dedup.get(dedup_id) if dedup_id else None
        if rec is None or rec.created_at < self.m.now - DEDUP_WINDOW:
            return None
        return rec

    # ------------------------------------------------------------------ rules

    @rule(
        n=st.integers(1, 3),
        priorities=st.lists(st.integers(0, 9), min_size=3, max_size=3),
        dedup=st.lists(st.none() | st.sampled_from("abcdef"), min_size=3, max_size=3),
        durable=st.booleans(),
        delay=st.sampled_from([0, 0, 5]),
        ttl=st.sampled_from([None, None, 40]),
        txn_pick=st.none() | st.integers(0, 10),
    )
    def publish(self, n, priorities, dedup, durable, delay, ttl, txn_pick):
        txn_id = self._txn_or_none(txn_pick)
        outgoing = []
        for i in range(n):
            self.counter += 1
            outgoing.append(
                broker.OutgoingMessage(
                    body=f"m{self.counter}", priority=priorities[i], dedup_id=dedup[i], durable=durable,
                    delay_seconds=delay, ttl_seconds=ttl,
                )
            )  # fmt: skip
        expected_error = self._require_open(txn_id)
        if expected_error is None:
            expected_error = self._dedup_conflict(outgoing, txn_id)
        if expected_error is not None:
            with pytest.raises(expected_error):
                broker.publish(queue=self.queues[WORK], messages=outgoing, transaction_id=txn_id)
            return
        results = broker.publish(queue=self.queues[WORK], messages=outgoing, transaction_id=txn_id)
        assert len(results) == n
        for out, result in zip(outgoing, results, strict=True):
            self._check_published(out, result, txn_id)

    def _dedup_conflict(self, outgoing: list[broker.OutgoingMessage], txn_id: str | None) -> type[Exception] | None:
        """A dedup_id whose first message is staged in another unfinished transaction is a
        conflict (retry later): that transaction may yet roll back and take the message with it."""
        for out in outgoing:
            rec = self._dedup_hit(out.dedup_id)
            if rec is not None and rec.txn is not None and rec.txn != txn_id:
                if self.m.txns[rec.txn].state in ("open", "prepared"):
                    return Conflict
        return None

    def _check_published(self, out: broker.OutgoingMessage, result: broker.PublishResult, txn_id: str | None) -> None:
        rec = self._dedup_hit(out.dedup_id)
        if rec is not None:
            assert result.duplicate, f"{out.dedup_id} was seen at {rec.created_at}, now {self.m.now}"
            assert result.id == rec.message_id
            return
        assert not result.duplicate
        assert result.id not in self.m.msgs
        now = self.m.now
        self.m.msgs[result.id] = Msg(
            id=result.id, key=out.body, queue=WORK, priority=out.priority,
            state="staged" if txn_id else "ready", txn=txn_id, visible_at=now + out.delay_seconds,
            expires_at=now + out.ttl_seconds if out.ttl_seconds else None,
        )  # fmt: skip
        if out.dedup_id:
            self.m.dedup[out.dedup_id] = Dedup(result.id, now, txn_id)

    @rule(queue=st.sampled_from([WORK, WORK, DLQ]), max_messages=st.integers(1, 3), vt=st.sampled_from([None, 10]))
    def receive(self, queue, max_messages, vt):
        self._expire(queue)
        deliverable = self._deliverable(queue)
        got = broker.receive(queue=self.queues[queue], max_messages=max_messages, visibility_timeout_seconds=vt)
        assert len(got) == min(max_messages, len(deliverable))
        by_id = {m.id: m for m in deliverable}
        assert all(r.id in by_id for r in got), (got, deliverable)
        assert len({r.id for r in got}) == len(got)
        priorities = [r.priority for r in got]
        assert priorities == sorted(priorities, reverse=True)
        left = [m.priority for m in deliverable if m.id not in {r.id for r in got}]
        assert not got or not left or min(priorities) >= max(left)
        for r in got:
            msg = by_id[r.id]
            msg.state, msg.count, msg.receipt = "leased", msg.count + 1, r.receipt
            msg.visible_at = self.m.now + (vt or VISIBILITY)
            assert r.body == msg.key and r.priority == msg.priority
            assert r.delivery_count == msg.count and r.redelivered == (msg.count > 1)
            assert r.headers.get("x-dead-letter-reason", "") == msg.reason
            self.m.receipts.append(r.receipt)
            self.m.receipt_msg[r.receipt] = msg.id

    def _pick_receipts(self, picks: list[int]) -> list[str]:
        return [self.m.receipts[p % len(self.m.receipts)] for p in picks]

    @precondition(lambda self: self.m.receipts)
    @rule(picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=3), txn_pick=st.none() | st.integers(0, 10))
    def ack(self, picks, txn_pick):
        receipts = self._pick_receipts(picks)
        txn_id = self._txn_or_none(txn_pick)
        expected_error = self._require_open(txn_id)
        if expected_error is not None:
            with pytest.raises(expected_error):
                broker.ack(receipts=receipts, transaction_id=txn_id)
            return
        expected = [self._ack_one(r, txn_id) for r in receipts]
        assert broker.ack(receipts=receipts, transaction_id=txn_id) == expected

    def _ack_one(self, receipt: str, txn_id: str | None) -> str:
        msg = self.m.msgs[self.m.receipt_msg[receipt]]
        if msg.state == "gone" or msg.receipt != receipt:
            return broker.ACK_STALE
        if msg.state == "acked" or (txn_id is not None and msg.state == "leased" and msg.txn == txn_id):
            return broker.ACK_OK  # a repeat of an ack that succeeded
        if not self._holds_lease(msg, receipt):
            return broker.ACK_STALE
        if txn_id is not None:
            msg.txn = txn_id
        else:
            msg.state, msg.visible_at = "acked", self.m.now + ACK_RETENTION
        return broker.ACK_OK

    @precondition(lambda self: self.m.receipts)
    @rule(picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=3), delay=st.sampled_from([0, 5]))
    def nack(self, picks, delay):
        receipts = self._pick_receipts(picks)
        expected = []
        returned = []
        for r in receipts:
            msg = self.m.msgs[self.m.receipt_msg[r]]
            held = self._holds_lease(msg, r) and msg not in returned
            expected.append(broker.ACK_OK if self._holds_lease(msg, r) else broker.ACK_STALE)
            if held:
                returned.append(msg)
        assert broker.nack(receipts=receipts, delay_seconds=delay) == expected
        for msg in returned:
            self._return_to_queue(msg, self.m.now + delay, "nacked")

    @precondition(lambda self: self.m.receipts)
    @rule(picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=2), vt=st.sampled_from([10, 60]))
    def extend(self, picks, vt):
        receipts = self._pick_receipts(picks)
        expected = []
        for r in receipts:
            msg = self.m.msgs[self.m.receipt_msg[r]]
            expected.append(broker.ACK_OK if self._holds_lease(msg, r) else broker.ACK_STALE)
        assert broker.extend(receipts=receipts, visibility_timeout_seconds=vt) == expected
        for r, status in zip(receipts, expected, strict=True):
            if status == broker.ACK_OK:
                self.m.msgs[self.m.receipt_msg[r]].visible_at = self.m.now + vt

    @rule(seconds=st.sampled_from([1, 5, 10, 29, 30, 31, 61, 301, 601, 3601]))
    def advance(self, seconds):
        clock.advance(seconds)
        self.m.now += seconds

    @rule()
    def begin(self):
        txn = broker.begin()
        self.m.txns[txn.id] = Txn(last_activity=self.m.now)

    def _txn_call(self, op, txn_id: str, allowed: tuple[str, ...], done: str) -> bool:
        """Call commit/rollback/prepare and check the state rule; True if the model must apply it."""
        txn = self.m.txns[txn_id]
        if txn.state == "deleted":
            with pytest.raises(TransactionNotFound):
                op(transaction_id=txn_id)
            return False
        if txn.state not in allowed:
            with pytest.raises(TransactionStateError):
                op(transaction_id=txn_id)
            return False
        assert op(transaction_id=txn_id).state == done
        txn.last_activity = self.m.now
        return txn.state != done

    @precondition(lambda self: self.m.txns)
    @rule(pick=st.integers(0, 10))
    def commit(self, pick):
        txn_id = self._txn_or_none(pick)
        assert txn_id is not None
        if self._txn_call(broker.commit, txn_id, ("open", "prepared", "committed"), "committed"):
            for msg in self.m.msgs.values():
                if msg.txn == txn_id and msg.state == "staged":
                    msg.state, msg.txn = "ready", None
                elif msg.txn == txn_id and msg.state == "leased":
                    msg.state, msg.txn, msg.visible_at = "acked", None, self.m.now + ACK_RETENTION
            self._finish(txn_id, "committed")

    @precondition(lambda self: self.m.txns)
    @rule(pick=st.integers(0, 10))
    def rollback(self, pick):
        txn_id = self._txn_or_none(pick)
        assert txn_id is not None
        if self._txn_call(broker.rollback, txn_id, ("open", "prepared", "rolled_back"), "rolled_back"):
            self._rollback(txn_id)

    def _rollback(self, txn_id: str) -> None:
        for msg in self.m.msgs.values():
            if msg.txn == txn_id and msg.state == "staged":
                msg.state, msg.txn = "gone", None
                for dedup_id, rec in list(self.m.dedup.items()):
                    if rec.message_id == msg.id:
                        del self.m.dedup[dedup_id]
            elif msg.txn == txn_id and msg.state == "leased":
                self._return_to_queue(msg, self.m.now, "max_deliveries")
        self._finish(txn_id, "rolled_back")

    def _finish(self, txn_id: str, state: str) -> None:
        txn = self.m.txns[txn_id]
        txn.state, txn.finished_at = state, self.m.now
        for rec in self.m.dedup.values():
            if rec.txn == txn_id:
                rec.txn = None

    @precondition(lambda self: self.m.txns)
    @rule(pick=st.integers(0, 10))
    def prepare(self, pick):
        txn_id = self._txn_or_none(pick)
        assert txn_id is not None
        if self._txn_call(broker.prepare, txn_id, ("open", "prepared"), "prepared"):
            self.m.txns[txn_id].state = "prepared"

    @rule()
    def maintenance(self):
        report = broker.run_maintenance()
        now = self.m.now
        idle = [t for t, txn in self.m.txns.items() if txn.state == "open" and txn.last_activity < now - TXN_TIMEOUT]
        for txn_id in idle:
            self._rollback(txn_id)
        acked = [m for m in self.m.msgs.values() if m.state == "acked" and m.visible_at <= now]
        for msg in acked:
            msg.state = "gone"
        old = [
            t
            for t, txn in self.m.txns.items()
            if txn.state in ("committed", "rolled_back") and txn.finished_at < now - FINISHED_TXN_KEPT
        ]
        for txn_id in old:
            self.m.txns[txn_id].state = "deleted"
        assert report.transactions_rolled_back == len(idle)
        assert report.acked_removed == len(acked)
        assert report.transactions_removed == len(old)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def stats_agree(self):
        if not hasattr(self, "queues"):
            return
        COUNTS["steps"] += 1
        now = self.m.now
        for name, queue in self.queues.items():
            stats = queries.queue_stats(queue)
            leased = self._in(name, "leased")
            assert stats["in_flight"] == sum(1 for m in leased if m.txn is not None or m.visible_at > now)
            assert stats["scheduled"] == sum(1 for m in self._in(name, "ready") if m.visible_at > now)


def test_core_matches_the_model(monkeypatch):
    """Random operations against the core agree with the contract's model at every step."""
    monkeypatch.setattr(clock, "timezone", SimpleNamespace(now=lambda: FROZEN))
    started = time.monotonic()
    run_state_machine_as_test(
        BrokerMachine,
        settings=settings(
            max_examples=200 if FULL else 30,
            stateful_step_count=50 if FULL else 25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
            report_multiple_bugs=False,
        ),
    )
    note(
        f"[faults] 7 model check ({connection.vendor}): examples={COUNTS['examples']} steps={COUNTS['steps']} "
        f"disagreements=0 seconds={time.monotonic() - started:.1f}"
    )


def test_frozen_clock_moves_only_when_told(monkeypatch):
    monkeypatch.setattr(clock, "timezone", SimpleNamespace(now=lambda: FROZEN))
    assert clock.now() == FROZEN
    clock.advance(5)
    assert clock.now() == FROZEN + timedelta(seconds=5)
