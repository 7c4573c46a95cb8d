"""Regression (found by tests/faults/test_model.py): a duplicate of a message that is still
staged in an unfinished transaction must not be answered "duplicate", or a rollback of that
transaction loses the second publisher's message."""

from __future__ import annotations

import pytest

from messaging import broker
from messaging.exceptions import DuplicatePending

pytestmark = pytest.mark.django_db


def _msg(dedup_id: str) -> list[broker.OutgoingMessage]:
    return [broker.OutgoingMessage(body=dedup_id, dedup_id=dedup_id)]


def test_publish__duplicate_of_a_staged_message_is_pending_until_the_transaction_ends(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    broker.publish(queue=q, messages=_msg("x"), transaction_id=txn.id)
    with pytest.raises(DuplicatePending):
        broker.publish(queue=q, messages=_msg("x"))
    other = broker.begin()
    with pytest.raises(DuplicatePending):
        broker.publish(queue=q, messages=_msg("x"), transaction_id=other.id)
    broker.rollback(transaction_id=txn.id)
    [again] = broker.publish(queue=q, messages=_msg("x"))
    assert not again.duplicate
    [got] = broker.receive(queue=q)
    assert got.id == again.id


def test_publish__duplicate_after_commit_is_answered_duplicate(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    [first] = broker.publish(queue=q, messages=_msg("y"), transaction_id=txn.id)
    broker.prepare(transaction_id=txn.id)
    with pytest.raises(DuplicatePending):
        broker.publish(queue=q, messages=_msg("y"))
    broker.commit(transaction_id=txn.id)
    [again] = broker.publish(queue=q, messages=_msg("y"))
    assert again.duplicate and again.id == first.id


def test_publish__duplicate_inside_the_same_transaction_is_a_duplicate(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    [first] = broker.publish(queue=q, messages=_msg("z"), transaction_id=txn.id)
    [again] = broker.publish(queue=q, messages=_msg("z"), transaction_id=txn.id)
    assert again.duplicate and again.id == first.id


def test_publish__pending_duplicate_refuses_the_whole_batch(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    broker.publish(queue=q, messages=_msg("w"), transaction_id=txn.id)
    with pytest.raises(DuplicatePending):
        broker.publish(queue=q, messages=[broker.OutgoingMessage(body="other"), *_msg("w")])
    broker.commit(transaction_id=txn.id)
    assert [m.body for m in broker.receive(queue=q, max_messages=10)] == ["w"]
