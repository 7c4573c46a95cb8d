"""Race tests: several threads, each with its own database connection, on one queue."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import close_old_connections, connection

from messaging import broker

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _in_threads(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(i) in n threads at once; each thread gets its own connection."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close_old_connections()
    assert not errors, errors
    return results


def test_claim__8_consumers_10000_messages_none_twice_none_lost(queue_factory):
    q = queue_factory(visibility_timeout_seconds=600)
    total = 10_000
    for start in range(0, total, 1000):
        broker.publish(queue=q, messages=[broker.OutgoingMessage(body=str(i)) for i in range(start, start + 1000)])

    def consume(_: int) -> list[str]:
        got: list[str] = []
        while batch := broker.receive(queue=q, max_messages=25):
            got += [m.body for m in batch]
            assert broker.ack(receipts=[m.receipt for m in batch]) == ["ok"] * len(batch)
        return got

    per_thread = _in_threads(8, consume)
    seen = Counter(body for bodies in per_thread for body in bodies)
    assert sum(seen.values()) == total  # leased twice would make this larger
    assert len(seen) == total and max(seen.values()) == 1  # 0 lost, 0 twice
    assert sum(1 for bodies in per_thread if bodies) > 1  # they really competed


def test_claim__one_message_one_winner(queue_factory, publish):
    q = queue_factory()
    publish(q, "only")
    results = _in_threads(8, lambda _: broker.receive(queue=q))
    assert sum(len(r) for r in results) == 1


def test_ack__racing_a_lease_expiry_only_one_delivery_is_acknowledged(queue_factory, publish):
    """The original holder acks while another consumer re-leases after expiry: whichever
    happens, exactly one of the two receipts is accepted."""
    from messaging import clock

    q = queue_factory(visibility_timeout_seconds=5)
    publish(q, "contested")
    [first] = broker.receive(queue=q)
    clock.advance(6)

    def act(i: int) -> list[str]:
        if i == 0:
            return broker.ack(receipts=[first.receipt])
        for _ in range(100):  # a row briefly locked by the ack is skipped, not waited for
            if got := broker.receive(queue=q):
                return broker.ack(receipts=[got[0].receipt])
        return []

    a, b = _in_threads(2, act)
    assert a == ["stale_receipt"]  # the lease had expired before anyone acted
    assert b == ["ok"]


def test_ack__same_receipt_from_two_threads_both_ok_once_applied(queue_factory, publish):
    q = queue_factory()
    publish(q, "x", "y")
    [m] = broker.receive(queue=q)
    results = _in_threads(4, lambda _: broker.ack(receipts=[m.receipt]))
    assert results == [["ok"]] * 4
    assert [x.body for x in broker.receive(queue=q, max_messages=5)] == ["y"]


def test_dedup__concurrent_publishers_enqueue_once(queue_factory):
    q = queue_factory()
    results = _in_threads(
        6, lambda i: broker.publish(queue=q, messages=[broker.OutgoingMessage(body=f"p{i}", dedup_id="same")])
    )
    ids = {r[0].id for r in results}
    assert len(ids) == 1
    assert sum(1 for r in results if not r[0].duplicate) == 1
    assert len(broker.receive(queue=q, max_messages=10)) == 1


def test_commit_vs_rollback_race__exactly_one_wins(queue_factory):
    from messaging.exceptions import TransactionStateError

    q = queue_factory()
    txn = broker.begin()
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="t")], transaction_id=txn.id)

    def act(i: int) -> str:
        try:
            (broker.commit if i == 0 else broker.rollback)(transaction_id=txn.id)
            return "done"
        except TransactionStateError:
            return "refused"

    results = _in_threads(2, act)
    assert sorted(results) == ["done", "refused"]
    delivered = broker.receive(queue=q)
    assert len(delivered) == (1 if results[0] == "done" else 0)
