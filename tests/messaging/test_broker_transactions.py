from __future__ import annotations

import pytest

from messaging import broker, clock, queries
from messaging.exceptions import TransactionNotFound, TransactionStateError
from messaging.models import DedupRecord, Message, TxState

pytestmark = pytest.mark.django_db


def _send(queue, body, txn, **options):
    return broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=body, **options)], transaction_id=txn.id)


def test_commit__staged_publishes_appear_together(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    _send(q, "a", txn)
    _send(q, "b", txn)
    assert broker.receive(queue=q) == []
    assert queries.queue_stats(q)["depth"] == 0
    broker.commit(transaction_id=txn.id)
    assert [m.body for m in broker.receive(queue=q, max_messages=5)] == ["a", "b"]


def test_rollback__leaves_no_trace(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    _send(q, "a", txn, dedup_id="k")
    broker.rollback(transaction_id=txn.id)
    assert broker.receive(queue=q) == []
    assert Message.objects.count() == 0 and DedupRecord.objects.count() == 0
    # the dedup id is free again: a rolled-back publish was never published
    [res] = broker.publish(queue=q, messages=[broker.OutgoingMessage(body="again", dedup_id="k")])
    assert not res.duplicate


def test_transactional_ack__held_until_commit(queue_factory, publish):
    q = queue_factory(visibility_timeout_seconds=5)
    publish(q, "a")
    [m] = broker.receive(queue=q)
    txn = broker.begin()
    assert broker.ack(receipts=[m.receipt], transaction_id=txn.id) == ["ok"]
    clock.advance(10)  # past the lease: the transaction still holds it
    assert broker.receive(queue=q) == []
    broker.commit(transaction_id=txn.id)
    clock.advance(10)
    assert broker.receive(queue=q) == []
    assert broker.ack(receipts=[m.receipt]) == ["ok"]  # a repeat is harmless


def test_transactional_ack__rollback_redelivers(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    [m] = broker.receive(queue=q)
    txn = broker.begin()
    broker.ack(receipts=[m.receipt], transaction_id=txn.id)
    broker.rollback(transaction_id=txn.id)
    [again] = broker.receive(queue=q)
    assert again.redelivered and again.delivery_count == 2
    assert broker.ack(receipts=[m.receipt]) == ["stale_receipt"]


def test_prepared__survives_the_idle_timeout_and_commits_from_a_fresh_lookup(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    _send(q, "a", txn)
    broker.prepare(transaction_id=txn.id)
    clock.advance(3600)
    assert broker.run_maintenance().transactions_rolled_back == 0
    assert [t.id for t in broker.list_transactions(state="prepared")] == [txn.id]
    with pytest.raises(TransactionStateError):
        _send(q, "late", txn)
    broker.commit(transaction_id=txn.id)
    assert [m.body for m in broker.receive(queue=q)] == ["a"]


def test_open_transaction__rolls_back_after_idle_timeout(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    _send(q, "a", txn)
    clock.advance(61)
    assert broker.run_maintenance().transactions_rolled_back == 1
    assert broker.get_transaction(transaction_id=txn.id).state == TxState.ROLLED_BACK
    assert Message.objects.count() == 0


def test_state_machine__conflicts_and_idempotent_repeats(queue_factory):
    txn = broker.begin()
    broker.commit(transaction_id=txn.id)
    broker.commit(transaction_id=txn.id)  # repeat: same answer
    with pytest.raises(TransactionStateError):
        broker.rollback(transaction_id=txn.id)
    with pytest.raises(TransactionStateError):
        broker.prepare(transaction_id=txn.id)
    other = broker.begin()
    broker.rollback(transaction_id=other.id)
    broker.rollback(transaction_id=other.id)
    with pytest.raises(TransactionStateError):
        broker.commit(transaction_id=other.id)
    with pytest.raises(TransactionNotFound):
        broker.commit(transaction_id="nope")


def test_transactions__belong_to_their_owner(alice, bob, mallory, queue_factory):
    txn = broker.begin(user=bob)
    with pytest.raises(TransactionNotFound):
        broker.commit(transaction_id=txn.id, user=mallory)
    assert broker.list_transactions(user=mallory) == []
    broker.commit(transaction_id=txn.id, user=alice)  # an admin may resolve anyone's


def test_topic_publish_in_transaction(queue_factory):
    topic, _ = broker.create_topic(name="t")
    sub, _ = broker.create_subscription(topic=topic, name="s")
    txn = broker.begin()
    broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="x")], transaction_id=txn.id)
    assert broker.receive(queue=sub) == []
    broker.commit(transaction_id=txn.id)
    assert [m.body for m in broker.receive(queue=sub)] == ["x"]
