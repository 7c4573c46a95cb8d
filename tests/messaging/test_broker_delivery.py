from __future__ import annotations

import pytest

from messaging import broker, clock, queries
from messaging.exceptions import PermissionDenied

pytestmark = pytest.mark.django_db


def test_ack__removes_the_message(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    [m] = broker.receive(queue=q)
    assert broker.ack(receipts=[m.receipt]) == ["ok"]
    clock.advance(3600)
    assert broker.receive(queue=q) == []


def test_ack__repeat_is_ok_and_changes_nothing(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b")
    [m] = broker.receive(queue=q)
    assert broker.ack(receipts=[m.receipt]) == ["ok"]
    assert broker.ack(receipts=[m.receipt]) == ["ok"]
    assert queries.queue_stats(q)["depth"] == 1


def test_ack__stale_after_lease_expiry_even_before_redelivery(queue_factory, publish):
    q = queue_factory(visibility_timeout_seconds=10)
    publish(q, "a")
    [m] = broker.receive(queue=q)
    clock.advance(11)
    assert broker.ack(receipts=[m.receipt]) == ["stale_receipt"]
    [again] = broker.receive(queue=q)
    assert again.redelivered and again.delivery_count == 2


def test_ack__stale_receipt_after_redelivery_changes_nothing(queue_factory, publish):
    q = queue_factory(visibility_timeout_seconds=10)
    publish(q, "a")
    [first] = broker.receive(queue=q)
    clock.advance(11)
    [second] = broker.receive(queue=q)
    assert broker.ack(receipts=[first.receipt]) == ["stale_receipt"]
    with pytest.raises(broker.StaleReceipt):
        broker.require_some_ok(broker.ack(receipts=[first.receipt]))
    assert broker.ack(receipts=[second.receipt]) == ["ok"]
    assert broker.ack(receipts=[first.receipt]) == ["stale_receipt"]


@pytest.mark.parametrize("receipt", ["", "garbage", "d.x", "x1.abc", "d99999.abc", "d1." + "a" * 100])
def test_ack__malformed_or_unknown_receipts_are_stale(receipt):
    assert broker.ack(receipts=[receipt]) == ["stale_receipt"]


def test_ack__mixed_results_in_request_order(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    [m] = broker.receive(queue=q)
    assert broker.ack(receipts=["bogus", m.receipt]) == ["stale_receipt", "ok"]


def test_nack__redelivers_after_delay(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    [m] = broker.receive(queue=q)
    assert broker.nack(receipts=[m.receipt], delay_seconds=20) == ["ok"]
    assert broker.receive(queue=q) == []
    clock.advance(21)
    [again] = broker.receive(queue=q)
    assert again.redelivered and again.delivery_count == 2
    assert broker.ack(receipts=[m.receipt]) == ["stale_receipt"]


def test_extend__keeps_the_lease(queue_factory, publish):
    q = queue_factory(visibility_timeout_seconds=10)
    publish(q, "a")
    [m] = broker.receive(queue=q)
    clock.advance(8)
    assert broker.extend(receipts=[m.receipt], visibility_timeout_seconds=30) == ["ok"]
    clock.advance(8)
    assert broker.receive(queue=q) == []
    assert broker.ack(receipts=[m.receipt]) == ["ok"]


def test_ack__same_receipt_twice_in_one_call_is_ok_twice(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b")
    [m] = broker.receive(queue=q)
    assert broker.ack(receipts=[m.receipt, m.receipt]) == ["ok", "ok"]
    assert queries.queue_stats(q)["depth"] == 1


@pytest.mark.parametrize("stale_first", [True, False])
def test_ack__a_stale_and_the_current_receipt_of_one_message_in_one_call(queue_factory, publish, stale_first):
    """Both name the same row (bulk.ack pairs each receipt with its row): only the lease the
    current receipt holds is acked, whichever comes first."""
    q = queue_factory(visibility_timeout_seconds=10)
    publish(q, "a")
    [first] = broker.receive(queue=q)
    clock.advance(11)
    [second] = broker.receive(queue=q)
    receipts = [first.receipt, second.receipt] if stale_first else [second.receipt, first.receipt]
    statuses = ["stale_receipt", "ok"] if stale_first else ["ok", "stale_receipt"]
    assert broker.ack(receipts=receipts) == statuses
    assert broker.ack(receipts=[second.receipt]) == ["ok"]  # acked: a repeat answers ok again
    assert queries.queue_stats(q)["depth"] == 0


def test_ack__refused_by_authorize_changes_nothing(queue_factory, publish):
    # On PostgreSQL the ack is written by the same statement that locks the rows, before the
    # authorization check: the refusal must undo it.
    q = queue_factory()
    publish(q, "a")
    [m] = broker.receive(queue=q)
    with pytest.raises(PermissionDenied):
        broker.ack(receipts=[m.receipt], authorize=lambda queue: False)
    assert queries.queue_stats(q)["in_flight"] == 1
    assert broker.ack(receipts=[m.receipt], authorize=lambda queue: True) == ["ok"]
    assert queries.queue_stats(q)["in_flight"] == 0


def test_ack_and_receive__refused_ack_claims_nothing(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b")
    [m] = broker.receive(queue=q)
    with pytest.raises(PermissionDenied):
        broker.ack_and_receive(receipts=[m.receipt], queue=q, max_messages=10, authorize=lambda queue: False)
    assert queries.queue_stats(q)["in_flight"] == 1
    assert [x.body for x in broker.receive(queue=q, max_messages=10)] == ["b"]


def test_receive__returns_expired_leases_before_claiming(queue_factory, publish):
    # The expired lease goes back to the queue first (visible from now: after "b", which waited
    # longer), then the claim takes both, in order, with the redelivery flagged.
    q = queue_factory(visibility_timeout_seconds=10)
    publish(q, "a")
    [first] = broker.receive(queue=q)
    clock.advance(5)
    publish(q, "b")
    clock.advance(6)
    got = broker.receive(queue=q, max_messages=10)
    assert [(m.body, m.redelivered, m.delivery_count) for m in got] == [("b", False, 1), ("a", True, 2)]
    assert broker.ack(receipts=[first.receipt]) == ["stale_receipt"]


def test_receive__dead_letters_exhausted_leases_and_claims_the_rest(queue_factory, publish):
    q = queue_factory(max_deliveries=1, visibility_timeout_seconds=5)
    publish(q, "poison")
    assert len(broker.receive(queue=q)) == 1
    publish(q, "fine")
    clock.advance(6)
    assert [m.body for m in broker.receive(queue=q, max_messages=10)] == ["fine"]
    assert queries.queue_stats(q)["dead_lettered"] == 1


def test_max_deliveries__moves_to_dead_letter_queue_with_headers(queue_factory, publish):
    dlq = queue_factory("orders-dlq")
    q = queue_factory("orders", max_deliveries=2, visibility_timeout_seconds=5, dead_letter_queue="orders-dlq")
    publish(q, "poison", headers={"k": "v"})
    for _ in range(2):
        assert len(broker.receive(queue=q)) == 1
        clock.advance(6)
    assert broker.receive(queue=q) == []
    assert queries.queue_stats(q)["dead_lettered"] == 1
    [dead] = broker.receive(queue=dlq)
    assert dead.body == "poison"
    assert dead.headers == {"k": "v", "x-dead-letter-reason": "max_deliveries", "x-dead-letter-origin": "orders"}


def test_max_deliveries__nack_dead_letters_immediately(queue_factory, publish):
    dlq = queue_factory("dlq")
    q = queue_factory(max_deliveries=1, dead_letter_queue="dlq")
    publish(q, "poison")
    [m] = broker.receive(queue=q)
    broker.nack(receipts=[m.receipt])
    assert broker.receive(queue=q) == []
    [dead] = broker.receive(queue=dlq)
    assert dead.headers["x-dead-letter-reason"] == "nacked"


def test_redrive__returns_dead_letters_to_origin(queue_factory, publish):
    dlq = queue_factory("dlq")
    q = queue_factory(max_deliveries=1, dead_letter_queue="dlq")
    publish(q, "a", "b")
    for m in broker.receive(queue=q, max_messages=2):
        broker.nack(receipts=[m.receipt])
    assert queries.queue_stats(dlq)["depth"] == 2
    assert broker.redrive(queue=dlq, max_messages=1) == 1
    assert broker.redrive(queue=dlq) == 1
    got = broker.receive(queue=q, max_messages=5)
    assert sorted(m.body for m in got) == ["a", "b"]
    assert all(m.delivery_count == 1 and "x-dead-letter-reason" not in m.headers for m in got)
    assert queries.queue_stats(q)["dead_lettered"] == 0


def test_dead_letters_without_a_dlq_stay_in_the_queue(queue_factory, publish):
    q = queue_factory(max_deliveries=1)
    publish(q, "a")
    [m] = broker.receive(queue=q)
    broker.nack(receipts=[m.receipt])
    assert broker.receive(queue=q) == []
    assert queries.queue_stats(q)["dead_lettered"] == 1
    assert broker.redrive(queue=q) == 1
    assert [m.body for m in broker.receive(queue=q)] == ["a"]


def test_dedup__inside_window_answers_first_id(queue_factory, publish):
    q = queue_factory()
    [first] = publish(q, "a", dedup_id="k1")
    [again] = publish(q, "a-again", dedup_id="k1")
    assert again.id == first.id and again.duplicate and not first.duplicate
    assert [m.body for m in broker.receive(queue=q, max_messages=5)] == ["a"]


def test_dedup__within_one_batch(queue_factory):
    q = queue_factory()
    res = broker.publish(queue=q, messages=[broker.OutgoingMessage(body=b, dedup_id="same") for b in ("a", "b")])
    assert res[1].duplicate and res[1].id == res[0].id
    assert len(broker.receive(queue=q, max_messages=5)) == 1


def test_dedup__outside_window_is_new(queue_factory, publish):
    q = queue_factory(dedup_window_seconds=60)
    [first] = publish(q, "a", dedup_id="k1")
    clock.advance(61)
    [again] = publish(q, "b", dedup_id="k1")
    assert not again.duplicate and again.id != first.id
    assert len(broker.receive(queue=q, max_messages=5)) == 2


def test_dedup__per_destination(queue_factory, publish):
    q1, q2 = queue_factory(), queue_factory()
    [a] = publish(q1, "a", dedup_id="k")
    [b] = publish(q2, "b", dedup_id="k")
    assert not b.duplicate and a.id != b.id


def test_maintenance__removes_acked_rows_and_old_dedup(queue_factory, publish):
    from messaging.models import DedupRecord, Delivery, Message

    q = queue_factory(dedup_window_seconds=60)
    publish(q, "a", dedup_id="x")
    [m] = broker.receive(queue=q)
    broker.ack(receipts=[m.receipt])
    clock.advance(601)
    report = broker.run_maintenance()
    assert report.acked_removed == 1 and report.dedup_removed == 1
    assert Delivery.objects.count() == Message.objects.count() == DedupRecord.objects.count() == 0
