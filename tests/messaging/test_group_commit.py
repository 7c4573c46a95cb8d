"""messaging.group_commit: concurrent publishes share database rounds, each keeps its outcome."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async

from messaging import broker, group_commit
from messaging.exceptions import MessageTooLarge, QueueNotFound
from messaging.models import Message

pytestmark = pytest.mark.django_db(transaction=True)


def _msgs(*bodies):
    return [broker.OutgoingMessage(body=b) for b in bodies]


def _request(queue, body):
    return lambda: broker.PublishRequest(queue=queue, messages=_msgs(body))


def _refused():
    return broker.PublishRequest(queue=broker.get_queue(name="no-such-queue"), messages=_msgs("x"))


async def test_publish__concurrent_publishes_are_grouped_and_all_answered(monkeypatch):
    queue, _ = await database_sync_to_async(broker.create_queue)(name="gc")
    rounds = []
    real = broker.publish_many

    def counting(*, requests):
        rounds.append(len(requests))
        return real(requests=requests)

    monkeypatch.setattr(broker, "publish_many", counting)
    results = await asyncio.gather(*(group_commit.publish(_request(queue, str(i)), size=1) for i in range(20)))
    assert sorted(r[0].id for r in results) == sorted({r[0].id for r in results})  # 20 distinct ids
    assert sum(rounds) == 20 and len(rounds) < 20  # the first goes alone, the rest wait and go together
    bodies = await database_sync_to_async(lambda: sorted(Message.objects.values_list("body", flat=True)))()
    assert bodies == sorted(str(i) for i in range(20))


async def test_publish__an_error_reaches_only_its_own_caller():
    queue, _ = await database_sync_to_async(broker.create_queue)(
        name="gc-small", settings=broker.QueueSettings(max_message_bytes=3)
    )
    outcomes = await asyncio.gather(
        group_commit.publish(_request(queue, "ok"), size=1),
        group_commit.publish(_request(queue, "too big"), size=1),
        group_commit.publish(_refused, size=1),
        group_commit.publish(_request(queue, "ok2"), size=1),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], MessageTooLarge) and isinstance(outcomes[2], QueueNotFound)
    assert not isinstance(outcomes[0], Exception) and not isinstance(outcomes[3], Exception)


def test_take_round__caps_the_messages_per_round():
    committer = group_commit.GroupCommitter()
    committer._pending = [group_commit._Pending(_refused, 3000, None) for _ in range(3)]  # type: ignore[arg-type]
    assert len(committer._take_round()) == 1
    assert len(committer._pending) == 2
