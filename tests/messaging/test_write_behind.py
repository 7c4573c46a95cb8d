"""messaging.write_behind: non-durable publishes answered from memory, written just behind.

PostgreSQL only (the writer needs ids taken in advance from the UNLOGGED store's sequence). Each
test gets a writer of its own, with a real thread and real commits (transaction=True), as in a
server; the test process otherwise runs with the writer off (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError, connection

from messaging import broker, group_commit, longpoll, write_behind
from messaging.access import Kind
from messaging.exceptions import MessageTooLarge, PermissionDenied
from messaging.models import Queue, TransientDelivery, TransientMessage

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the writer runs on PostgreSQL only"),
]


@pytest.fixture(autouse=True)
def writer(monkeypatch: Any) -> Iterator[write_behind.WriteBehind]:
    monkeypatch.setattr(group_commit, "OWN_THREAD", True)  # as in a server
    monkeypatch.setattr(write_behind, "ENABLED", True)
    writer = write_behind.WriteBehind()
    monkeypatch.setattr(write_behind, "WRITER", writer)
    yield writer
    writer.close()


@pytest.fixture
def admin(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("wb-admin", is_superuser=True)


def _msgs(*bodies: str, **fields: Any) -> list[broker.OutgoingMessage]:
    return [broker.OutgoingMessage(body=b, durable=False, **fields) for b in bodies]


async def _publish(user: Any, name: str, *bodies: str, kind: Kind = Kind.QUEUE, **fields: Any) -> list[str]:
    results = await group_commit.publish(user=user, kind=kind, name=name, messages=_msgs(*bodies, **fields))
    return [r.id for r in results]


async def _stored(name: str | None = None) -> list[tuple[str, str]]:
    """(public id, body) of every non-durable message in the database (to queue `name`)."""

    def read() -> list[tuple[str, str]]:
        rows = TransientDelivery.objects.order_by("message_id")
        if name is not None:
            rows = rows.filter(queue__name=name)
        return [(f"t{m}", b) for m, b in rows.values_list("message_id", "message__body")]

    stored: list[tuple[str, str]] = await database_sync_to_async(read)()
    return stored


async def _create_queue(name: str, **settings: Any) -> Queue:
    create = database_sync_to_async(broker.create_queue)
    queue: Queue = (await create(name=name, settings=broker.QueueSettings(**settings)))[0]
    return queue


async def _warm(writer: write_behind.WriteBehind, user: Any, name: str, kind: Kind = Kind.QUEUE) -> None:
    """One publish that waits for its round: afterwards the same user's publishes to `name`
    are answered early (its access check is cached and the writer holds ids)."""
    await _publish(user, name, "warm-up", kind=kind)
    assert await database_sync_to_async(writer.flush)(5)


def _held_back(monkeypatch: Any) -> threading.Event:
    """The writer's rounds wait for the returned event to be set (for at most 10 s)."""
    gate = threading.Event()
    real = group_commit.run_round

    def held(publishes: Any, allowed: Any = None) -> Any:
        gate.wait(10)
        return real(publishes, allowed)

    monkeypatch.setattr(group_commit, "run_round", held)
    return gate


# ----------------------------------------------------------------- which publishes it takes


def test_takes__only_publishes_of_non_durable_messages():
    assert write_behind.takes(_msgs("a", "b"))
    assert not write_behind.takes([broker.OutgoingMessage(body="a")])  # durable
    assert not write_behind.takes([*_msgs("a"), broker.OutgoingMessage(body="b")])  # mixed: the durable way
    assert not write_behind.takes([])


def test_takes__not_when_switched_off(monkeypatch: Any):
    monkeypatch.setattr(write_behind, "ENABLED", False)
    assert not write_behind.takes(_msgs("a"))
    monkeypatch.setattr(write_behind, "ENABLED", True)
    monkeypatch.setattr(group_commit, "OWN_THREAD", False)  # the test process's own rounds
    assert not write_behind.takes(_msgs("a"))


# ----------------------------------------------------------------- answered early, written behind


