"""Every field of a published message arrives as sent, in a batch that mixes usual and unusual
values, to a topic whose subscriptions filter. On PostgreSQL this is the one-statement insert
(messaging/broker/bulk.py), whose rows leave out the fields that have their usual value."""

from __future__ import annotations

from datetime import timedelta

import pytest

from messaging import broker, clock
from messaging.models import Message, Queue, TransientMessage

pytestmark = pytest.mark.django_db


def _received(sub: Queue) -> dict[str, broker.ReceivedMessage]:
    """What `sub` delivers now, by body, acked."""
    received = broker.receive(queue=sub, max_messages=10)
    broker.ack(receipts=[m.receipt for m in received])
    return {m.body: m for m in received}


@pytest.mark.parametrize("durable", [True, False])
def test_publish__usual_and_unusual_fields_arrive_as_sent(durable: bool):
    topic, _ = broker.create_topic(name="fields")
    everyone, _ = broker.create_subscription(topic=topic, name="everyone")
    eu, _ = broker.create_subscription(topic=topic, name="eu", filter={"region": "eu"})
    rich = {"content_type": "text/x-rich", "headers": {"region": "eu", "k": "v"}, "priority": 9, "ttl_seconds": 60}
    messages = [
        broker.OutgoingMessage(body="plain", durable=durable),
        broker.OutgoingMessage(body="rich", durable=durable, **rich),  # type: ignore[arg-type]
        broker.OutgoingMessage(body="late", durable=durable, headers={"region": "us"}, delay_seconds=30),
    ]
    broker.publish(topic=topic, messages=messages)

    first = _received(everyone)
    assert sorted(first) == ["plain", "rich"]  # "late" is delayed
    plain, got = first["plain"], first["rich"]
    assert (plain.content_type, plain.headers, plain.priority, plain.expires_at) == ("", {}, 4, None)
    assert (got.content_type, got.headers, got.priority) == ("text/x-rich", {"region": "eu", "k": "v"}, 9)
    assert got.expires_at == got.published_at + timedelta(seconds=60)
    assert all(m.durable is durable for m in first.values())
    assert sorted(_received(eu)) == ["rich"]  # the filter saw the headers

    clock.advance(31)
    late = _received(everyone)["late"]
    assert (late.headers, late.priority, late.expires_at) == ({"region": "us"}, 4, None)
    assert _received(eu) == {}


@pytest.mark.parametrize("durable", [True, False])
def test_publish__to_a_topic_whose_only_subscription_filters_it_out(durable: bool):
    topic, _ = broker.create_topic(name="filtered-out")
    eu, _ = broker.create_subscription(topic=topic, name="eu", filter={"region": "eu"})
    [result] = broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="us only", durable=durable)])
    assert not result.duplicate
    assert broker.receive(queue=eu) == []
    stored = Message if durable else TransientMessage
    assert stored.objects.filter(body="us only").count() == 1
