"""Non-durable publishes written behind, through a real daphne server on PostgreSQL
(messaging/write_behind.py; the in-process tests are tests/messaging/test_write_behind.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from messaging import broker
from messaging.models import TransientMessage
from tests.ws.conftest import Server, start_server

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def server(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[Server]:
    with django_db_blocker.unblock():
        started = start_server(tmp_path_factory.mktemp("write-behind") / "daphne.log")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def api(server: Server, alice: Any, token_for: Any) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {token_for(alice)}"}
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=30) as client:
        yield client


def _publish(api: httpx.Client, queue: str, *bodies: str) -> list[str]:
    answer = api.post(f"/queues/{queue}/messages", json={"messages": [{"body": b, "durable": False} for b in bodies]})
    assert answer.status_code == 201, answer.text
    return [m["id"] for m in answer.json()["messages"]]


def test_publish_then_receive_through_one_server_gets_every_message_in_order(api: httpx.Client):
    broker.create_queue(name="wb-live")
    ids = [i for n in range(40) for i in _publish(api, "wb-live", f"m{n}a", f"m{n}b")]
    answer = api.post("/queues/wb-live/receive", json={"max_messages": 100})
    messages = answer.json()["messages"]
    assert [m["body"] for m in messages] == [f"m{n}{x}" for n in range(40) for x in "ab"]
    assert [m["id"] for m in messages] == ids and [m["durable"] for m in messages] == [False] * 80


def test_a_bad_message_is_still_refused_when_publishes_are_answered_early(api: httpx.Client):
    broker.create_queue(name="wb-live-small", settings=broker.QueueSettings(max_message_bytes=8))
    _publish(api, "wb-live-small", "ok")
    _publish(api, "wb-live-small", "ok too")  # by now answered early: the queue's limits are cached
    answer = api.post("/queues/wb-live-small/messages", json={"body": "far too long", "durable": False})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "message_too_large"


def test_sigterm_writes_every_message_answered_before_the_server_exits(api: httpx.Client, server: Server):
    broker.create_queue(name="wb-live-exit")
    ids = [i for n in range(100) for i in _publish(api, "wb-live-exit", *[f"e{n}.{k}" for k in range(20)])]
    unwritten = len(ids) - TransientMessage.objects.filter(destination="queue:wb-live-exit").count()
    server.stop()  # SIGTERM: the writer gets EXIT_SECONDS to write what is left
    try:
        rows = TransientMessage.objects.filter(destination="queue:wb-live-exit").order_by("id")
        stored = list(rows.values_list("id", flat=True))
        print(f"{unwritten} of {len(ids)} answered messages were not yet written when SIGTERM was sent")
        assert [f"t{pk}" for pk in stored] == ids
    finally:
        server.start()
