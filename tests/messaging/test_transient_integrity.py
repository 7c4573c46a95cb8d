"""Every non-durable delivery's message exists, whatever deletes or copies them.

The database does not check this for the non-durable store (TransientDelivery.message has no
foreign-key constraint: messaging/models.py says why it cannot break), so this test does, after
each operation that deletes messages or adds deliveries to a stored message, on both databases.
"""

from __future__ import annotations

import pytest
from django.db import connection

from messaging import broker, clock
from messaging.models import Queue, TransientDelivery, TransientMessage

pytestmark = pytest.mark.django_db


def _orphans() -> int:
    """Non-durable deliveries whose message is gone."""
    return TransientDelivery.objects.exclude(message_id__in=TransientMessage.objects.values("id")).count()


def _msgs(*bodies: str, **fields: object) -> list[broker.OutgoingMessage]:
    return [broker.OutgoingMessage(body=b, durable=False, **fields) for b in bodies]  # type: ignore[arg-type]


def _bodies(queue: Queue, *, ack: bool = True) -> list[str]:
    received = broker.receive(queue=queue, max_messages=10)
    if ack:
        broker.ack(receipts=[m.receipt for m in received])
    return sorted(m.body for m in received)


def _cursors(queue: Queue) -> list[str]:
    return [
        f"t{pk}" for pk in TransientDelivery.objects.filter(queue=queue).order_by("id").values_list("id", flat=True)
    ]


def test_no_delivery_outlives_its_message():
    topic, _ = broker.create_topic(name="integrity")
    a, _ = broker.create_subscription(topic=topic, name="a")
    b, _ = broker.create_subscription(topic=topic, name="b")
    q, _ = broker.create_queue(name="integrity-q")
    q2, _ = broker.create_queue(name="integrity-q2")
    broker.publish(topic=topic, messages=_msgs("t1", "t2", "t3"))
    broker.publish(queue=q, messages=_msgs("q1", "q2", "q3"))
    broker.publish(queue=q, messages=_msgs("dedup", dedup_id="once"))  # the ORM path, not bulk.py
    txn = broker.begin()
    broker.publish(queue=q, messages=_msgs("rolled back"), transaction_id=txn.id)
    broker.rollback(transaction_id=txn.id)
    assert _orphans() == 0

    assert _bodies(a) == ["t1", "t2", "t3"]  # acked by a; b still holds its copies
    clock.advance(3600)
    broker.run_maintenance()  # removes a's acked deliveries, keeps the messages b refers to
    assert _orphans() == 0
    assert _bodies(b, ack=False) == ["t1", "t2", "t3"]

    first = _cursors(q)[:1]
    assert broker.move_messages(queue=q, cursors=first, target=q2, copy=True) == 1
    assert broker.delete_messages(queue=q, cursors=first) == 1  # the copy keeps the message
    assert _orphans() == 0
    assert _bodies(q2) == ["q1"]

    broker.purge_queue(queue=q)
    broker.delete_queue(queue=b)  # b's leased copies go with it
    clock.advance(3600)
    broker.run_maintenance()
    assert _orphans() == 0
    assert TransientDelivery.objects.count() == 0
    assert TransientMessage.objects.count() == 0  # nothing left behind either


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the constraint in question is PostgreSQL's")
def test_the_message_constraint_is_not_in_the_database_and_the_queue_constraint_is():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.attname FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid"
            " AND a.attnum = ANY(c.conkey) WHERE c.conrelid = 'messaging_transientdelivery'::regclass"
            " AND c.contype = 'f'"
        )
        checked = {row[0] for row in cursor.fetchall()}
    assert checked == {"queue_id", "origin_queue_id"}
