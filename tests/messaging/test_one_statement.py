"""A plain publish on PostgreSQL is one statement, run as its own transaction (autocommit):
committed, WAL flushed, when the statement answers, without BEGIN and COMMIT round trips
(broker.common.one_statement, broker.publishing._transaction_for; docs/performance.md item 25).
Anything else a publish may do keeps its atomic() transaction."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from django.db import IntegrityError, OperationalError, connection

from messaging import broker, queries
from messaging.broker import bulk, publishing
from messaging.exceptions import PermissionDenied
from messaging.models import Message, Queue, TransientMessage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

IDLE = psycopg.pq.TransactionStatus.IDLE


def status_after(monkeypatch: Any, statement: str) -> list[Any]:
    """The connection's transaction status right after each call of bulk.`statement`: IDLE
    means the statement was its own transaction and has committed."""
    seen: list[Any] = []
    real = getattr(bulk, statement)

    def recorded(**kwargs: Any) -> Any:
        result = real(**kwargs)
        seen.append(connection.connection.info.transaction_status)
        return result

    monkeypatch.setattr(bulk, statement, recorded)
    return seen


@pytest.fixture
def after_insert(monkeypatch: Any) -> list[Any]:
    return status_after(monkeypatch, "insert_messages")


@pytest.fixture
def after_ack(monkeypatch: Any) -> list[Any]:
    return status_after(monkeypatch, "ack")


def committed_bodies(model: Any = Message) -> list[str]:
    """What another connection sees (this thread's connection is not it)."""
    out: list[str] = []

    def read() -> None:
        try:
            out.extend(model.objects.order_by("id").values_list("body", flat=True))
        finally:
            connection.close()

    t = threading.Thread(target=read)
    t.start()
    t.join()
    return out


@pytest.mark.parametrize("durable", [True, False])
def test_a_plain_publish_commits_with_its_statement(queue_factory: Any, after_insert: list[Any], durable: bool):
    queue = queue_factory("q")
    messages = [broker.OutgoingMessage(body=str(i), durable=durable) for i in range(3)]
    results = broker.publish(queue=queue, messages=messages)
    assert after_insert == [IDLE]  # no transaction left open: committed by the statement
    assert [r.duplicate for r in results] == [False] * 3
    assert committed_bodies(Message if durable else TransientMessage) == ["0", "1", "2"]
    # The group-commit path: a round of one request runs the same way.
    request = broker.PublishRequest(queue=queue, messages=[broker.OutgoingMessage(body="3", durable=durable)])
    [outcome] = broker.publish_many(requests=[request])
    assert not isinstance(outcome, Exception) and after_insert == [IDLE, IDLE]


def test_a_topic_publish_to_many_subscriptions_is_one_statement_too(after_insert: list[Any]):
    topic, _ = broker.create_topic(name="t")
    for name in ("a", "b", "c"):
        broker.create_subscription(topic=topic, name=name)
    broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="x")])
    assert after_insert == [IDLE]
    assert [queries.queue_stats(q)["depth"] for q in Queue.objects.filter(topic=topic)] == [1, 1, 1]


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(
            [broker.OutgoingMessage(body="x"), broker.OutgoingMessage(body="y", durable=False)], id="both stores"
        ),
        pytest.param([broker.OutgoingMessage(body="x", dedup_id="d")], id="dedup id"),
    ],
)
def test_a_publish_of_more_than_one_statement_keeps_its_transaction(
    queue_factory: Any, after_insert: list[Any], messages: list[broker.OutgoingMessage], monkeypatch: Any
):
    queue = queue_factory("q")
    in_transaction: list[bool] = []
    real = publishing._publish_checked

    def recorded(request: Any) -> Any:
        in_transaction.append(connection.in_atomic_block)
        return real(request)

    monkeypatch.setattr(publishing, "_publish_checked", recorded)
    broker.publish(queue=queue, messages=messages)
    assert in_transaction == [True]  # atomic(), not one_statement()
    # The both-stores publish inserts twice inside one transaction (the dedup one takes the
    # ORM path and never calls insert_messages).
    assert all(status != IDLE for status in after_insert)
    assert len(committed_bodies(Message)) == 1


