"""The express lane (pegasus_site/express.py) answers exactly as the ninja views do.

Two real daphne servers on the test database, one with the lane (as in production) and one
without it (PEGASUS_EXPRESS=0): every case is sent to both, and the statuses, the JSON (ids,
receipts and times aside) and the header names must be the same. In-process tests then check
which requests the lane serves itself and which it hands to Django untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync

from messaging import broker
from pegasus_site.express import ExpressLane
from tests.ws.conftest import Server, start_server

pytestmark = pytest.mark.django_db(transaction=True)

VARIABLE = {"id", "receipt", "published_at", "expires_at"}
IGNORED_HEADERS = {"date", "server"}


@pytest.fixture(scope="module")
def servers(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("express")
    with django_db_blocker.unblock():
        express = start_server(logs / "express.log")
        plain = start_server(logs / "plain.log", PEGASUS_EXPRESS="0")
    yield express, plain
    express.close()
    plain.close()
    with django_db_blocker.unblock():
        _wait_until_their_connections_are_gone()


def _wait_until_their_connections_are_gone() -> None:
    """The servers' LISTEN connections end a moment after the servers do; later tests count them."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pegasus-listener' "
                "AND datname = current_database()"
            )
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.05)


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<var>" if k in VARIABLE and v is not None else _normal(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _send(server: Server, method: str, path: str, token: str | None, body: Any = None, **headers: str) -> Any:
    sent = dict(headers)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    sent.setdefault("Content-Type", "application/json")
    return httpx.request(method, f"{server.url}/api/v1{path}", content=content, headers=sent, timeout=30)


Pair = Callable[..., tuple[Any, Any]]


@pytest.fixture
def both(servers: tuple[Server, Server]) -> Pair:
    """both(path, token, body) -> (express answer, ninja answer), checked to be alike."""

    def send(path: str, token: str | None, body: Any = None, *, method: str = "POST", **headers: str) -> Any:
        fast = _send(servers[0], method, path.replace("{q}", "q-fast"), token, body, **headers)
        slow = _send(servers[1], method, path.replace("{q}", "q-slow"), token, body, **headers)
        assert fast.status_code == slow.status_code, (fast.text, slow.text)
        if slow.headers.get("content-type", "").startswith("application/json"):
            fast_json, slow_json = (
                json.loads(r.text.replace(q, "{q}")) for r, q in ((fast, "q-fast"), (slow, "q-slow"))
            )
            assert _normal(fast_json) == _normal(slow_json), (fast.text, slow.text)
        if not path.endswith("/receive"):  # Django streams receive's answer (chunked): no length
            names = {k.lower() for k in fast.headers} - IGNORED_HEADERS
            assert names == {k.lower() for k in slow.headers} - IGNORED_HEADERS
        for header in ("content-type", "x-content-type-options", "referrer-policy", "x-frame-options"):
            assert fast.headers.get(header) == slow.headers.get(header), header
        return fast, slow

    return send


@pytest.fixture
def queues() -> None:
    for name in ("q-fast", "q-slow"):
        broker.create_queue(name=name)


def test_publish_receive_ack__alike(both: Pair, queues: None, alice: Any, token_for: Any):
    token = token_for(alice)
    both("/queues/{q}/messages", token, {"body": "one", "headers": {"k": "v"}, "priority": 7})
    batch = {"messages": [{"body": "a", "dedup_id": "x"}, {"body": "b", "dedup_id": "x"}, {"body": "c"}]}
    fast, _ = both("/queues/{q}/messages", token, batch)
    assert [m["duplicate"] for m in fast.json()["messages"]] == [False, True, False]
    fast, _ = both("/queues/{q}/receive", token, {"max_messages": 10})
    assert [m["body"] for m in fast.json()["messages"]] == ["one", "a", "c"]
    fast, _ = both("/queues/{q}/receive", token)  # no body: the defaults, and nothing left
    assert fast.json() == {"messages": []}


def test_ack__results_alike_on_both(servers: tuple[Server, Server], queues: None, alice: Any, token_for: Any):
    token = token_for(alice)
    answers = []
    for server, queue in zip(servers, ("q-fast", "q-slow"), strict=True):
        _send(server, "POST", f"/queues/{queue}/messages", token, {"messages": [{"body": "1"}, {"body": "2"}]})
        got = _send(server, "POST", f"/queues/{queue}/receive", token, {"max_messages": 2}).json()["messages"]
        receipts = [m["receipt"] for m in got] + ["d1.nope"]
        first = _send(server, "POST", "/ack", token, {"receipts": receipts})
        again = _send(server, "POST", "/ack", token, {"receipts": receipts[:1]})
        answers.append([(r.status_code, _normal(r.json())) for r in (first, again)])
        assert first.status_code == 200, first.text
    assert answers[0] == answers[1]
    assert answers[0][0][1]["results"][-1]["status"] == "stale_receipt"