async def test_publish__the_first_waits_for_its_round_later_ones_are_answered_before_they_are_written(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    await _create_queue("wb")
    first = await _publish(admin, "wb", "one")
    assert await _stored("wb") == [(first[0], "one")]  # not early: written when answered
    assert await database_sync_to_async(writer.flush)(5)

    gate = _held_back(monkeypatch)
    early = await _publish(admin, "wb", "two", "three")  # answered while the writer is held
    assert [i.startswith("t") for i in early] == [True, True] and len(set(early)) == 2
    assert await _stored("wb") == [(first[0], "one")]  # not written yet
    gate.set()
    await writer.caught_up()
    assert await _stored("wb") == [(first[0], "one"), (early[0], "two"), (early[1], "three")]  # under the ids answered


async def test_receive__in_this_process_sees_every_publish_answered_before_it(
    writer: write_behind.WriteBehind, admin: Any
):
    queue = await _create_queue("wb-read")
    await _warm(writer, admin, "wb-read")
    ids = [i for n in range(20) for i in await _publish(admin, "wb-read", f"m{n}")]
    _, received = await longpoll.receive_from(lambda recent_ok: queue, max_messages=100)
    assert [m.body for m in received] == ["warm-up", *[f"m{n}" for n in range(20)]]  # all there, in order
    assert [m.id for m in received[1:]] == ids


async def test_receive__waits_only_for_publishes_to_what_it_receives_from(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    busy, quiet = await _create_queue("wb-busy"), await _create_queue("wb-quiet")
    await _warm(writer, admin, "wb-busy")
    gate = _held_back(monkeypatch)
    await _publish(admin, "wb-busy", "pending")  # answered; its round is held back
    _, received = await asyncio.wait_for(
        longpoll.receive_from(lambda recent_ok: quiet, published_to=(Kind.QUEUE, "wb-quiet")), 2
    )  # not held up by wb-busy's backlog
    assert received == []
    waiting = asyncio.ensure_future(longpoll.receive_from(lambda recent_ok: busy, published_to=(Kind.QUEUE, "wb-busy")))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # waits for "pending" to be written
    gate.set()
    _, received = await asyncio.wait_for(waiting, 5)
    assert [m.body for m in received] == ["warm-up"]  # the oldest first; "pending" is there too


async def test_publish__keeps_the_order_of_publishes_whether_answered_early_or_not(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    queue = await _create_queue("wb-order")
    monkeypatch.setattr(write_behind, "MAX_BEHIND", 25)  # some are answered early, the rest wait
    bodies = [f"b{n}" for n in range(60)]
    await asyncio.gather(*(_publish(admin, "wb-order", body) for body in bodies))
    _, received = await longpoll.receive_from(lambda recent_ok: queue, max_messages=100)
    assert [m.body for m in received] == bodies


async def test_publish__a_later_publish_never_gets_a_smaller_id_than_one_still_waiting_for_ids(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    """Consumers get messages of one priority in id order, so ids must follow arrival order:
    while a publish waits for the writer to number it, later ones wait too, even if the reserve
    could number them now."""
    queue = await _create_queue("wb-ids")
    await _warm(writer, admin, "wb-ids")
    with writer._lock:  # one id left: too few for the first publish, enough for the second
        left = writer._ids.popleft()
        writer._ids.clear()
        writer._ids.append(left)
    gate = _held_back(monkeypatch)
    first = asyncio.ensure_future(_publish(admin, "wb-ids", "a1", "a2"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(_publish(admin, "wb-ids", "b"))
    await asyncio.sleep(0.05)
    gate.set()
    ids = [*await first, *await second]
    assert [int(i[1:]) for i in ids] == sorted(int(i[1:]) for i in ids)
    _, received = await longpoll.receive_from(lambda recent_ok: queue, max_messages=10)
    assert [m.body for m in received] == ["warm-up", "a1", "a2", "b"]


async def test_publish__to_a_topic_answered_early_reaches_every_subscription(
    writer: write_behind.WriteBehind, admin: Any
):
    topic, _ = await database_sync_to_async(broker.create_topic)(name="wb-topic")
    for name in ("s1", "s2"):
        await database_sync_to_async(broker.create_subscription)(topic=topic, name=name)
    await _warm(writer, admin, "wb-topic", kind=Kind.TOPIC)
    (message_id,) = await _publish(admin, "wb-topic", "news", kind=Kind.TOPIC)
    await writer.caught_up()
    copies = await database_sync_to_async(
        lambda: sorted(
            TransientDelivery.objects.filter(message_id=int(message_id[1:])).values_list("queue__name", flat=True)
        )
    )()
    assert copies == ["s1", "s2"]


# ----------------------------------------------------------------- what is never answered early


async def test_publish__with_dedup_ids_waits_for_the_database_s_answer(writer: write_behind.WriteBehind, admin: Any):
    await _create_queue("wb-dedup")
    await _warm(writer, admin, "wb-dedup")
    first = await _publish(admin, "wb-dedup", "x", dedup_id="k1")
    again = await group_commit.publish(user=admin, kind=Kind.QUEUE, name="wb-dedup", messages=_msgs("x", dedup_id="k1"))
    assert again == [broker.PublishResult(id=first[0], duplicate=True)]


async def test_publish__refused_access_is_answered_every_time(
    writer: write_behind.WriteBehind, admin: Any, django_user_model: Any
):
    await _create_queue("wb-private")
    outsider = await database_sync_to_async(django_user_model.objects.create_user)("wb-outsider")
    await _warm(writer, admin, "wb-private")  # the admin's access is cached, not the outsider's
    for _ in range(2):
        with pytest.raises(PermissionDenied):
            await _publish(outsider, "wb-private", "x")
    assert [body for _, body in await _stored("wb-private")] == ["warm-up"]


async def test_publish__a_bad_message_is_refused_even_when_it_could_be_answered_early(
    writer: write_behind.WriteBehind, admin: Any
):
    await _create_queue("wb-small", max_message_bytes=10)
    await _warm(writer, admin, "wb-small")
    with pytest.raises(MessageTooLarge):
        await _publish(admin, "wb-small", "far too long for this queue")
    assert writer._behind == 0


async def test_publish__past_max_behind_waits_for_the_writer(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    await _create_queue("wb-full")
    await _warm(writer, admin, "wb-full")
    monkeypatch.setattr(write_behind, "MAX_BEHIND", 3)
    ids = await _publish(admin, "wb-full", "a", "b", "c", "d")  # 4 > 3: answered once written
    assert [i for i, _ in await _stored("wb-full")][1:] == ids


async def test_publish__held_back_by_max_behind_is_answered_when_there_is_room_not_when_written(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    """Past MAX_BEHIND a publish waits only until the backlog shrinks, not for its own round:
    the writer then always has the next publishes queued."""
    await _create_queue("wb-room")
    await _warm(writer, admin, "wb-room")
    monkeypatch.setattr(write_behind, "MAX_BEHIND", 3)
    rounds = threading.Semaphore(0)  # each release lets one round of the writer run
    real = group_commit.run_round

    def one_at_a_time(publishes: Any, allowed: Any = None) -> Any:
        rounds.acquire(timeout=10)
        return real(publishes, allowed)

    monkeypatch.setattr(group_commit, "run_round", one_at_a_time)
    await _publish(admin, "wb-room", "a1", "a2")  # answered: 2 behind
    await asyncio.sleep(0.05)  # the writer takes it and waits for the semaphore
    held = asyncio.ensure_future(_publish(admin, "wb-room", "b1", "b2"))  # 2 + 2 > 3: waits for room
    await asyncio.sleep(0.05)
    assert not held.done()
    rounds.release()  # a is written: room for b, whose own round is still held back
    ids = await asyncio.wait_for(held, 5)
    assert [b for _, b in await _stored("wb-room")] == ["warm-up", "a1", "a2"]
    rounds.release()
    await writer.caught_up()
    assert (await _stored("wb-room"))[3:] == [(ids[0], "b1"), (ids[1], "b2")]


async def test_publish__the_id_reserve_lasts_a_publisher_through_a_round(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    """The writer tops the reserve up before a round only when it is below half. Half must cover
    what a publisher takes while that round is written (MAX_BEHIND answered early), or the
    publisher runs out of ids and waits for its own round (~150 ms at full speed)."""
    monkeypatch.setattr(write_behind, "MAX_BEHIND", 1000)
    monkeypatch.setattr(group_commit, "MAX_ROUND_MESSAGES", 100)
    await _create_queue("wb-ids")
    await _warm(writer, admin, "wb-ids")
    with writer._lock:  # the least a round can start with: exactly half (after "first"), so no top-up
        while len(writer._ids) > write_behind.id_reserve() // 2 + 1:
            writer._ids.pop()
    gate = _held_back(monkeypatch)
    try:
        await _publish(admin, "wb-ids", "first")
        await asyncio.sleep(0.05)  # the writer takes it and waits at the gate
        for n in range(9):  # 1 + 900 + 99 = MAX_BEHIND, all while that round is held
            await asyncio.wait_for(_publish(admin, "wb-ids", *(f"m{n}-{i}" for i in range(100))), 2)
        await asyncio.wait_for(_publish(admin, "wb-ids", *(f"last-{i}" for i in range(99))), 2)
    finally:
        gate.set()
    await writer.caught_up()
    assert len(await _stored("wb-ids")) == 1 + 1000


# ----------------------------------------------------------------- failures after an early answer


async def test_write__a_lost_connection_is_retried_until_written(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    await _create_queue("wb-retry")
    await _warm(writer, admin, "wb-retry")
    real = group_commit.run_round
    failures = [OperationalError("server closed the connection unexpectedly")] * 2

    def flaky(publishes: Any, allowed: Any = None) -> Any:
        if failures:
            raise failures.pop()
        return real(publishes, allowed)

    monkeypatch.setattr(group_commit, "run_round", flaky)
    ids = await _publish(admin, "wb-retry", "kept")
    await writer.caught_up()
    assert not failures  # both failures happened, and then:
    assert (await _stored("wb-retry"))[1:] == [(ids[0], "kept")]
    assert writer.dropped == 0


async def test_write__a_queue_deleted_after_the_answer_drops_the_messages_and_counts_them(
    writer: write_behind.WriteBehind, admin: Any, monkeypatch: Any
):
    queue = await _create_queue("wb-gone")
    await _warm(writer, admin, "wb-gone")
    gate = _held_back(monkeypatch)
    await _publish(admin, "wb-gone", "x", "y")  # answered: the queue was there a moment ago
    await database_sync_to_async(broker.delete_queue)(queue=queue)
    gate.set()
    await writer.caught_up()
    assert writer.dropped == 2
    assert not await database_sync_to_async(TransientMessage.objects.filter(body__in=["x", "y"]).exists)()


async def test_write__ids_taken_by_someone_else_are_replaced(writer: write_behind.WriteBehind, admin: Any):
    """Only after a PostgreSQL crash restarted the UNLOGGED sequence can an id held in advance
    already be taken: the message is then written under a fresh id, not lost."""
    await _create_queue("wb-collide")
    await _warm(writer, admin, "wb-collide")
    taken = writer._ids[0]
    await database_sync_to_async(TransientMessage.objects.create)(
        id=taken, body="squatter", destination="queue:elsewhere", published_at="2026-01-01T00:00:00Z"
    )
    await _publish(admin, "wb-collide", "mine")
    await writer.caught_up()
    stored = await _stored("wb-collide")
    assert [b for _, b in stored] == ["warm-up", "mine"] and stored[1][0] != f"t{taken}"
    assert writer.dropped == 0


async def test_flush__writes_everything_answered(writer: write_behind.WriteBehind, admin: Any):
    """What runs at exit (atexit): the messages answered are written before the process ends."""
    await _create_queue("wb-exit")
    await _warm(writer, admin, "wb-exit")
    ids = [i for n in range(10) for i in await _publish(admin, "wb-exit", f"e{n}")]
    assert await database_sync_to_async(writer.flush)(5)
    assert [i for i, _ in await _stored("wb-exit")][1:] == ids
