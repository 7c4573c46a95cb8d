"""messaging.group_commit: concurrent publishes share database rounds, each keeps its outcome."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async

from messaging import broker, group_commit
from messaging.access import Kind
from messaging.exceptions import MessageTooLarge, PermissionDenied, QueueNotFound
from messaging.models import Message

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=[False, True], ids=["hop", "own-thread"], autouse=True)
def _round_thread(request, monkeypatch):
    """Both ways a round can run: the thread-sensitive hop (tests) and its own thread (servers)."""
    monkeypatch.setattr(group_commit, "OWN_THREAD", request.param)


def _msgs(*bodies):
    return [broker.OutgoingMessage(body=b) for b in bodies]


def _publish(name, body, user=None):
    return group_commit.publish(user=user, kind=Kind.QUEUE, name=name, messages=_msgs(body))


@pytest.fixture
def admin(django_user_model):
    return django_user_model.objects.create_user("gc-admin", is_superuser=True)


@pytest.fixture
def outsider(django_user_model):
    return django_user_model.objects.create_user("gc-outsider")


async def test_publish__concurrent_publishes_are_grouped_and_all_answered(monkeypatch, admin):
    await database_sync_to_async(broker.create_queue)(name="gc")
    rounds = []
    real = broker.publish_many

    def counting(*, requests):
        rounds.append(len(requests))
        return real(requests=requests)

    monkeypatch.setattr(broker, "publish_many", counting)
    results = await asyncio.gather(*(_publish("gc", str(i), admin) for i in range(20)))
    assert sorted(r[0].id for r in results) == sorted({r[0].id for r in results})  # 20 distinct ids
    assert sum(rounds) == 20 and len(rounds) < 20  # the first goes alone, the rest wait and go together
    bodies = await database_sync_to_async(lambda: sorted(Message.objects.values_list("body", flat=True)))()
    assert bodies == sorted(str(i) for i in range(20))


async def test_publish__an_error_reaches_only_its_own_caller(admin, outsider):
    await database_sync_to_async(broker.create_queue)(
        name="gc-small", settings=broker.QueueSettings(max_message_bytes=3)
    )
    outcomes = await asyncio.gather(
        _publish("gc-small", "ok", admin),
        _publish("gc-small", "too big", admin),
        _publish("no-such-queue", "x", admin),
        _publish("gc-small", "ok2", admin),
        _publish("gc-small", "not allowed", outsider),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], MessageTooLarge) and isinstance(outcomes[2], QueueNotFound)
    assert isinstance(outcomes[4], PermissionDenied)
    assert not isinstance(outcomes[0], Exception) and not isinstance(outcomes[3], Exception)


def test_take_round__caps_the_messages_per_round():
    committer = group_commit.GroupCommitter()
    big = group_commit.Publish(user=None, kind=Kind.QUEUE, name="q", messages=_msgs(*["x"] * 3000))
    committer._pending = [group_commit._Pending(big, None) for _ in range(3)]  # type: ignore[arg-type]
    assert len(committer._take_round(unordered_only=False)) == 1
    assert len(committer._pending) == 2


def _pending(name: str, *, ordered: bool, size: int = 1) -> Any:
    publish = group_commit.Publish(
        user=None, kind=Kind.QUEUE, name=name, messages=_msgs(*["x"] * size), ordered=ordered
    )
    return group_commit._Pending(publish, None)  # type: ignore[arg-type]


def test_take_round__beside_an_ordered_round_only_unordered_publishes_go():
    committer = group_commit.GroupCommitter()
    committer._pending = [_pending("a1", ordered=True), _pending("r1", ordered=False), _pending("a2", ordered=True)]
    assert [p.publish.name for p in committer._take_round(unordered_only=True)] == ["r1"]
    assert [p.publish.name for p in committer._pending] == ["a1", "a2"]  # still in their order


def test_take_round__a_full_round_leaves_the_rest_in_order():
    committer = group_commit.GroupCommitter()
    committer._pending = [
        _pending("a1", ordered=True, size=4000),
        _pending("a2", ordered=True, size=2000),
        _pending("a3", ordered=True),
    ]
    assert [p.publish.name for p in committer._take_round(unordered_only=False)] == ["a1"]
    assert [p.publish.name for p in committer._pending] == ["a2", "a3"]  # a3 would fit, but waits for a2


async def test_rounds__ordered_publishes_never_overlap(monkeypatch, admin):
    """Up to MAX_ROUNDS_IN_FLIGHT rounds run at once, but never two holding ordered publishes."""
    monkeypatch.setattr(group_commit, "MAX_ROUNDS_IN_FLIGHT", 2)  # the default is 1; 2 may be set
    running: list[bool] = []
    overlaps: list[int] = []
    in_flight: list[int] = []

    async def fake_commit(self: Any, round_: list[Any]) -> None:
        ordered = any(p.publish.ordered for p in round_)
        running.append(ordered)
        overlaps.append(sum(running))
        in_flight.append(len(running))
        await asyncio.sleep(0.01)
        running.remove(ordered)
        for p in round_:
            p.future.set_result([])

    monkeypatch.setattr(group_commit.GroupCommitter, "_commit", fake_commit)
    committer = group_commit.GroupCommitter()
    publishes = [
        group_commit.Publish(user=admin, kind=Kind.QUEUE, name="q", messages=_msgs("x"), ordered=i % 2 == 0)
        for i in range(40)
    ]
    await asyncio.gather(*(committer.publish(p) for p in publishes))
    assert max(overlaps) <= 1  # at most one round with ordered publishes at any moment
    assert max(in_flight) == group_commit.MAX_ROUNDS_IN_FLIGHT  # but rounds did run side by side


async def test_publish__a_caller_that_goes_away_does_not_stop_its_round(monkeypatch, admin):
    """A publisher cancelled while its round is in flight: the round still commits, its own
    message included, and the publish after it is answered."""
    await database_sync_to_async(broker.create_queue)(name="gc-gone")
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    real = broker.publish_many

    def slow(*, requests):
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)  # the round is in the database while its caller goes away
        return real(requests=requests)

    monkeypatch.setattr(broker, "publish_many", slow)
    gone = asyncio.ensure_future(_publish("gc-gone", "gone", admin))
    await started.wait()
    stays = asyncio.ensure_future(_publish("gc-gone", "stays", admin))  # the next round
    gone.cancel()
    assert isinstance((await asyncio.gather(gone, return_exceptions=True))[0], asyncio.CancelledError)
    assert len(await stays) == 1
    bodies = await database_sync_to_async(lambda: sorted(Message.objects.values_list("body", flat=True)))()
    assert bodies == ["gone", "stays"]