def test_receive_carrying_ack__results_alike_on_both(
    servers: tuple[Server, Server], queues: None, alice: Any, token_for: Any
):
    token = token_for(alice)
    answers = []
    for server, queue in zip(servers, ("q-fast", "q-slow"), strict=True):
        _send(server, "POST", f"/queues/{queue}/messages", token, {"messages": [{"body": "1"}, {"body": "2"}]})
        got = _send(server, "POST", f"/queues/{queue}/receive", token, {}).json()["messages"]
        receipts = [m["receipt"] for m in got] + ["d1.nope"]
        r = _send(server, "POST", f"/queues/{queue}/receive", token, {"ack": receipts})
        assert r.status_code == 200, r.text
        assert [m["body"] for m in r.json()["messages"]] == ["2"]
        assert r.json()["acked"][0]["receipt"] == receipts[0]
        answers.append(_normal(json.loads(r.text.replace(queue, "{q}"))))
    assert answers[0] == answers[1]
    assert [a["status"] for a in answers[0]["acked"]] == ["ok", "stale_receipt"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/queues/{q}/receive", {"ack": "d1.x"}),  # 400 from the schema
        ("/queues/{q}/receive", {"ack": ["d1.x"] * 1001}),  # 400 from the schema
        ("/queues/nowhere/messages", {"body": "x"}),  # 404 queue_not_found
        ("/queues/{q}/messages", {"body": "x", "priority": 99}),  # 400 from the schema
        ("/queues/{q}/messages", b"{not json"),  # 400 cannot parse
        ("/queues/{q}/messages", [1, 2]),  # 400 not an object
        ("/queues/{q}/messages", {"messages": [{"body": "x"}] * 1001}),  # 400 batch_too_large
        ("/queues/{q}/messages", {"messages": []}),  # 400 from the broker
        ("/queues/{q}/messages", {"body": "x", "transaction": "nope"}),  # 404 transaction_not_found
        ("/queues/bad%20name!/messages", {"body": "x"}),  # 400 invalid_name
        ("/topics/nowhere/messages", {"body": "x"}),  # 404 topic_not_found
        ("/queues/{q}/receive", {"max_messages": 0}),  # 400
        ("/queues/nowhere/receive", {}),  # 404
        ("/topics/t/subscriptions/nowhere/receive", {}),  # 404
        ("/ack", {"receipts": []}),  # 400
        ("/ack", {"receipts": ["garbage"]}),  # 409 all stale
    ],
)
def test_errors__alike(both: Pair, queues: None, alice: Any, token_for: Any, path: str, body: Any):
    broker.create_topic(name="t")
    fast, _ = both(path, token_for(alice), body)
    assert 400 <= fast.status_code < 500 and "error" in fast.json()


def test_credentials_and_permission__alike(both: Pair, queues: None, bob: Any, token_for: Any, grant: Any):
    for token in (None, "pgs_not-a-token"):
        fast, _ = both("/queues/{q}/messages", token, {"body": "x"})
        assert fast.status_code == 401 and fast.headers["www-authenticate"] == "Bearer"
    fast, _ = both("/queues/{q}/messages", token_for(bob), {"body": "x"})
    assert fast.status_code == 403
    grant(bob, "*", "send")
    fast, _ = both("/queues/{q}/messages", token_for(bob), {"body": "x"})
    assert fast.status_code == 201
    fast, _ = both("/queues/{q}/receive", token_for(bob), {})
    assert fast.status_code == 403


def test_revoked_token__refused_at_once(servers: tuple[Server, Server], queues: None, alice: Any):
    from messaging import tokens

    row, raw = tokens.issue_token(user=alice)
    assert _send(servers[0], "POST", "/queues/q-fast/messages", raw, {"body": "x"}).status_code == 201
    tokens.revoke(token_ids=[row.pk])  # in another process than the server's
    # The server remembers a good token for tokens.CACHE_SECONDS (1 s): refused within that.
    deadline = time.monotonic() + 5
    while _send(servers[0], "POST", "/queues/q-fast/messages", raw, {"body": "x"}).status_code != 401:
        assert time.monotonic() < deadline, "revoked token still accepted"


