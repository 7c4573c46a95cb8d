from __future__ import annotations

import pytest

from messaging import broker, queries
from messaging.exceptions import InvalidName, InvalidRequest, MessageTooLarge, NameTaken, QueueNotFound
from messaging.models import Message

pytestmark = pytest.mark.django_db


def test_create_queue__is_idempotent_with_same_settings(queue_factory):
    q = queue_factory("orders", max_deliveries=3)
    again, created = broker.create_queue(name="orders", settings=broker.QueueSettings(max_deliveries=3))
    assert again.pk == q.pk and created is False


def test_create_queue__other_settings_conflict(queue_factory):
    queue_factory("orders", max_deliveries=3)
    with pytest.raises(NameTaken):
        broker.create_queue(name="orders", settings=broker.QueueSettings(max_deliveries=4))


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 201, "ü", ".hidden", "a/b"])
def test_create_queue__invalid_names_are_refused(name):
    with pytest.raises(InvalidName):
        broker.create_queue(name=name)


def test_create_queue__unknown_dead_letter_queue(queue_factory):
    with pytest.raises(QueueNotFound):
        queue_factory("q", dead_letter_queue="missing")


def test_publish__too_large_writes_nothing(queue_factory, publish):
    q = queue_factory(max_message_bytes=10)
    with pytest.raises(MessageTooLarge):
        publish(q, "small", "x" * 11)
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    "options",
    [{"priority": 10}, {"priority": -1}, {"delay_seconds": -1}, {"ttl_seconds": 0}, {"headers": {"a": 1}}],
)
def test_publish__invalid_options_write_nothing(queue_factory, publish, options):
    q = queue_factory()
    with pytest.raises(InvalidRequest):
        publish(q, "ok", **options)
    assert Message.objects.count() == 0


def test_receive__priority_then_age(queue_factory, publish):
    q = queue_factory()
    publish(q, "low", priority=1)
    publish(q, "high-1", priority=9)
    publish(q, "mid", priority=4)
    publish(q, "high-2", priority=9)
    got = broker.receive(queue=q, max_messages=10)
    assert [m.body for m in got] == ["high-1", "high-2", "mid", "low"]


def test_receive__delay_hides_until_due(queue_factory, publish):
    from messaging import clock

    q = queue_factory(visibility_timeout_seconds=300)
    publish(q, "later", delay_seconds=30)
    publish(q, "now")
    assert [m.body for m in broker.receive(queue=q, max_messages=10)] == ["now"]
    assert queries.queue_stats(q)["scheduled"] == 1
    clock.advance(31)
    assert [m.body for m in broker.receive(queue=q, max_messages=10)] == ["later"]


def test_receive__ttl_expired_is_never_delivered(queue_factory, publish):
    from messaging import clock

    q = queue_factory()
    publish(q, "short", ttl_seconds=5)
    clock.advance(6)
    assert broker.receive(queue=q) == []
    assert Message.objects.count() == 0  # dropped with its body


def test_receive__ttl_expired_dead_lettered_when_configured(queue_factory, publish):
    from messaging import clock

    dlq = queue_factory("dlq")
    q = queue_factory(expired_action="dead_letter", dead_letter_queue="dlq")
    publish(q, "short", ttl_seconds=5)
    clock.advance(6)
    assert broker.receive(queue=q) == []
    [dead] = broker.receive(queue=dlq)
    assert dead.headers["x-dead-letter-reason"] == "expired"
    assert dead.headers["x-dead-letter-origin"] == q.name


def test_purge__keeps_leased_messages(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b", "c")
    [leased] = broker.receive(queue=q)
    assert broker.purge_queue(queue=q) == 2
    assert broker.ack(receipts=[leased.receipt]) == ["ok"]
    stats = queries.queue_stats(q)
    assert stats["depth"] == 0 and stats["in_flight"] == 0


def test_delete_queue__removes_messages(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b")
    broker.receive(queue=q)
    broker.delete_queue(queue=q)
    assert Message.objects.count() == 0
    with pytest.raises(QueueNotFound):
        broker.get_queue(name=q.name)


def test_stats__counts_each_state(queue_factory, publish):
    q = queue_factory()
    publish(q, "a", "b", "c")
    publish(q, "later", delay_seconds=60)
    broker.receive(queue=q)
    stats = queries.queue_stats(q)
    assert (stats["depth"], stats["in_flight"], stats["scheduled"], stats["dead_lettered"]) == (2, 1, 1, 0)
    assert stats["oldest_age_seconds"] >= 0


def test_non_durable_messages__use_the_transient_store(queue_factory, publish):
    from messaging.models import TransientMessage

    q = queue_factory()
    [res] = publish(q, "fast", durable=False)
    assert res.id.startswith("t") and TransientMessage.objects.count() == 1 and Message.objects.count() == 0
    [got] = broker.receive(queue=q)
    assert got.body == "fast" and got.durable is False and got.id == res.id
    assert broker.ack(receipts=[got.receipt]) == ["ok"]


def test_receive__mixes_stores_by_priority(queue_factory, publish):
    q = queue_factory()
    publish(q, "durable-low", priority=1)
    publish(q, "fast-high", priority=8, durable=False)
    assert [m.body for m in broker.receive(queue=q, max_messages=5)] == ["fast-high", "durable-low"]


def test_paused_queue__delivers_nothing_until_resumed(queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    broker.set_paused(queue=q, paused=True)
    q.refresh_from_db()
    assert broker.receive(queue=q) == []
    broker.set_paused(queue=q, paused=False)
    q.refresh_from_db()
    assert [m.body for m in broker.receive(queue=q)] == ["a"]


@pytest.mark.postgres
def test_transient_tables_are_unlogged_and_durable_ones_logged():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, relpersistence FROM pg_class WHERE relkind = 'r' AND relname IN "
            "('messaging_message', 'messaging_delivery', 'messaging_transientmessage', 'messaging_transientdelivery')"
        )
        persistence = dict(cursor.fetchall())
    assert persistence == {
        "messaging_message": "p",
        "messaging_delivery": "p",
        "messaging_transientmessage": "u",
        "messaging_transientdelivery": "u",
    }
