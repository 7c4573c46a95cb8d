"""Lease at insert (broker.publishing._LeasePlan, messaging/push.py take_waiting): a plain publish
on PostgreSQL leases its messages to a push consumer of this process waiting on the queue, in
the insert itself, and they are pushed when it commits, without a claim."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection

from messaging import broker, clock, push
from messaging.broker import bulk
from messaging.models import Delivery, State
from tests.threads import in_thread, recording_pusher, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


@contextlib.asynccontextmanager
async def waiting_pusher(queue: Any, **options: Any) -> Any:
    """A started pusher (recording_pusher's, or one with `options`), once it waits takeable."""
    if options:
        pushed: list[Any] = []

        async def deliver(_: Any, messages: Any) -> None:
            pushed.extend(messages)

        pusher = push.Pusher(key="s", queue=queue, deliver=deliver, recheck_seconds=30, **options)
        pusher.start()
    else:
        pusher, pushed = recording_pusher(queue)
    try:
        await until(lambda: queue.pk in push._TAKEABLE)
        yield pusher, pushed
    finally:
        await pusher.stop()
        with contextlib.suppress(Exception):
            await in_thread(broker.nack)(receipts=list(pusher.unacked))


@pytest.fixture
def claims(monkeypatch: Any) -> list[str]:
    """The threads' names of every bulk.claim from now on."""
    calls: list[str] = []
    real = bulk.claim

    def recorded(**kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        return real(**kwargs)

    monkeypatch.setattr(bulk, "claim", recorded)
    return calls


def closing(fn: Any) -> Any:
    """`fn`, closing its thread's database connection when it returns."""

    def run(*args: Any) -> None:
        try:
            fn(*args)
        finally:
            connection.close()

    return run


def publish(queue: Any, *messages: broker.OutgoingMessage) -> list[broker.PublishResult]:
    return broker.publish(queue=queue, messages=list(messages))


async def test_a_waiting_pusher_gets_a_publish_leased_by_its_insert_without_a_claim(queue_factory: Any, claims: Any):
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (pusher, pushed):
        claims.clear()
        before = clock.now()
        published = await in_thread(publish)(queue, broker.OutgoingMessage(body="x", headers={"k": "v"}))
        await until(lambda: bool(pushed))
        assert claims == []  # nobody claimed: the insert leased it
        [message] = pushed
        assert (message.id, message.body, message.headers) == (published[0].id, "x", {"k": "v"})
        assert (message.delivery_count, message.redelivered, message.destination) == (1, False, "lai")
        row = await in_thread(Delivery.objects.get)()
        assert (row.state, row.delivery_count) == (State.LEASED, 1)
        assert message.receipt == f"d{row.pk}.{row.lease_token}"
        vt = timedelta(seconds=queue.visibility_timeout_seconds)
        assert before + vt <= row.visible_at <= clock.now() + vt
        assert list(pusher.unacked) == [message.receipt]
        # An ordinary lease: acked with its receipt, never delivered again.
        assert await in_thread(broker.ack)(receipts=[message.receipt]) == [broker.ACK_OK]
        assert (await in_thread(Delivery.objects.get)()).state == State.ACKED
        # The pusher waits again and takes the next publish the same way.
        pusher.settled([message.receipt])
        await until(lambda: queue.pk in push._TAKEABLE)
        await in_thread(publish)(queue, broker.OutgoingMessage(body="y"))
        await until(lambda: len(pushed) == 2)
        assert claims == [] and pushed[1].body == "y"


async def test_it_leases_what_the_prefetch_leaves_room_for_in_claim_order(queue_factory: Any, claims: Any):
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (pusher, pushed):  # prefetch 10
        batch = [broker.OutgoingMessage(body=str(i), priority=9 if i in (3, 11) else 4) for i in range(12)]
        await in_thread(publish)(queue, *batch)
        await until(lambda: len(pushed) == 10)
        # Highest priority first, then publish order: what a claim would have chosen.
        assert [m.body for m in pushed] == ["3", "11", "0", "1", "2", "4", "5", "6", "7", "8"]
        states = dict(await in_thread(lambda: list(Delivery.objects.values_list("message__body", "state")))())
        assert {b for b, s in states.items() if s == State.READY} == {"9", "10"}
        # The room an ack makes is filled by a claim, which finds the two left behind.
        await in_thread(broker.ack)(receipts=[m.receipt for m in pushed])
        pusher.settled([m.receipt for m in pushed])
        await until(lambda: len(pushed) == 12)
        assert [m.body for m in pushed[10:]] == ["9", "10"]


@contextlib.contextmanager
def notifications() -> Any:
    """The payloads of every notification on events.CHANNEL while the block runs (and shortly
    after: PostgreSQL delivers them when the publishing transaction commits)."""
    import psycopg

    from messaging import events
    from messaging.listener import conninfo_for

    received: list[str] = []
    with psycopg.connect(conninfo_for(), autocommit=True) as listening:
        listening.execute(f"LISTEN {events.CHANNEL}")
        yield received
        time.sleep(0.2)
        received += [n.payload for n in listening.notifies(timeout=0.2)]


async def test_a_publish_leased_whole_at_insert_notifies_no_other_process(queue_factory: Any):
    """Deliveries leased at insert are nobody else's: other processes' consumers are told of a
    queue only when the publish leaves something ready in it."""
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (pusher, pushed):  # prefetch 10
        with notifications() as heard:
            await in_thread(publish)(queue, broker.OutgoingMessage(body="leased"))
            await until(lambda: len(pushed) == 1)
        assert heard == []
        await in_thread(broker.ack)(receipts=[pushed[0].receipt])
        pusher.settled([pushed[0].receipt])
        await until(lambda: queue.pk in push._TAKEABLE)
        with notifications() as heard:  # 10 leased, 2 left ready
            await in_thread(publish)(queue, *(broker.OutgoingMessage(body=str(i)) for i in range(12)))
            await until(lambda: len(pushed) == 11)
        assert heard == [str(queue.pk)]
    with notifications() as heard:  # nobody waiting: all ready
        await in_thread(publish)(queue, broker.OutgoingMessage(body="ready"))
    assert heard == [str(queue.pk)]


async def test_delayed_messages_paused_queues_and_filters_are_left_to_claims(queue_factory: Any, claims: Any):
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (_, pushed):
        later = broker.OutgoingMessage(body="later", delay_seconds=60)
        await in_thread(publish)(queue, later, broker.OutgoingMessage(body="now"))
        await until(lambda: bool(pushed))
        assert [m.body for m in pushed] == ["now"]
        delayed = await in_thread(Delivery.objects.get)(message__body="later")
        assert (delayed.state, delayed.delivery_count) == (State.READY, 0)

    paused = await in_thread(queue_factory)("paused")
    async with waiting_pusher(paused) as (_, pushed):
        await in_thread(broker.set_paused)(queue=paused, paused=True)
        paused.paused = True  # the publisher's view of the queue
        await in_thread(publish)(paused, broker.OutgoingMessage(body="held"))
        row = await in_thread(Delivery.objects.get)(message__body="held")
        assert row.state == State.READY and pushed == []

    topic, _ = await in_thread(broker.create_topic)(name="t")
    eu, _ = await in_thread(broker.create_subscription)(topic=topic, name="eu", filter={"region": "eu"})
    eu = await in_thread(broker.get_subscription)(topic=topic, name="eu")
    async with waiting_pusher(eu) as (_, pushed):
        messages = [broker.OutgoingMessage(body=r, headers={"region": r}) for r in ("us", "eu")]
        await in_thread(broker.publish)(topic=topic, messages=messages)
        await until(lambda: bool(pushed))
        assert [(m.body, m.destination) for m in pushed] == [("eu", "t/eu")]
        assert await in_thread(Delivery.objects.filter(queue=eu).count)() == 1


async def test_auto_acks_are_acked_soon_while_the_pusher_is_fed_by_leases(queue_factory: Any, claims: Any):
    """Leases at insert carry no acks: a pusher fed by them acks its auto-ack messages itself
    within ACK_DELAY_SECONDS, beside the publishes, and stays takeable."""
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue, prefetch=10, auto_ack=True) as (pusher, pushed):
        claims.clear()
        for i in range(30):  # three times the prefetch: without acks its room would run out
            await until(lambda: queue.pk in push._TAKEABLE)
            await in_thread(publish)(queue, broker.OutgoingMessage(body=str(i)))
            await until(functools.partial(lambda n: len(pushed) == n, i + 1))

        def all_acked() -> bool:
            return bool(Delivery.objects.filter(state=State.ACKED).count() == 30)

        for _ in range(300):  # acked by the pusher itself: no client ack, no claim carried them
            if await in_thread(all_acked)():
                break
            await asyncio.sleep(0.01)
        assert await in_thread(all_acked)()
        assert [m.body for m in pushed] == [str(i) for i in range(30)]
        assert pusher.unacked == {} or all(r in pusher._auto_acks for r in pusher.unacked)


async def test_a_stale_pusher_is_left_to_the_commits_claim(queue_factory: Any, claims: Any):
    """A pusher rung during its own claim waits "stale" (Pusher._wait): messages committed
    meanwhile are waiting for it. The next publish must not lease only its own messages to it
    (they would overtake those): its commit's hand-off claims, which takes the older first."""
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (pusher, pushed):
        claims.clear()
        with push._TAKEABLE_LOCK:
            pusher._stale = True
        await in_thread(publish)(queue, broker.OutgoingMessage(body="first"))
        await until(lambda: bool(pushed))
        assert [m.body for m in pushed] == ["first"]
        assert claims and not claims[0].startswith("pegasus-push")  # the publisher's hand-off claimed
        await until(lambda: queue.pk in push._TAKEABLE)
        assert not pusher._stale
        claims.clear()
        await in_thread(publish)(queue, broker.OutgoingMessage(body="second"))
        await until(lambda: len(pushed) == 2)
        assert claims == []  # no longer stale: leased at insert


async def test_a_pusher_rung_while_waiting_is_left_to_the_commits_claim(queue_factory: Any, claims: Any):
    """A commit rang the waiting pusher (its messages are ready) and the connection's next
    publish comes before the pusher wakes: leasing only the new messages would push them ahead
    of the rung ones (seen as a STOMP cumulative ack test failing under load). The commit's
    hand-off claims instead."""
    queue = await in_thread(queue_factory)("lai")
    async with waiting_pusher(queue) as (pusher, pushed):
        claims.clear()
        with push._TAKEABLE_LOCK:
            assert pusher._bell is not None
            pusher._bell._rung = True  # rung, and not yet awake
        await in_thread(publish)(queue, broker.OutgoingMessage(body="next"))
        await until(lambda: bool(pushed))
        assert [m.body for m in pushed] == ["next"]
        assert claims and not claims[0].startswith("pegasus-push")  # the publisher's hand-off claimed


async def test_an_expired_lease_on_the_queue_makes_the_pusher_look_and_return_it(queue_factory: Any, claims: Any):
    """A pusher fed by leases at insert never claims on its own, and only a claim returns an
    expired lease to the queue: the insert tells the pusher when its queue holds one."""
    queue = await in_thread(queue_factory)("lai")
    [first] = await in_thread(publish)(queue, broker.OutgoingMessage(body="first"))
    [held] = await in_thread(broker.receive)(queue=queue, max_messages=1)  # another consumer's lease
    async with waiting_pusher(queue) as (_, pushed):
        await in_thread(Delivery.objects.filter(state=State.LEASED).update)(
            visible_at=clock.now() - timedelta(seconds=1)
        )
        [second] = await in_thread(publish)(queue, broker.OutgoingMessage(body="second"))
        await until(lambda: len(pushed) == 2)
        assert [(m.id, m.delivery_count, m.redelivered) for m in pushed] == [(second.id, 1, False), (first.id, 2, True)]
        assert held.receipt != pushed[1].receipt


async def test_concurrent_publishers_and_competing_consumers_get_each_message_exactly_once(
    queue_factory: Any, monkeypatch: Any
):
    """Several publishers on their own connections, two pushers of this process and a REST-style
    consumer competing for one queue: every message is delivered once and acked, none is lost,
    and no pusher ever holds more than its prefetch."""
    leases: list[int] = []  # pushers taken by a publish's insert
    real_take = push.take_waiting

    def counted(queue_ids: Any) -> Any:
        taken = real_take(queue_ids)
        leases.append(len(taken))
        return taken

    monkeypatch.setattr(push, "take_waiting", counted)
    queue = await in_thread(queue_factory)("lai")
    prefetch, publishers, each = 2, 4, 40
    delivered: list[str] = []
    over_prefetch: list[int] = []
    pushers: list[push.Pusher] = []
    acking: set[asyncio.Task[None]] = set()

    def ack_and_settle(pusher: push.Pusher, messages: Any) -> None:
        async def ack() -> None:
            receipts = [m.receipt for m in messages]
            assert await in_thread(broker.ack)(receipts=receipts) == [broker.ACK_OK] * len(receipts)
            pusher.settled(receipts)

        task = asyncio.ensure_future(ack())
        acking.add(task)
        task.add_done_callback(acking.discard)

    for n in range(2):

        async def deliver(pusher: push.Pusher, messages: Any) -> None:
            if len(pusher.unacked) > prefetch:
                over_prefetch.append(len(pusher.unacked))
            delivered.extend(m.body for m in messages)
            ack_and_settle(pusher, messages)

        pusher = push.Pusher(
            key=f"s{n}", queue=queue, prefetch=prefetch, auto_ack=False, deliver=deliver, recheck_seconds=1
        )
        pusher.start()
        pushers.append(pusher)
    done = threading.Event()

    def publish_all(p: int) -> None:
        i = 0
        while i < each:  # batches of 1 to 4: a lease must also respect a room smaller than a batch
            size = min(i % 4 + 1, each - i)
            publish(queue, *[broker.OutgoingMessage(body=f"{p}-{j}") for j in range(i, i + size)])
            i += size
            time.sleep(0.06)  # slower than the consumers: they wait, and publishes lease to them

    received: list[str] = []

    def receive_until_done() -> None:
        while not done.is_set():
            messages = broker.receive(queue=queue, max_messages=2)
            if messages:
                assert broker.ack(receipts=[m.receipt for m in messages]) == [broker.ACK_OK] * len(messages)
                received.extend(m.body for m in messages)
            else:
                time.sleep(0.005)

    # Threads of their own, each with its own connection: the executor in_thread uses stays free
    # for the pushers' acks.
    threads = [threading.Thread(target=closing(publish_all), args=(p,)) for p in range(publishers)]
    threads.append(threading.Thread(target=closing(receive_until_done)))
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads[:publishers]):
            await asyncio.sleep(0.01)
        total = publishers * each

        def acked() -> int:
            return int(Delivery.objects.filter(state=State.ACKED).count())

        for _ in range(1000):
            if await in_thread(acked)() == total:
                break
            await asyncio.sleep(0.01)
        done.set()
        threads[-1].join()
        everything = sorted(delivered + received)
        assert everything == sorted(f"{p}-{i}" for p in range(publishers) for i in range(each))
        assert sum(leases) >= 1, leases  # the path under test: publishes leased to waiting pushers
        assert over_prefetch == []
        assert await in_thread(acked)() == total
    finally:
        done.set()
        for thread in threads:
            thread.join()
        for pusher in pushers:
            await pusher.stop()
        await asyncio.gather(*acking, return_exceptions=True)
