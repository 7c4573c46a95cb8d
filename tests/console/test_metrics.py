"""messaging/metrics.py: publish/deliver/ack counters the broker adds after commit."""

from __future__ import annotations

import pytest
from django.db import transaction

from messaging import broker, metrics

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_counters")]


def test_counts__publish_deliver_ack_per_queue_and_broker(queue_factory, publish, django_capture_on_commit_callbacks):
    q = queue_factory()
    with django_capture_on_commit_callbacks(execute=True):
        publish(q, "a", "b", "c")
        got = broker.receive(queue=q, max_messages=2)
        broker.ack(receipts=[got[0].receipt, "bogus"])
    counts = metrics.drain()
    assert counts[(metrics.PUBLISHED, ("queue", q.pk))] == 3
    assert counts[(metrics.PUBLISHED, metrics.BROKER)] == 3
    assert counts[(metrics.DELIVERED, ("queue", q.pk))] == 2
    assert counts[(metrics.ACKED, ("queue", q.pk))] == 1
    assert counts[(metrics.ACKED, metrics.BROKER)] == 1
    assert metrics.drain() == {}


def test_counts__topic_publish_is_one_broker_publish(django_capture_on_commit_callbacks):
    topic, _ = broker.create_topic(name="t")
    subs = [broker.create_subscription(topic=topic, name=n)[0] for n in ("s1", "s2")]
    with django_capture_on_commit_callbacks(execute=True):
        broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="m")])
    counts = metrics.drain()
    assert counts[(metrics.PUBLISHED, metrics.BROKER)] == 1
    assert counts[(metrics.PUBLISHED, ("topic", topic.pk))] == 1
    assert all(counts[(metrics.PUBLISHED, ("queue", s.pk))] == 1 for s in subs)


def test_counts__duplicates_and_rollbacks_do_not_count(queue_factory, publish, django_capture_on_commit_callbacks):
    q = queue_factory()
    with django_capture_on_commit_callbacks(execute=True):
        publish(q, "a", dedup_id="x")
        publish(q, "a", dedup_id="x")
    assert metrics.drain()[(metrics.PUBLISHED, metrics.BROKER)] == 1
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            publish(q, "b")
            raise RuntimeError
    assert metrics.drain() == {}


def test_restore__puts_counts_back():
    metrics.restore({(metrics.ACKED, metrics.BROKER): 2})
    metrics.restore({(metrics.ACKED, metrics.BROKER): 1})
    assert metrics.drain() == {(metrics.ACKED, metrics.BROKER): 3}
