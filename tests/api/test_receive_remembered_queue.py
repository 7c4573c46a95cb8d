"""A REST receive from a queue uses the queue row this process read in the last second
(longpoll.receive_from with broker.get_queue(recent_ok=True)) and still answers as if it had
looked the queue up afresh: another process's deletion of the queue, or of its dead-letter
queue, is simulated here by putting the stale row back where this process remembers it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from messaging import broker, clock
from messaging.broker import destinations
from messaging.models import Delivery, State
from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE_BY_NAME = "topic_id IS NULL AND name ="  # broker.get_queue's lookup
SUBSCRIPTION_BY_NAME = 'INNER JOIN "messaging_topic"'  # broker.get_subscription's


def _remember(queue: Any) -> None:
    """What this process holds after reading `queue` just now (another process then changed it)."""
    destinations._recent_queues[queue.name] = (time.monotonic(), queue)


def test_a_receive_that_finds_messages_reads_no_queue_row(admin_api: Api, queue_factory: Callable[..., Any], publish):
    queue = queue_factory("remembered")
    publish(queue, "a", "b")
    assert len(admin_api.post("/queues/remembered/receive", {}).json()["messages"]) == 1  # reads and remembers
    with CaptureQueriesContext(connection) as queries:
        r = admin_api.post("/queues/remembered/receive", {})
    assert r.status_code == 200 and [m["body"] for m in r.json()["messages"]] == ["b"]
    assert not [q for q in queries if QUEUE_BY_NAME in q["sql"]]


def test_an_empty_receive_looks_the_queue_up_again(admin_api: Api, queue_factory: Callable[..., Any]):
    queue = queue_factory("gone")
    assert admin_api.post("/queues/gone/receive", {}).status_code == 200
    broker.delete_queue(queue=queue)
    _remember(queue)  # deleted by "another process": this one still holds the row
    r = admin_api.post("/queues/gone/receive", {"wait_seconds": 1})
    assert r.status_code == 404 and error_code(r) == "queue_not_found"


def test_an_empty_receive_of_a_queue_created_again_waits_on_the_new_one(
    admin_api: Api, queue_factory: Callable[..., Any], publish
):
    old = queue_factory("again")
    broker.delete_queue(queue=old)
    new = queue_factory("again")
    _remember(old)
    publish(new, "fresh")
    # The remembered row's queue has nothing (it is gone); the receive looks again and takes
    # the message from the queue created since.
    r = admin_api.post("/queues/again/receive", {})
    assert r.status_code == 200
    bodies = [m["body"] for m in r.json()["messages"]]
    assert bodies == ["fresh"]


def test_a_dead_letter_queue_deleted_elsewhere__the_receive_is_tried_again_on_a_fresh_row(
    admin_api: Api, queue_factory: Callable[..., Any], publish
):
    dlq = queue_factory("dlq-gone")
    source = queue_factory("source", max_deliveries=1, visibility_timeout_seconds=5, dead_letter_queue="dlq-gone")
    publish(source, "poison")
    assert len(admin_api.post("/queues/source/receive", {}).json()["messages"]) == 1
    clock.advance(6)  # the lease expired: the next receive must dead-letter the message first
    stale = broker.get_queue(name="source")
    assert stale.dead_letter_queue_id == dlq.pk
    broker.delete_queue(queue=dlq)  # the source queue now has no dead-letter queue
    _remember(stale)
    r = admin_api.post("/queues/source/receive", {})
    # The first try moved the message to the deleted queue and was refused at commit; the second,
    # on the fresh row, kept it here as dead, as a queue without a dead-letter queue does.
    assert r.status_code == 200 and r.json()["messages"] == []
    row = Delivery.objects.get(queue=source)
    assert row.state == State.DEAD and row.dead_letter_reason


def test_an_empty_subscription_receive_looks_the_subscription_up_once(admin_api: Api):
    """Subscriptions are not remembered, so there is nothing to look up again afresh."""
    topic, _ = broker.create_topic(name="news")
    broker.create_subscription(topic=topic, name="s")
    with CaptureQueriesContext(connection) as queries:
        r = admin_api.post("/topics/news/subscriptions/s/receive", {})
    assert r.status_code == 200 and r.json()["messages"] == []
    assert len([q for q in queries if SUBSCRIPTION_BY_NAME in q["sql"]]) == 1
