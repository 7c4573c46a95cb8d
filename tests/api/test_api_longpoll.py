"""Long-poll receive: woken by a publish, re-checks on a timer, holds no connection while waiting."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from django.db import connection
from django.test import AsyncClient

from messaging import broker
from messaging.longpoll import hop

pytestmark = pytest.mark.django_db(transaction=True)


class Consumer:
    """Django's AsyncClient, sending bob's token (its `headers=` default does not reach ASGI requests)."""

    def __init__(self, token: str) -> None:
        self.client = AsyncClient()
        self.headers = {"Authorization": f"Bearer {token}"}

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        return await self.client.post("/api/v1" + path, payload, content_type="application/json", headers=self.headers)


@pytest.fixture
def consumer(bob: Any, grant: Any, token_for: Any) -> Consumer:
    grant(bob, "#", "send", "consume")
    return Consumer(token_for(bob))


@pytest.fixture
def queue(queue_factory: Any) -> Any:
    return queue_factory("lp")


async def _receive(client: Consumer, **payload: Any) -> Any:
    return await client.post("/queues/lp/receive", payload)


async def _publish(queue: Any, *bodies: str, **options: Any) -> None:
    messages = [broker.OutgoingMessage(body=b, **options) for b in bodies]
    await hop(broker.publish)(queue=queue, messages=messages)


async def test_long_poll__is_woken_by_a_publish(consumer: Consumer, queue: Any):
    poll = asyncio.ensure_future(_receive(consumer, wait_seconds=15))
    await asyncio.sleep(0.3)
    assert not poll.done()  # waiting
    started = time.monotonic()
    await _publish(queue, "hello")
    response = await poll
    assert [m["body"] for m in response.json()["messages"]] == ["hello"]
    assert time.monotonic() - started < 10  # woken, not timed out


async def test_long_poll__answers_empty_when_the_wait_ends(consumer: Consumer, queue: Any):
    started = time.monotonic()
    response = await _receive(consumer, wait_seconds=0.5)
    assert response.status_code == 200 and response.json() == {"messages": []}
    assert time.monotonic() - started >= 0.5


async def test_long_poll__finds_messages_nobody_rang_for(consumer: Consumer, queue: Any):
    # A delayed message becomes visible without any notification: only the periodic re-check sees it.
    await _publish(queue, "later", delay_seconds=0.5)
    response = await _receive(consumer, wait_seconds=15)
    assert [m["body"] for m in response.json()["messages"]] == ["later"]


async def test_long_poll__subscription(consumer: Consumer):
    topic, _ = await hop(broker.create_topic)(name="news")
    await hop(broker.create_subscription)(topic=topic, name="s")
    poll = asyncio.ensure_future(consumer.post("/topics/news/subscriptions/s/receive", {"wait_seconds": 15}))
    await asyncio.sleep(0.3)
    await hop(broker.publish)(topic=topic, messages=[broker.OutgoingMessage(body="extra")])
    assert [m["body"] for m in (await poll).json()["messages"]] == ["extra"]


def _sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        count = int(cursor.fetchone()[0])
    # With the connection pool (settings PEGASUS_DB_POOL), idle connections wait in the pool,
    # held by nobody: only the ones checked out count.
    pool = getattr(connection, "pool", None)
    return count - (pool.get_stats().get("pool_available", 0) if pool is not None else 0)


@pytest.mark.postgres
async def test_long_poll__waiters_hold_no_database_connection(consumer: Consumer, queue: Any):
    # Counted against the sessions open before: servers other test modules started (session
    # fixtures) keep theirs open meanwhile.
    before = await hop(_sessions)()
    polls = [asyncio.ensure_future(_receive(consumer, wait_seconds=15)) for _ in range(20)]
    await asyncio.sleep(1.0)
    assert not any(p.done() for p in polls)
    # 20 requests are waiting; the only new session is the listener (plus maybe one mid-hop).
    assert await hop(_sessions)() <= before + 3
    await _publish(queue, *[str(i) for i in range(20)])
    responses = await asyncio.gather(*polls)
    bodies = sorted(m["body"] for r in responses for m in r.json()["messages"])
    assert bodies == sorted(str(i) for i in range(20))


async def test_publish__201_means_committed(consumer: Consumer, queue: Any):
    from messaging.models import Delivery

    response = await consumer.post("/queues/lp/messages", {"messages": [{"body": "a"}, {"body": "b"}]})
    assert response.status_code == 201
    ids = [int(m["id"]) for m in response.json()["messages"]]

    def committed() -> int:  # another thread, so another database connection: sees only commits
        return Delivery.objects.filter(message_id__in=ids).count()

    assert await hop(committed)() == 2


def test_every_middleware_runs_in_async_mode(settings):
    # One sync-only middleware makes Django run async views (long polls) in a worker thread
    # for the whole request: a thread held per waiting client.
    from django.utils.module_loading import import_string

    sync_only = [m for m in settings.MIDDLEWARE if not getattr(import_string(m), "async_capable", False)]
    assert sync_only == []
