"""The JSON protocol at /ws/v1/ against a real daphne server, with the `websockets` library."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from messaging import broker
from messaging.models import Consumer, Queue
from tests.ws.conftest import WAIT, eventually, settle

pytestmark = pytest.mark.django_db(transaction=True)


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []

    def send(self, **frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def next(self, op: str | None = None) -> dict[str, Any]:
        """The next frame (of this op, keeping others for later)."""
        for i, frame in enumerate(self.pending):
            if op is None or frame["op"] == op:
                return self.pending.pop(i)
        while True:
            got: dict[str, Any] = json.loads(self.ws.recv(timeout=WAIT))
            if op is None or got["op"] == op:
                return got
            self.pending.append(got)

    def call(self, **frame: Any) -> dict[str, Any]:
        """Send a frame and return its answer; pushed messages that arrive first (a publish's
        own message may be pushed before its confirm) are kept for next()."""
        self.send(corr=frame.get("corr", "c"), **{k: v for k, v in frame.items() if k != "corr"})
        while True:
            reply: dict[str, Any] = json.loads(self.ws.recv(timeout=WAIT))
            if reply["op"] != "message":
                return reply
            self.pending.append(reply)

    def quiet(self, seconds: float = 1.0) -> bool:
        try:
            self.pending.append(json.loads(self.ws.recv(timeout=seconds)))
        except TimeoutError:
            return True
        return False


@pytest.fixture
def client(server: Any, admin_token: str) -> Iterator[Callable[..., Client]]:
    with contextlib.ExitStack() as stack:

        def open_(**options: Any) -> Client:
            return Client(stack.enter_context(connect(f"{server.ws}/ws/v1/?token={admin_token}", **options)))

        yield open_
    settle()


def test_publish_is_confirmed_and_consumed(client: Any, queue_factory: Any) -> None:
    queue_factory("orders")
    c = client()
    reply = c.call(
        op="publish", corr="p1", queue="orders", messages=[{"body": "a", "headers": {"k": "v"}}, {"body": "b"}]
    )
    assert reply["op"] == "published" and reply["corr"] == "p1"
    assert [m["duplicate"] for m in reply["messages"]] == [False, False]
    assert c.call(op="subscribe", id="s", queue="orders", prefetch=10, ack="client") == {
        "op": "ok",
        "corr": "c",
        "id": "s",
    }
    first, second = c.next("message"), c.next("message")
    assert first["subscription"] == "s"
    assert first["message"]["body"] == "a" and first["message"]["headers"] == {"k": "v"}
    reply = c.call(op="ack", receipts=[first["message"]["receipt"], second["message"]["receipt"]])
    assert [r["status"] for r in reply["results"]] == ["ok", "ok"]
    assert broker.receive(queue=Queue.objects.get(name="orders")) == []


def test_consumer_is_registered_while_connected(client: Any, queue_factory: Any) -> None:
    queue_factory("seen")
    c = client()
    c.call(op="subscribe", id="s", queue="seen", prefetch=5, ack="auto")
    row = Consumer.objects.get(queue__name="seen")
    assert (row.protocol, row.prefetch) == ("json", 5)
    c.ws.close()
    eventually(lambda: not Consumer.objects.filter(queue__name="seen").exists())


def test_prefetch_and_nack(client: Any, queue_factory: Any, publish: Any) -> None:
    q = queue_factory("pf")
    publish(q, "m0", "m1", "m2")
    c = client()
    c.call(op="subscribe", id="s", queue="pf", prefetch=1, ack="client")
    first = c.next("message")["message"]
    assert c.quiet()  # one out, prefetch 1: nothing else
    c.call(op="nack", receipts=[first["receipt"]])
    again = c.next("message")["message"]
    assert again["body"] == first["body"] and again["redelivered"]


def test_auto_ack(client: Any, queue_factory: Any, publish: Any) -> None:
    q = queue_factory("auto")
    publish(q, *[f"m{i}" for i in range(5)])
    c = client()
    c.call(op="subscribe", id="s", queue="auto", prefetch=2, ack="auto")
    assert sorted(c.next("message")["message"]["body"] for _ in range(5)) == [f"m{i}" for i in range(5)]


def test_transactions(client: Any, queue_factory: Any) -> None:
    queue_factory("tx")
    c = client()
    txn = c.call(op="begin")["transaction"]
    c.call(op="publish", queue="tx", messages=[{"body": "staged"}], transaction=txn)
    assert broker.receive(queue=Queue.objects.get(name="tx")) == []
    assert c.call(op="prepare", transaction=txn)["state"] == "prepared"
    assert c.call(op="commit", transaction=txn)["state"] == "committed"
    other = c.call(op="begin")["transaction"]
    c.call(op="publish", queue="tx", messages=[{"body": "gone"}], transaction=other)
    assert c.call(op="rollback", transaction=other)["state"] == "rolled_back"
    assert [m.body for m in broker.receive(queue=Queue.objects.get(name="tx"), max_messages=10)] == ["staged"]


def test_topic_subscriptions(client: Any) -> None:
    broker.create_topic(name="news")
    c = client()
    c.call(op="subscribe", id="durable", topic="news", subscription="keep", durable=True, prefetch=5, ack="auto")
    c.call(op="subscribe", id="temp", topic="news", prefetch=5, ack="auto")
    c.call(op="publish", topic="news", messages=[{"body": "hi"}])
    got = sorted(c.next("message")["subscription"] for _ in range(2))
    assert got == ["durable", "temp"]
    c.ws.close()
    eventually(lambda: list(Queue.objects.filter(topic__name="news").values_list("name", flat=True)) == ["keep"])


def test_broker_errors_keep_the_connection(client: Any) -> None:
    c = client()
    reply = c.call(op="publish", corr="x", queue="missing", messages=[{"body": "a"}])
    assert reply == {"op": "error", "corr": "x", "code": "queue_not_found", "message": reply["message"]}
    assert c.call(op="ping")["op"] == "pong"


@pytest.mark.parametrize(
    "frame", ["not json", "[1]", '{"op": "fly"}', '{"op": "publish", "queue": "q", "messages": 3}']
)
def test_malformed_frame_gets_an_error_and_closes(client: Any, frame: str) -> None:
    c = client()
    c.ws.send(frame)
    assert c.next()["code"] == "malformed_frame"
    with pytest.raises(ConnectionClosed):
        c.ws.recv(timeout=WAIT)
    assert c.ws.close_code == 4400


def test_frame_too_large(client: Any) -> None:
    c = client(max_size=None)
    c.ws.send("x" * (2 * 1024 * 1024))
    assert c.next()["code"] == "frame_too_large"
    with pytest.raises(ConnectionClosed):
        c.ws.recv(timeout=WAIT)


def test_unauthenticated_and_foreign_origin_are_refused(server: Any, admin_token: str) -> None:
    refused: list[tuple[str, Any]] = [
        (f"{server.ws}/ws/v1/", None),
        (f"{server.ws}/ws/v1/?token=wrong", None),
        (f"{server.ws}/ws/v1/?token={admin_token}", Origin("http://evil.example")),
    ]
    for url, origin in refused:
        with pytest.raises(InvalidStatus), connect(url, origin=origin):
            pass
    headers = {"Authorization": f"Bearer {admin_token}"}
    with connect(f"{server.ws}/ws/v1/", origin=Origin("http://localhost:8000"), additional_headers=headers) as ws:
        ws.send(json.dumps({"op": "ping"}))
        assert json.loads(ws.recv(timeout=WAIT))["op"] == "pong"
