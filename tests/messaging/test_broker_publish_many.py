"""broker.publish_many: several publishes, one transaction, one outcome each (group commit)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError

from messaging import broker
from messaging.broker import publishing
from messaging.exceptions import InvalidRequest, MessageTooLarge, TransactionNotFound
from messaging.models import Delivery, Message

pytestmark = pytest.mark.django_db


def _ok(outcomes: list[list[broker.PublishResult] | Exception]) -> list[list[broker.PublishResult]]:
    """The outcomes of a round in which every request succeeded."""
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    return [o for o in outcomes if not isinstance(o, Exception)]


def _req(queue, *bodies, **options):
    return broker.PublishRequest(queue=queue, messages=[broker.OutgoingMessage(body=b, **options) for b in bodies])


def test_publish_many__each_request_gets_its_own_results_in_order(queue_factory):
    a, b = queue_factory(), queue_factory()
    outcomes = _ok(broker.publish_many(requests=[_req(a, "1", "2"), _req(b, "3"), _req(a, "4")]))
    assert [len(o) for o in outcomes] == [2, 1, 1]
    ids = [r.id for o in outcomes for r in o]
    bodies = dict(Message.objects.values_list("id", "body"))
    assert [bodies[int(i)] for i in ids] == ["1", "2", "3", "4"]
    assert Delivery.objects.filter(queue=a).count() == 3 and Delivery.objects.filter(queue=b).count() == 1


def test_publish_many__an_invalid_request_fails_alone(queue_factory):
    q = queue_factory(max_message_bytes=5)
    outcomes = broker.publish_many(requests=[_req(q, "ok"), _req(q, "too large"), broker.PublishRequest(messages=[])])
    assert isinstance(outcomes[1], MessageTooLarge) and isinstance(outcomes[2], InvalidRequest)
    assert [r.duplicate for r in _ok(outcomes[:1])[0]] == [False]
    assert list(Message.objects.values_list("body", flat=True)) == ["ok"]


def test_publish_many__dedup_across_requests_of_one_round(queue_factory):
    q = queue_factory()
    first, second = _ok(broker.publish_many(requests=[_req(q, "a", dedup_id="k"), _req(q, "b", dedup_id="k")]))
    assert first[0].duplicate is False
    assert second[0].duplicate is True and second[0].id == first[0].id
    assert Message.objects.count() == 1


def test_publish_many__failure_before_commit_retries_each_alone(queue_factory, monkeypatch):
    """If the shared transaction fails, nothing of it is kept and each request is tried alone:
    the good ones succeed once, the bad one gets its own error."""
    q, bad = queue_factory(), queue_factory()
    real = publishing._publish_checked

    def flaky(request):
        if request.queue == bad:
            raise DatabaseError("boom")
        return real(request)

    monkeypatch.setattr(publishing, "_publish_checked", flaky)
    outcomes = broker.publish_many(requests=[_req(q, "1"), _req(bad, "2"), _req(q, "3")])
    assert isinstance(outcomes[1], DatabaseError)
    assert sorted(Message.objects.values_list("body", flat=True)) == ["1", "3"]
    assert [len(o) for o in _ok([outcomes[0], outcomes[2]])] == [1, 1]


def test_publish_many__transactional_requests_run_alone(queue_factory, alice):
    q = queue_factory()
    txn = broker.begin(user=alice)
    outcomes = broker.publish_many(
        requests=[
            broker.PublishRequest(
                queue=q, messages=[broker.OutgoingMessage(body="t")], transaction_id=txn.id, user=alice
            ),
            broker.PublishRequest(
                queue=q, messages=[broker.OutgoingMessage(body="x")], transaction_id="nope", user=alice
            ),
            _req(q, "plain"),
        ]
    )
    assert isinstance(outcomes[1], TransactionNotFound)
    assert [len(o) for o in _ok([outcomes[0], outcomes[2]])] == [1, 1]
    assert Delivery.objects.filter(transaction_id=txn.id).count() == 1