def test_a_publish_in_a_messaging_transaction_stays_staged(queue_factory: Any, after_insert: list[Any]):
    queue = queue_factory("q")
    txn = broker.begin()
    broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="x")], transaction_id=txn.id)
    assert after_insert and all(status != IDLE for status in after_insert)
    assert queries.queue_stats(queue)["depth"] == 0
    broker.rollback(transaction_id=txn.id)
    assert queries.queue_stats(queue)["depth"] == 0 and committed_bodies(Message) == []


def test_a_statement_that_fails_at_its_commit_leaves_nothing(queue_factory: Any):
    """The queue's foreign key is checked when the statement commits (deferred): a publish to
    a queue deleted meanwhile fails there, and its message row, inserted by the same
    statement, is gone with it."""
    queue = queue_factory("q")
    Queue.objects.filter(pk=queue.pk).delete()
    with pytest.raises(IntegrityError):
        broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="x")])
    assert committed_bodies(Message) == []
    # The connection is usable at once: nothing was left open.
    assert connection.connection.info.transaction_status == IDLE


def _requests(queue: Any, *bodies: str) -> list[broker.PublishRequest]:
    return [broker.PublishRequest(queue=queue, messages=[broker.OutgoingMessage(body=b)]) for b in bodies]


def test_a_round_to_one_destination_is_one_statement(queue_factory: Any, after_insert: list[Any]):
    queue = queue_factory("q")
    outcomes = broker.publish_many(requests=_requests(queue, "a", "b", "c"))
    assert after_insert == [IDLE]  # merged into one statement, its own transaction
    assert [len(o) for o in outcomes] == [1, 1, 1]  # type: ignore[arg-type]
    assert committed_bodies(Message) == ["a", "b", "c"]
    # Two destinations: two statements, one transaction.
    other = queue_factory("other")
    broker.publish_many(requests=[*_requests(queue, "d"), *_requests(other, "e")])
    assert after_insert[1:] and all(status != IDLE for status in after_insert[1:])


def test_a_round_refused_by_the_server_is_retried_request_by_request(queue_factory: Any):
    """The server refused the statement, so nothing was written: each request is tried alone
    (here each fails the same way: its queue was deleted after it was looked up)."""
    queue = queue_factory("q")
    Queue.objects.filter(pk=queue.pk).delete()
    outcomes = broker.publish_many(requests=_requests(queue, "a", "b"))
    assert all(isinstance(o, IntegrityError) for o in outcomes), outcomes
    assert committed_bodies(Message) == []


def test_a_round_whose_connection_failed_under_it_is_not_retried(queue_factory: Any, monkeypatch: Any):
    """A statement that may have committed (the connection failed: here, after it did) must not
    be run again: that would store every message twice. Each request gets the error."""
    queue = queue_factory("q")
    real = bulk.insert_messages

    def committed_then_lost(**kwargs: Any) -> Any:
        real(**kwargs)
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(bulk, "insert_messages", committed_then_lost)
    outcomes = broker.publish_many(requests=_requests(queue, "a", "b"))
    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes
    assert committed_bodies(Message) == ["a", "b"]  # once each


def test_a_plain_ack_commits_with_its_statement(queue_factory: Any, after_ack: list[Any]):
    queue = queue_factory("q")
    broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=b) for b in "ab"])
    received = broker.receive(queue=queue, max_messages=2)
    assert broker.ack(receipts=[m.receipt for m in received]) == ["ok", "ok"]
    assert broker.ack(receipts=[received[0].receipt], authorize=broker.ANY_QUEUE) == ["ok"]  # a repeat
    assert after_ack == [IDLE, IDLE]
    assert queries.queue_stats(queue)["in_flight"] == 0 and broker.receive(queue=queue) == []


def test_an_ack_to_authorize_or_of_both_stores_keeps_its_transaction(queue_factory: Any, after_ack: list[Any]):
    """The queues' check comes after the ack statement: a refusal must undo it."""
    queue = queue_factory("q")
    broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="a")])
    broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="b", durable=False)])
    durable, transient = broker.receive(queue=queue, max_messages=2)
    with pytest.raises(PermissionDenied):
        broker.ack(receipts=[durable.receipt], authorize=lambda q: False)
    assert queries.queue_stats(queue)["in_flight"] == 2
    assert broker.ack(receipts=[durable.receipt, transient.receipt]) == ["ok", "ok"]
    assert after_ack and all(status != IDLE for status in after_ack)
    assert queries.queue_stats(queue)["in_flight"] == 0
