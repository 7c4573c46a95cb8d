from __future__ import annotations

import pytest

from messaging import broker, clock, queries
from messaging.exceptions import InvalidFilter, NameTaken, SubscriptionNotFound
from messaging.models import Message

pytestmark = pytest.mark.django_db


def _pub(topic, *bodies, **options):
    return broker.publish(topic=topic, messages=[broker.OutgoingMessage(body=b, **options) for b in bodies])


def test_topic__every_subscription_gets_a_copy_and_the_body_is_stored_once():
    topic, _ = broker.create_topic(name="news")
    one, _ = broker.create_subscription(topic=topic, name="one")
    two, _ = broker.create_subscription(topic=topic, name="two")
    _pub(topic, "hello")
    assert Message.objects.count() == 1
    for sub in (one, two):
        [m] = broker.receive(queue=sub)
        assert m.body == "hello" and m.destination == f"news/{sub.name}"
        broker.ack(receipts=[m.receipt])
    assert Message.objects.count() == 1  # kept until the acked rows are cleaned up
    clock.advance(3600)
    broker.run_maintenance()
    assert Message.objects.count() == 0


def test_topic__only_subscriptions_existing_at_publish_time():
    topic, _ = broker.create_topic(name="news")
    early, _ = broker.create_subscription(topic=topic, name="early")
    _pub(topic, "first")
    late, _ = broker.create_subscription(topic=topic, name="late")
    assert [m.body for m in broker.receive(queue=early)] == ["first"]
    assert broker.receive(queue=late) == []


def test_topic__no_subscriptions_means_nothing_kept():
    topic, _ = broker.create_topic(name="void")
    [res] = _pub(topic, "lost in space")
    assert not res.duplicate


def test_subscription__filter_selects_by_headers():
    topic, _ = broker.create_topic(name="orders")
    eu, _ = broker.create_subscription(topic=topic, name="eu", filter={"region": ["eu", "uk"], "test": False})
    urgent, _ = broker.create_subscription(topic=topic, name="urgent", filter={"urgent": True})
    _pub(topic, "eu-1", headers={"region": "eu"})
    _pub(topic, "us-urgent", headers={"region": "us", "urgent": "yes"})
    _pub(topic, "eu-test", headers={"region": "eu", "test": "1"})
    assert [m.body for m in broker.receive(queue=eu, max_messages=10)] == ["eu-1"]
    assert [m.body for m in broker.receive(queue=urgent, max_messages=10)] == ["us-urgent"]


@pytest.mark.parametrize("flt", ["region = 'eu'", {"a": 1}, {"a": []}, {"": "x"}, [1]])
def test_subscription__invalid_filter_is_refused(flt):
    topic, _ = broker.create_topic(name="t")
    with pytest.raises(InvalidFilter):
        broker.create_subscription(topic=topic, name="s", filter=flt)


def test_subscription__recreate_with_other_settings_conflicts():
    topic, _ = broker.create_topic(name="t")
    broker.create_subscription(topic=topic, name="s", durable=True)
    with pytest.raises(NameTaken):
        broker.create_subscription(topic=topic, name="s", durable=False)


def test_durable_subscription__collects_while_no_consumer_exists():
    topic, _ = broker.create_topic(name="t")
    sub, _ = broker.create_subscription(topic=topic, name="keeper", durable=True)
    _pub(topic, "a", "b")
    clock.advance(24 * 3600)
    broker.run_maintenance()
    assert queries.queue_stats(sub)["depth"] == 2
    assert [m.body for m in broker.receive(queue=sub, max_messages=5)] == ["a", "b"]


def test_non_durable_subscription__does_not_outlive_its_owner_lease():
    topic, _ = broker.create_topic(name="t")
    sub, _ = broker.create_subscription(topic=topic, name="temp", durable=False, expires_after_seconds=60)
    _pub(topic, "a")
    clock.advance(30)
    broker.receive(queue=sub)  # a receive keeps it alive
    clock.advance(59)
    assert broker.run_maintenance().subscriptions_expired == 0
    clock.advance(2)
    assert broker.run_maintenance().subscriptions_expired == 1
    assert Message.objects.count() == 0
    with pytest.raises(SubscriptionNotFound):
        broker.get_subscription(topic="t", name="temp")


def test_non_durable_subscription__deleted_with_its_owner_connection():
    topic, _ = broker.create_topic(name="t")
    broker.create_subscription(topic=topic, name="ws-1", durable=False, owner="conn-1")
    keep, _ = broker.create_subscription(topic=topic, name="ws-2", durable=False, owner="conn-2")
    _pub(topic, "a")
    assert broker.delete_owned_subscriptions(owner="conn-1") == 1
    assert [m.body for m in broker.receive(queue=keep)] == ["a"]


def test_delete_topic__removes_subscriptions_and_messages():
    topic, _ = broker.create_topic(name="t")
    broker.create_subscription(topic=topic, name="s")
    _pub(topic, "a")
    broker.delete_topic(topic=topic)
    assert Message.objects.count() == 0


def test_topic_dedup__first_id_answered():
    topic, _ = broker.create_topic(name="t")
    sub, _ = broker.create_subscription(topic=topic, name="s")
    [a] = _pub(topic, "a", dedup_id="k")
    [b] = _pub(topic, "b", dedup_id="k")
    assert b.duplicate and b.id == a.id
    assert [m.body for m in broker.receive(queue=sub, max_messages=5)] == ["a"]
