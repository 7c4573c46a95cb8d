"""messaging/broker/operator.py: the console's actions on selected messages."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from messaging import broker, clock, queries
from messaging.exceptions import BatchTooLarge, InvalidRequest
from messaging.models import Delivery, Message, State

pytestmark = pytest.mark.django_db


def cursors(queue, **filters):
    return [m.cursor for m in queries.browse(queue, limit=1000, **filters)]


def bodies(queue, **filters):
    return sorted(m.body for m in queries.browse(queue, limit=1000, **filters))


def dead_letter(queue, publish, *bodies_):
    """Publish and exhaust `bodies_` on a max_deliveries=1 queue so they land in its DLQ."""
    publish(queue, *bodies_)
    got = broker.receive(queue=queue, max_messages=len(bodies_))
    broker.nack(receipts=[m.receipt for m in got])


@pytest.fixture
def with_dlq(queue_factory):
    dlq = queue_factory("dlq")
    return queue_factory("work", max_deliveries=1, dead_letter_queue="dlq"), dlq


def test_parse_cursors__groups_by_store_and_refuses_garbage():
    assert broker.parse_cursors(["d3", "t2", "d1", "d3"]) == {broker.DURABLE: [1, 3], broker.TRANSIENT: [2]}
    for bad in ["", "x1", "d", "d1a", "d-1", "d" + "9" * 19]:
        with pytest.raises(InvalidRequest):
            broker.parse_cursors([bad])
    with pytest.raises(BatchTooLarge):
        broker.parse_cursors(["d1"] * 1001)


def test_delete_messages__only_selected_ready_ones(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b", "c")
    publish(q, "t", durable=False)
    [leased] = broker.receive(queue=q)  # "a" is out to a consumer
    picked = cursors(q)
    assert broker.delete_messages(queue=q, cursors=picked) == 3
    assert bodies(q) == ["a"]
    assert broker.ack(receipts=[leased.receipt]) == ["ok"]


def test_delete_messages__ignores_other_queues_rows(queue_factory, publish):
    q, other = queue_factory(), queue_factory()
    publish(other, "x")
    assert broker.delete_messages(queue=q, cursors=cursors(other)) == 0
    assert bodies(other) == ["x"]


def test_delete_messages__keeps_message_shared_with_a_subscription(publish):
    topic, _ = broker.create_topic(name="t")
    s1, _ = broker.create_subscription(topic=topic, name="s1")
    s2, _ = broker.create_subscription(topic=topic, name="s2")
    broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="m")])
    assert broker.delete_messages(queue=s1, cursors=cursors(s1)) == 1
    assert bodies(s1) == [] and bodies(s2) == ["m"]
    assert Message.objects.count() == 1


def test_delete_messages__never_staged_ones(queue_factory):
    q = queue_factory()
    txn = broker.begin()
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="s")], transaction_id=txn.id)
    assert broker.delete_messages(queue=q, cursors=cursors(q)) == 0
    broker.commit(transaction_id=txn.id)
    assert bodies(q, state="ready") == ["s"]


def test_move_messages__to_another_queue_fresh(queue_factory, publish):
    q, target = queue_factory(), queue_factory()
    publish(q, "a", "b")
    publish(q, "later", delay_seconds=60)
    [leased] = broker.receive(queue=q)
    assert broker.move_messages(queue=q, cursors=cursors(q), target=target) == 2
    assert bodies(q) == ["a"] and bodies(target) == ["b", "later"]
    [b] = broker.receive(queue=target, max_messages=5)  # "later" keeps its delay
    assert b.body == "b" and broker.ack(receipts=[b.receipt]) == ["ok"]
    clock.advance(61)
    [later] = broker.receive(queue=target)
    assert later.body == "later" and later.delivery_count == 1
    assert broker.ack(receipts=[leased.receipt]) == ["stale_receipt"]  # its lease ran out meanwhile


def test_move_messages__dead_letter_becomes_ready_without_marks(with_dlq, queue_factory, publish):
    work, dlq = with_dlq
    target = queue_factory("target")
    dead_letter(work, publish, "x")
    assert broker.move_messages(queue=dlq, cursors=cursors(dlq), target=target) == 1
    [m] = broker.receive(queue=target)
    assert m.body == "x" and "x-dead-letter-reason" not in m.headers and m.delivery_count == 1


def test_move_messages__to_itself_is_refused(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    with pytest.raises(InvalidRequest):
        broker.move_messages(queue=q, cursors=cursors(q), target=q)


def test_copy_messages__keeps_the_original(queue_factory, publish, django_capture_on_commit_callbacks):
    q, target = queue_factory(), queue_factory()
    publish(q, "a", "b")
    with django_capture_on_commit_callbacks() as callbacks:
        assert broker.move_messages(queue=q, cursors=cursors(q), target=target, copy=True) == 2
    assert callbacks  # the target's waiters are rung after commit
    assert bodies(q) == ["a", "b"] and bodies(target) == ["a", "b"]
    assert Message.objects.count() == 2  # stored once, delivered twice
    got = broker.receive(queue=q, max_messages=5)
    broker.ack(receipts=[m.receipt for m in got])
    assert bodies(target) == ["a", "b"]


def test_retry_dead_letters__selected_ones_go_back(with_dlq, publish):
    work, dlq = with_dlq
    dead_letter(work, publish, "x", "y")
    x = next(m.cursor for m in queries.browse(dlq) if m.body == "x")
    assert broker.retry_dead_letters(queue=dlq, cursors=[x]) == 1
    assert bodies(dlq) == ["y"] and bodies(work) == ["x"]
    [m] = broker.receive(queue=work)
    assert m.delivery_count == 1 and "x-dead-letter-reason" not in m.headers


def test_retry_dead_letters__own_dead_rows_without_dlq(queue_factory, publish):
    q = queue_factory(max_deliveries=1)
    dead_letter(q, publish, "x")
    assert bodies(q, state="dead_lettered") == ["x"]
    assert broker.retry_dead_letters(queue=q, cursors=cursors(q)) == 1
    assert [m.body for m in broker.receive(queue=q)] == ["x"]


def test_retry_dead_letters__ignores_ordinary_messages(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    assert broker.retry_dead_letters(queue=q, cursors=cursors(q)) == 0


def test_set_priority__reorders_receives(queue_factory, publish):
    q = queue_factory()
    publish(q, "first", "second")
    second = next(m.cursor for m in queries.browse(q) if m.body == "second")
    assert broker.set_priority(queue=q, cursors=[second], priority=9) == 1
    assert [m.body for m in broker.receive(queue=q, max_messages=2)] == ["second", "first"]


@pytest.mark.parametrize("priority", [-1, 10, True, "5"])
def test_set_priority__validates(queue_factory, publish, priority):
    q = queue_factory()
    publish(q, "a")
    with pytest.raises(InvalidRequest):
        broker.set_priority(queue=q, cursors=cursors(q), priority=priority)


def test_set_priority__never_a_leased_message(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    picked = cursors(q)
    broker.receive(queue=q)
    assert broker.set_priority(queue=q, cursors=picked, priority=9) == 0
    assert Delivery.objects.get().state == State.LEASED


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_delete_messages__skips_a_row_a_consumer_is_claiming(queue_factory, publish):
    """A receive holding the row lock wins; the operator's delete skips the row instead of waiting."""
    q = queue_factory()
    publish(q, "a")
    picked = cursors(q)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        try:
            with transaction.atomic():
                list(Delivery.objects.select_for_update().filter(queue=q))
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    t = threading.Thread(target=hold_lock)
    t.start()
    try:
        assert locked.wait(10)
        assert broker.delete_messages(queue=q, cursors=picked) == 0
        assert broker.set_priority(queue=q, cursors=picked, priority=1) == 0
    finally:
        release.set()
        t.join()
    assert bodies(q) == ["a"]
