"""Two daphne processes on one PostgreSQL database: what is published through A reaches a
consumer connected to B, woken by LISTEN/NOTIFY (the database stays the source of truth)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import stomp
from websockets.sync.client import connect

from messaging import broker
from tests.ws.conftest import WAIT, settle
from tests.ws.test_stomp_py import Collector

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="session")
def other_server(daphne_factory: Callable[..., Any]) -> Any:
    # A long re-check interval: only the NOTIFY doorbell can make delivery prompt here.
    return daphne_factory(PEGASUS_WS_RECHECK_SECONDS="30")


def test_published_through_a_is_pushed_by_b(server: Any, other_server: Any, admin_token: str) -> None:
    broker.create_queue(name="cross")
    consumer = stomp.WSStompConnection([("127.0.0.1", other_server.port)], ws_path="/ws/stomp/")
    got = Collector()
    consumer.set_listener("collector", got)
    consumer.connect("alice", admin_token, wait=True)
    try:
        consumer.subscribe("/queue/cross", id="s", ack="client-individual", receipt="subscribed")
        assert got.receipts.get(timeout=WAIT) == "subscribed"
        with connect(f"{server.ws}/ws/v1/?token={admin_token}") as producer:

            def publish(body: str) -> None:
                producer.send(json.dumps({"op": "publish", "queue": "cross", "messages": [{"body": body}]}))
                assert json.loads(producer.recv(timeout=WAIT))["op"] == "published"

            # The first may come by the 30 s re-check if B's LISTEN was not up yet.
            publish("warm-up")
            consumer.ack(got.messages.get(timeout=45).headers["ack"])
            for i in range(3):
                publish(f"m{i}")
                (frame,) = got.take()  # within WAIT (20 s), so before any re-check: the doorbell
                assert frame.body == f"m{i}"
                consumer.ack(frame.headers["ack"])
    finally:
        consumer.disconnect()
        settle()