def test_topic_publish_and_subscription_receive__alike(both: Pair, alice: Any, token_for: Any):
    token = token_for(alice)
    for name in ("q-fast", "q-slow"):  # `both` puts these names where the path says {q}
        broker.create_topic(name=name)
        broker.create_subscription(topic=broker.get_topic(name=name), name="s")
    both("/topics/{q}/messages", token, {"messages": [{"body": "hi"}, {"body": "there"}]})
    fast, _ = both("/topics/{q}/subscriptions/s/receive", token, {"max_messages": 5})
    assert [m["body"] for m in fast.json()["messages"]] == ["hi", "there"]


def test_host_not_allowed__left_to_django(both: Pair, queues: None, alice: Any, token_for: Any):
    fast, _ = both("/queues/{q}/messages", token_for(alice), {"body": "x"}, Host="evil.example")
    assert fast.status_code == 400


# --------------------------------------------------------------------------- in process


class Downstream:
    """Stands for Django: records that it was called and answers 299."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.calls.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _call(lane: ExpressLane, path: str, body: bytes, token: str | None, host: bytes = b"127.0.0.1") -> int:
    headers = [(b"host", host), (b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "scheme": "http"}
    sent: list[Any] = []
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> Any:
        message = next(messages, None)
        if message is None:  # the client stays connected
            await asyncio.Event().wait()
        return message

    async def send(message: Any) -> None:
        sent.append(message)

    await lane(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.parametrize(
    "path, body, served_here",
    [
        ("/api/v1/queues/lane/messages", b'{"body": "x"}', True),
        ("/api/v1/queues/lane/receive", b"", True),
        ("/api/v1/ack", b'{"receipts": ["d1.x"]}', True),
        ("/api/v1/queues/nowhere/messages", b'{"body": "x"}', True),  # a broker error: answered here
        ("/api/v1/queues/lane/messages", b'{"body": 5}', False),  # invalid: ninja explains
        ("/api/v1/queues/lane/messages", b"[]", False),
        ("/api/v1/queues/bad name/messages", b'{"body": "x"}', False),
        ("/api/v1/queues/lane", b"", False),  # not a hot route
        ("/api/v1/queues/lane/purge", b"", False),
    ],
)
def test_lane__serves_the_hot_routes_and_hands_on_the_rest(
    alice: Any, token_for: Any, path: str, body: bytes, served_here: bool
):
    # Through async_to_sync, as Django's test client does: the lane's database hops then run in
    # this thread, on the test's connection (messaging/longpoll.py `hop`).
    broker.create_queue(name="lane")
    downstream = Downstream()
    status = async_to_sync(_call)(ExpressLane(downstream, enabled=True), path, body, token_for(alice))
    assert (downstream.calls == []) is served_here, status
    if not served_here:
        assert downstream.calls == [body]  # handed on with its body


def test_lane__a_disallowed_host_goes_to_django(alice: Any, token_for: Any):
    downstream = Downstream()
    lane = ExpressLane(downstream, enabled=True)
    async_to_sync(_call)(lane, "/api/v1/queues/x/messages", b"{}", token_for(alice), b"evil.example")
    assert len(downstream.calls) == 1


def test_queue_deleted_by_another_process__publish_looks_again(
    servers: tuple[Server, Server], alice: Any, token_for: Any
):
    """The server remembers a queue row for a second (broker.get_queue(recent_ok=True)); a publish
    to a queue deleted or re-created meanwhile elsewhere still gets the answer of a fresh lookup."""
    from messaging.models import Delivery

    token, server = token_for(alice), servers[0]
    queue, _ = broker.create_queue(name="q-gone")
    assert _send(server, "POST", "/queues/q-gone/messages", token, {"body": "1"}).status_code == 201  # now remembered
    broker.delete_queue(queue=queue)  # in this process, not the server's
    r = _send(server, "POST", "/queues/q-gone/messages", token, {"body": "2"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "queue_not_found"
    again, _ = broker.create_queue(name="q-gone")
    r = _send(server, "POST", "/queues/q-gone/messages", token, {"body": "3"})
    assert r.status_code == 201
    assert list(Delivery.objects.filter(queue=again).values_list("message__body", flat=True)) == ["3"]
