"""STOMP over WebSocket against a real daphne server, with stomp.py 9 (`WSStompConnection`)."""

from __future__ import annotations

import contextlib
import queue as queue_mod
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stomp

from messaging import broker
from messaging.models import Queue
from tests.ws.conftest import WAIT, eventually, settle

pytestmark = pytest.mark.django_db(transaction=True)


class Collector(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.messages: queue_mod.Queue[Any] = queue_mod.Queue()
        self.errors: queue_mod.Queue[Any] = queue_mod.Queue()
        self.receipts: queue_mod.Queue[str] = queue_mod.Queue()

    def on_message(self, frame: Any) -> None:
        self.messages.put(frame)

    def on_error(self, frame: Any) -> None:
        self.errors.put(frame)

    def on_receipt(self, frame: Any) -> None:
        self.receipts.put(frame.headers["receipt-id"])

    def take(self, n: int = 1) -> list[Any]:
        return [self.messages.get(timeout=WAIT) for _ in range(n)]

    def nothing_more(self, seconds: float = 1.0) -> bool:
        try:
            self.messages.get(timeout=seconds)
        except queue_mod.Empty:
            return True
        return False


@pytest.fixture
def connect(server: Any, admin_token: str) -> Iterator[Callable[..., tuple[Any, Collector]]]:
    opened: list[Any] = []

    def open_(client_id: str | None = None, token: str | None = None, **options: Any) -> tuple[Any, Collector]:
        conn = stomp.WSStompConnection([("127.0.0.1", server.port)], ws_path="/ws/stomp/", **options)
        listener = Collector()
        conn.set_listener("collector", listener)
        headers = {"client-id": client_id} if client_id else {}
        conn.connect("alice", token or admin_token, wait=True, headers=headers)
        opened.append(conn)
        return conn, listener

    yield open_
    for conn in opened:
        with contextlib.suppress(Exception):  # the server may have closed it (ERROR frames)
            conn.disconnect()
    settle()


def test_queue_send_receive_ack(connect: Any, queue_factory: Any) -> None:
    queue_factory("orders")
    conn, got = connect()
    conn.subscribe("/queue/orders", id="s1", ack="client-individual")
    conn.send("/queue/orders", "hello", headers={"color": "red"}, receipt="r1")
    assert got.receipts.get(timeout=WAIT) == "r1"
    (frame,) = got.take()
    assert frame.body == "hello"
    assert frame.headers["color"] == "red"
    assert frame.headers["redelivered"] == "false"
    conn.ack(frame.headers["ack"], receipt="r2")
    assert got.receipts.get(timeout=WAIT) == "r2"
    assert broker.receive(queue=Queue.objects.get(name="orders")) == []


def test_client_individual_ack_and_nack(connect: Any, queue_factory: Any) -> None:
    queue_factory("work")
    conn, got = connect()
    conn.subscribe("/queue/work", id="s1", ack="client-individual")
    for body in ("a", "b"):
        conn.send("/queue/work", body)
    first, second = got.take(2)
    conn.nack(first.headers["ack"])
    conn.ack(second.headers["ack"])
    (again,) = got.take()
    assert again.body == first.body
    assert again.headers["redelivered"] == "true"
    conn.ack(again.headers["ack"], receipt="done")
    assert got.receipts.get(timeout=WAIT) == "done"
    assert broker.receive(queue=Queue.objects.get(name="work")) == []


def test_client_mode_ack_is_cumulative(connect: Any, queue_factory: Any) -> None:
    queue_factory("cumulative")
    conn, got = connect()
    conn.subscribe("/queue/cumulative", id="s1", ack="client")
    for body in ("a", "b", "c"):
        conn.send("/queue/cumulative", body)
    frames = got.take(3)
    conn.ack(frames[1].headers["ack"], receipt="r")  # acks a and b
    assert got.receipts.get(timeout=WAIT) == "r"
    conn.disconnect()
    (left,) = eventually(lambda: broker.receive(queue=Queue.objects.get(name="cumulative"), max_messages=10))
    assert left.body == "c" and left.redelivered


def test_prefetch_is_respected(connect: Any, queue_factory: Any, publish: Any) -> None:
    q = queue_factory("slow")
    publish(q, *[f"m{i}" for i in range(5)])
    conn, got = connect()
    conn.subscribe("/queue/slow", id="s1", ack="client-individual", headers={"prefetch-count": "2"})
    first, _second = got.take(2)
    assert got.nothing_more()  # two out unacked: nothing else comes
    conn.ack(first.headers["ack"])
    (third,) = got.take()
    assert third.body == "m2"
    assert got.nothing_more()


def test_durable_subscription_collects_while_away(connect: Any) -> None:
    broker.create_topic(name="news")
    conn, got = connect(client_id="reader")
    conn.subscribe("/topic/news", id="s1", ack="client-individual",
                   headers={"durable-subscription-name": "daily"})  # fmt: skip
    conn.send("/topic/news", "one")
    conn.ack(got.take()[0].headers["ack"], receipt="r")
    assert got.receipts.get(timeout=WAIT) == "r"
    conn.disconnect()

    producer, _ = connect()
    producer.send("/topic/news", "two", receipt="sent")
    assert _.receipts.get(timeout=WAIT) == "sent"
    assert Queue.objects.filter(topic__name="news", name="reader.daily", durable=True).exists()

    conn, got = connect(client_id="reader")
    conn.subscribe("/topic/news", id="s1", ack="auto", headers={"durable-subscription-name": "daily"})
    assert [f.body for f in got.take()] == ["two"]


def test_non_durable_subscription_dies_with_the_connection(connect: Any) -> None:
    broker.create_topic(name="ticks")
    conn, got = connect()
    conn.subscribe("/topic/ticks", id="s1", ack="client-individual")
    conn.send("/topic/ticks", "t1")
    got.take()
    assert Queue.objects.filter(topic__name="ticks", durable=False).count() == 1
    conn.disconnect()
    eventually(lambda: not Queue.objects.filter(topic__name="ticks").exists())


def test_transaction_commit_and_abort(connect: Any, queue_factory: Any) -> None:
    queue_factory("tx")
    conn, got = connect()
    conn.begin("t1")
    conn.send("/queue/tx", "kept", transaction="t1")
    conn.begin("t2")
    conn.send("/queue/tx", "dropped", transaction="t2")
    conn.abort("t2")
    conn.subscribe("/queue/tx", id="s1", ack="client-individual")
    assert got.nothing_more()  # staged: invisible before commit
    conn.commit("t1")
    (frame,) = got.take()
    assert frame.body == "kept"
    # An ack inside a transaction that is aborted gives the message back.
    conn.begin("t3")
    conn.ack(frame.headers["ack"], transaction="t3")
    conn.abort("t3")
    (again,) = got.take()
    assert again.body == "kept" and again.headers["redelivered"] == "true"
    conn.begin("t4")
    conn.ack(again.headers["ack"], transaction="t4")
    conn.commit("t4", receipt="c")
    assert got.receipts.get(timeout=WAIT) == "c"
    assert got.nothing_more()
    assert broker.receive(queue=Queue.objects.get(name="tx")) == []


def test_unacked_messages_are_redelivered_at_once_after_disconnect(connect: Any, queue_factory: Any) -> None:
    queue_factory("jobs", visibility_timeout_seconds=3600)
    first, got = connect()
    first.subscribe("/queue/jobs", id="s1", ack="client-individual")
    first.send("/queue/jobs", "job")
    got.take()
    first.disconnect()
    second, got2 = connect()
    second.subscribe("/queue/jobs", id="s1", ack="client-individual")
    (frame,) = got2.take()  # not after the hour-long lease: now
    assert frame.body == "job" and frame.headers["redelivered"] == "true"


def test_binary_body_round_trips(connect: Any, queue_factory: Any) -> None:
    queue_factory("bin")
    conn, got = connect(auto_decode=False, binary_mode=True)
    conn.subscribe("/queue/bin", id="s1")
    payload = bytes(range(256))
    conn.send("/queue/bin", payload, content_type="application/octet-stream")
    (frame,) = got.take()
    assert frame.body == payload


def test_unknown_queue_gets_an_error_frame(connect: Any) -> None:
    conn, got = connect()
    conn.send("/queue/missing", "x")
    error = got.errors.get(timeout=WAIT)
    assert error.headers["message"] == "queue_not_found"


def test_bad_token_is_refused(server: Any, db: Any) -> None:
    conn = stomp.WSStompConnection([("127.0.0.1", server.port)], ws_path="/ws/stomp/", reconnect_attempts_max=1)
    with pytest.raises(stomp.exception.ConnectFailedException):
        conn.connect("alice", "not-a-token", wait=True)
