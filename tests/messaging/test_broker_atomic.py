"""A broker operation that returns has committed: a transaction doomed by a failure caught inside
it raises instead of ending in Django's silent rollback (messaging/broker/common.py `atomic`).

Found by the PostgreSQL restart fault test: pg_terminate_backend killed a publish round's
connection during the hand-off claim (messaging/push.py); the hand-off caught the error, its
savepoint could not be rolled back, Django rolled the whole round back without an exception,
and the publish was answered 201 though nothing was stored.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connection, transaction

from messaging import broker, push
from messaging.broker import bulk
from messaging.broker.common import atomic
from messaging.models import Delivery, Message
from tests.threads import in_thread, recording_pusher, until

pytestmark = pytest.mark.django_db(transaction=True)


def _swallowed_doomed_failure() -> None:
    """What the hand-off did: catch a failure that left the transaction unusable."""
    try:
        with transaction.atomic(savepoint=False):  # like a savepoint that could not be rolled back
            raise DatabaseError("the connection died")
    except DatabaseError:
        pass


def test_atomic__raises_instead_of_rolling_back_in_silence(queue_factory: Any):
    queue = queue_factory("q")
    with pytest.raises(OperationalError), atomic():
        Message.objects.create(body="x", destination="queue:q", published_at=queue.created_at)
        _swallowed_doomed_failure()
    assert not Message.objects.exists()


def test_atomic__commits_as_usual_and_keeps_a_rolled_back_savepoint_harmless(queue_factory: Any):
    queue = queue_factory("q")
    with atomic():
        Message.objects.create(body="kept", destination="queue:q", published_at=queue.created_at)
        with contextlib.suppress(DatabaseError), transaction.atomic():  # a savepoint, rolled back fine
            Message.objects.create(body="dropped", destination="queue:q", published_at=queue.created_at)
            raise DatabaseError("only this part fails")
    assert list(Message.objects.values_list("body", flat=True)) == ["kept"]


def test_publish__a_doomed_transaction_is_an_error_not_a_confirmation(queue_factory: Any, monkeypatch: Any):
    queue = queue_factory("q")

    def doomed_hand_off(queue_ids: Sequence[int]) -> set[Any]:
        _swallowed_doomed_failure()
        return set()

    monkeypatch.setattr(push, "hand_off", doomed_hand_off)  # events.notify_on_commit calls it
    # A dedup id: the publish runs in atomic() (a plain one is a statement of its own on
    # PostgreSQL, committed before any hand-off: tests/messaging/test_one_statement.py).
    with pytest.raises(OperationalError):
        broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="x", dedup_id="d")])
    assert not Delivery.objects.exists()
    # The group-commit path answers each publish of the round with the error, too.
    message = broker.OutgoingMessage(body="y", dedup_id="e")
    request = broker.PublishRequest(queue=queue, topic=None, messages=[message], user=None)
    outcomes = broker.publish_many(requests=[request, request])
    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes
    assert not Delivery.objects.exists()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("where", "dedup_id"),
    [
        # A dedup id takes the ORM path, whose commit hands off with a claim in a savepoint.
        pytest.param("claim", "d1", id="hand-off claim"),
        # A plain publish on PostgreSQL leases to the pusher in its insert (_LeasePlan).
        pytest.param("insert_messages", None, id="lease at insert"),
    ],
)
async def test_push__connection_killed_while_serving_a_pusher_fails_the_publish_and_frees_it(
    queue_factory: Any, monkeypatch: Any, where: str, dedup_id: str | None
):
    """The real thing: a waiting pusher, and the publish's own backend terminated while the
    publish serves it (bulk.claim or bulk.insert_messages). The publish must raise, nothing be
    stored or pushed, and the pusher be free to take the next publish."""
    queue = await in_thread(queue_factory)("handoff")
    pusher, pushed = recording_pusher(queue)
    publisher: list[threading.Thread] = []
    real = getattr(bulk, where)

    def killed_on_the_publisher(**kwargs: Any) -> Any:
        if publisher and threading.current_thread() is publisher[0]:
            if where == "insert_messages":
                assert kwargs["lease"] is not None and kwargs["lease"].rows  # it was leasing
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return real(**kwargs)

    monkeypatch.setattr(bulk, where, killed_on_the_publisher)
    try:
        await until(lambda: queue.pk in push._TAKEABLE)

        def publish() -> Any:
            publisher.append(threading.current_thread())
            never = broker.OutgoingMessage(body="never confirmed", dedup_id=dedup_id)
            return broker.publish(queue=queue, messages=[never])

        with pytest.raises(DatabaseError):
            await in_thread(publish)()
        publisher.clear()  # executor threads are reused: kill no more
        assert not await in_thread(Delivery.objects.exists)()
        await until(lambda: queue.pk in push._TAKEABLE)  # settled: takeable again
        assert pushed == []
        published = await in_thread(broker.publish)(queue=queue, messages=[broker.OutgoingMessage(body="kept")])
        await until(lambda: bool(pushed))
        assert [m.id for m in pushed] == [published[0].id]
    finally:
        await pusher.stop()
        with contextlib.suppress(Exception):
            await in_thread(broker.nack)(receipts=list(pusher.unacked))
