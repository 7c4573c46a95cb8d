"""WebSocket and STOMP as an attacker would try them: the permission matrix over four personas,
stolen receipts, revoked tokens, too many connections, and a publish flood from one token."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from messaging import broker, tokens
from messaging.models import ApiToken, Transaction
from tests.ws.conftest import WAIT, eventually, settle

pytestmark = pytest.mark.django_db(transaction=True)

ORDERS, BILLING = "orders.eu", "billing"
PERSONAS = ("admin", "orders_user", "nobody", "anonymous")
OPS = (
    "publish queue", "publish topic", "subscribe queue", "subscribe topic", "ack stolen receipt",
    "nack stolen receipt",
)  # fmt: skip


@pytest.fixture
def world(alice, bob, mallory, grant, token_for):
    grant(bob, "orders.*", "send", "consume", "browse", "manage")
    for name in (ORDERS, BILLING):
        queue, _ = broker.create_queue(name=name)
        broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=f"{name}-{i}") for i in range(3)])
        broker.create_topic(name=name)
    yield {"admin": token_for(alice), "orders_user": token_for(bob), "nobody": token_for(mallory), "anonymous": None}
    settle()


def allowed(persona: str, dest: str) -> bool:
    return persona == "admin" or (persona == "orders_user" and dest == ORDERS)


def _stolen_receipt(dest: str) -> str:
    """A receipt someone else (the test, as the admin) holds on `dest`."""
    [leased] = broker.receive(queue=broker.get_queue(name=dest), visibility_timeout_seconds=600)
    return leased.receipt


# ---------------------------------------------------------------------- JSON protocol


def _json_frame(op: str, dest: str) -> dict[str, Any]:
    frames: dict[str, dict[str, Any]] = {
        "publish queue": {"op": "publish", "corr": "c", "queue": dest, "messages": [{"body": "x"}]},
        "publish topic": {"op": "publish", "corr": "c", "topic": dest, "messages": [{"body": "x"}]},
        "subscribe queue": {"op": "subscribe", "corr": "c", "id": "s", "queue": dest, "prefetch": 1, "ack": "client"},
        "subscribe topic": {
            "op": "subscribe", "corr": "c", "id": "s", "topic": dest, "subscription": "mine", "durable": True,
            "prefetch": 1, "ack": "client",
        },
        "ack stolen receipt": {"op": "ack", "corr": "c", "receipts": [_stolen_receipt(dest)]},
        "nack stolen receipt": {"op": "nack", "corr": "c", "receipts": [_stolen_receipt(dest)]},
    }  # fmt: skip
    return frames[op]


def _json_reply(ws: ClientConnection) -> dict[str, Any]:
    while True:
        reply: dict[str, Any] = json.loads(ws.recv(timeout=WAIT))
        if reply["op"] != "message":
            return reply


@pytest.mark.parametrize("dest", [ORDERS, BILLING])
@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("op", OPS)
def test_json_permission_matrix(server, world, op, persona, dest):
    token = world[persona]
    if token is None:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{server.ws}/ws/v1/")
        assert refused.value.response.status_code == 403
        return
    with connect(f"{server.ws}/ws/v1/?token={token}") as ws:
        ws.send(json.dumps(_json_frame(op, dest)))
        reply = _json_reply(ws)
    if allowed(persona, dest):
        assert reply["op"] != "error", (op, persona, dest, reply)
        if "stolen receipt" in op:
            assert [r["status"] for r in reply["results"]] == ["ok"]
    else:
        assert reply["op"] == "error" and reply["code"] == "permission_denied", (op, persona, dest, reply)


# ---------------------------------------------------------------------- STOMP


def _stomp(command: str, headers: dict[str, str], body: str = "") -> str:
    return command + "\n" + "".join(f"{k}:{v}\n" for k, v in headers.items()) + "\n" + body + "\x00"


def _stomp_frames(op: str, dest: str) -> list[str]:
    kind = "queue" if "queue" in op else "topic"
    if op.startswith("publish"):
        return [_stomp("SEND", {"destination": f"/{kind}/{dest}", "receipt": "r"}, "x")]
    if op.startswith("subscribe"):
        extra = {"durable-subscription-name": "mine"} if kind == "topic" else {}
        return [_stomp("SUBSCRIBE", {"id": "s", "destination": f"/{kind}/{dest}", "ack": "client", "receipt": "r",
                                     "prefetch-count": "1", **extra})]  # fmt: skip
    command = "ACK" if op.startswith("ack") else "NACK"
    return [_stomp(command, {"id": _stolen_receipt(dest), "receipt": "r"})]


def _stomp_answer(ws: ClientConnection) -> str:
    """The command of the first RECEIPT or ERROR frame (MESSAGE frames are skipped)."""
    while True:
        frame = ws.recv(timeout=WAIT)
        text = frame if isinstance(frame, str) else frame.decode()
        command = text.lstrip("\n").split("\n", 1)[0]
        if command in ("RECEIPT", "ERROR"):
            return text


@pytest.mark.parametrize("dest", [ORDERS, BILLING])
@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("op", OPS)
def test_stomp_permission_matrix(server, world, op, persona, dest):
    token = world[persona]
    with connect(f"{server.ws}/ws/stomp/", subprotocols=[Subprotocol("v12.stomp")]) as ws:
        ws.send(_stomp("CONNECT", {"accept-version": "1.2", "host": "pegasus", "passcode": token or "nope"}))
        connected = ws.recv(timeout=WAIT)
        if token is None:
            assert str(connected).startswith("ERROR") and "not_authenticated" in str(connected)
            return
        assert str(connected).startswith("CONNECTED")
        for frame in _stomp_frames(op, dest):
            ws.send(frame)
        answer = _stomp_answer(ws)
    if allowed(persona, dest):
        assert answer.startswith("RECEIPT"), (op, persona, dest, answer[:200])
    else:
        assert answer.startswith("ERROR") and "permission_denied" in answer, (op, persona, dest, answer[:200])


# ---------------------------------------------------------------------- tokens and limits


def _closed_within(ws: ClientConnection, seconds: float) -> tuple[list[str], int | None]:
    """Frames received until the server closed the connection, and its close code."""
    frames: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            frame = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            frames.append(frame if isinstance(frame, str) else frame.decode())
    except (ConnectionClosed, TimeoutError):
        pass
    return frames, ws.close_code


def test_revoking_a_token_closes_its_live_connections(server, alice, token_for):
    raw = token_for(alice)
    other = token_for(alice)
    token = ApiToken.objects.get(key_hash=tokens.hash_token(raw))
    with (
        connect(f"{server.ws}/ws/v1/?token={raw}") as doomed,
        connect(f"{server.ws}/ws/stomp/", subprotocols=[Subprotocol("v12.stomp")]) as stomp,
        connect(f"{server.ws}/ws/v1/?token={other}") as kept,
    ):
        stomp.send(_stomp("CONNECT", {"accept-version": "1.2", "host": "p", "passcode": raw}))
        assert str(stomp.recv(timeout=WAIT)).startswith("CONNECTED")
        time.sleep(0.5)
        started = time.monotonic()
        tokens.revoke(token_ids=[token.pk])
        frames, code = _closed_within(doomed, 10)
        assert code == 4401 and json.loads(frames[-1])["code"] == "not_authenticated"
        stomp_frames, stomp_code = _closed_within(stomp, 10)
        assert stomp_code == 4401 and stomp_frames[-1].startswith("ERROR")
        assert time.monotonic() - started < 10  # "within seconds" (the watcher checks every 2 s)
        kept.send(json.dumps({"op": "begin", "corr": "b"}))
        assert json.loads(kept.recv(timeout=WAIT))["op"] != "error"
    # The server rolls back the open transaction of `kept` when it closes: wait for that, so
    # the test database is not flushed while the server still writes to it.
    eventually(lambda: not Transaction.objects.filter(state="open").exists())
    settle()


@pytest.fixture(scope="module")
def strict_server(daphne_factory):
    return daphne_factory(
        PEGASUS_MAX_CONNECTIONS_PER_USER="2", PEGASUS_PUBLISH_RATE="1", PEGASUS_PUBLISH_BURST="3",
        PEGASUS_RATE_LIMIT_ADMINS="1",
    )  # fmt: skip


def test_connections_per_user_are_limited(strict_server, alice, bob, token_for):
    url = f"{strict_server.ws}/ws/v1/?token="
    with connect(url + token_for(alice)), connect(url + token_for(alice)):
        with pytest.raises(InvalidStatus):
            connect(url + token_for(alice))
        with connect(url + token_for(bob)):  # another user is not affected
            pass
    settle()


def test_a_publish_flood_from_one_token_is_refused_while_another_is_served(strict_server, alice, token_for):
    broker.create_queue(name="flood")
    frame = json.dumps({"op": "publish", "corr": "p", "queue": "flood", "messages": [{"body": "x"}]})
    with connect(f"{strict_server.ws}/ws/v1/?token={token_for(alice)}") as flooder:
        replies = []
        for _ in range(5):
            flooder.send(frame)
            replies.append(_json_reply(flooder))
        assert [r["op"] for r in replies[:3]] == ["published"] * 3
        assert replies[3]["op"] == "error" and replies[3]["code"] == "over_quota"
    with connect(f"{strict_server.ws}/ws/v1/?token={token_for(alice)}") as other:
        other.send(frame)
        assert _json_reply(other)["op"] == "published"
    settle()


def test_json_someone_elses_transaction_does_not_exist(server, world, alice):
    """A transaction id is not a capability either: only its owner (or an admin) may finish it."""
    txn = broker.begin(user=alice).id
    for persona in ("orders_user", "nobody"):
        with connect(f"{server.ws}/ws/v1/?token={world[persona]}") as ws:
            for op in ("prepare", "commit", "rollback"):
                ws.send(json.dumps({"op": op, "corr": "c", "transaction": txn}))
                reply = _json_reply(ws)
                assert reply["op"] == "error" and reply["code"] == "transaction_not_found", (persona, op, reply)
    assert broker.get_transaction(transaction_id=txn).state == "open"
