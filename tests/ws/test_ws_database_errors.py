"""A database error inside a WebSocket frame's operation (a PostgreSQL restart, a killed
session) is answered, and the connection's session is closed whenever its consumer ends.

Found by scenario 4 (tests/faults): an ack's OperationalError escaped the JSON consumer, Channels
ended it without calling disconnect(), and its session lived on: its pusher took hand-offs for
the gone connection and its ticker extended their leases, so messages stayed leased for minutes.
These run the consumers in-process (channels' WebsocketCommunicator) to inject the error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.db import OperationalError

from messaging import broker, group_commit, push, tokens
from messaging.consumers import JsonConsumer
from messaging.models import Consumer
from messaging.session import Session
from messaging.stomp.consumer import StompConsumer
from tests.threads import in_thread

pytestmark = pytest.mark.django_db(transaction=True)


def _down(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("server closed the connection unexpectedly")


async def _async_down(*args: Any, **kwargs: Any) -> Any:
    _down()


async def _json_client(token: str) -> WebsocketCommunicator:
    client = WebsocketCommunicator(JsonConsumer.as_asgi(), f"/ws/v1/?token={token}")
    connected, _ = await client.connect()
    assert connected
    return client


async def _frame(client: WebsocketCommunicator) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await client.receive_from(timeout=10))
    return frame


@pytest.fixture
def token(alice: Any) -> str:
    return tokens.create_token(user=alice)


async def test_json__database_error_is_an_unavailable_frame_and_the_connection_stays(
    token: str, queue_factory: Any, monkeypatch: Any
):
    await in_thread(queue_factory)("q")
    client = await _json_client(token)
    try:
        monkeypatch.setattr(broker, "ack", _down)
        await client.send_to(text_data=json.dumps({"op": "ack", "corr": "a", "receipts": ["d1.x"]}))
        answer = await _frame(client)
        assert (answer["op"], answer["corr"], answer["code"]) == ("error", "a", "unavailable")
        publish = json.dumps({"op": "publish", "corr": "p", "queue": "q", "messages": [{"body": "x"}]})
        monkeypatch.setattr(group_commit, "publish", _async_down)  # a pipelined publish's round
        await client.send_to(text_data=publish)
        answer = await _frame(client)
        assert (answer["op"], answer["corr"], answer["code"]) == ("error", "p", "unavailable")
        monkeypatch.undo()
        await client.send_to(text_data=publish)
        assert (await _frame(client))["op"] == "published"  # still connected, still working
    finally:
        await client.disconnect()


async def test_json__a_consumer_that_crashes_still_closes_its_session(token: str, queue_factory: Any, monkeypatch: Any):
    queue = await in_thread(queue_factory)("q")
    client = await _json_client(token)
    await client.send_to(text_data=json.dumps({"op": "subscribe", "id": "s", "queue": "q", "prefetch": 5}))
    assert (await _frame(client))["op"] == "ok"
    assert await in_thread(Consumer.objects.filter(queue=queue).exists)()

    async def crash(self: Session, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in a frame's operation")

    monkeypatch.setattr(Session, "nack", crash)
    await client.send_to(text_data=json.dumps({"op": "nack", "corr": "n", "receipts": ["d1.x"]}))
    with pytest.raises(RuntimeError):
        await client.wait(timeout=10)  # the consumer died of it
    # Closed all the same: the pusher stopped (no longer takeable) and unregistered.
    assert queue.pk not in push._TAKEABLE
    assert not await in_thread(Consumer.objects.filter(queue=queue).exists)()


async def test_stomp__database_error_is_an_error_frame_and_the_session_closes(
    token: str, queue_factory: Any, monkeypatch: Any
):
    queue = await in_thread(queue_factory)("q")
    client = WebsocketCommunicator(StompConsumer.as_asgi(), "/ws/stomp/", subprotocols=["v12.stomp"])
    connected, _ = await client.connect()
    assert connected
    await client.send_to(text_data=f"CONNECT\naccept-version:1.2\nhost:x\npasscode:{token}\n\n\x00")
    assert (await client.receive_from(timeout=10)).startswith("CONNECTED")
    await client.send_to(text_data="SUBSCRIBE\nid:1\ndestination:/queue/q\nack:client\n\n\x00")
    monkeypatch.setattr(broker, "nack", _down)
    await client.send_to(text_data="NACK\nid:d1.x\n\n\x00")
    error = await client.receive_from(timeout=10)
    assert error.startswith("ERROR") and "message:unavailable" in error
    assert (await client.receive_output(timeout=10))["type"] == "websocket.close"  # STOMP: ERROR closes
    await client.disconnect()
    assert queue.pk not in push._TAKEABLE
    assert not await in_thread(Consumer.objects.filter(queue=queue).exists)()
