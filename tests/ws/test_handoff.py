"""Hand-off (messaging/push.py): a commit in this process claims its messages for a waiting push
consumer inside the same transaction and pushes them the moment it commits."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import transaction
from websockets.sync.client import ClientConnection, connect

from messaging import broker, push
from messaging.models import Delivery, State
from tests.threads import in_thread, recording_pusher, until
from tests.ws.conftest import WAIT, Server, settle

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def slow_recheck_server(daphne_factory: Callable[..., Server]) -> Server:
    # A pusher looks on its own only every 30 s: what arrives promptly came by the in-process path.
    return daphne_factory(PEGASUS_WS_RECHECK_SECONDS="30")


@pytest.fixture
def ws(slow_recheck_server: Server, admin_token: str) -> Iterator[ClientConnection]:
    with connect(f"{slow_recheck_server.ws}/ws/v1/?token={admin_token}") as conn:
        yield conn
    settle()


def frames(conn: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(conn.recv(timeout=WAIT)) for _ in range(n)]


def quiet(conn: ClientConnection, seconds: float) -> bool:
    try:
        conn.recv(timeout=seconds)
    except TimeoutError:
        return True
    return False


def test_a_waiting_subscriber_gets_the_message_with_the_commit(ws: ClientConnection, queue_factory: Any) -> None:
    queue_factory("handoff")
    ws.send(json.dumps({"op": "subscribe", "id": "s", "queue": "handoff", "prefetch": 10, "ack": "client"}))
    assert frames(ws, 1)[0]["op"] == "ok"
    assert quiet(ws, 0.3)  # the pusher looked, found nothing and waits
    ws.send(json.dumps({"op": "publish", "corr": "p", "queue": "handoff", "messages": [{"body": "x"}]}))
    # Claimed in the publish's own transaction: pushed at its commit, before the confirm goes out.
    message, confirm = frames(ws, 2)
    assert (message["op"], confirm["op"]) == ("message", "published")
    assert message["message"]["id"] == confirm["messages"][0]["id"]
    assert message["message"]["delivery_count"] == 1 and not message["message"]["redelivered"]
    receipt = message["message"]["receipt"]
    ws.send(json.dumps({"op": "ack", "corr": "a", "receipts": [receipt]}))
    assert frames(ws, 1)[0] == {"op": "ok", "corr": "a", "results": [{"receipt": receipt, "status": "ok"}]}
    assert Delivery.objects.get().state == State.ACKED
    assert quiet(ws, 1.0)  # acked: never delivered again
    # The pusher waits again and the next publish is handed off the same way.
    ws.send(json.dumps({"op": "publish", "corr": "q", "queue": "handoff", "messages": [{"body": "y"}]}))
    assert [f["op"] for f in frames(ws, 2)] == ["message", "published"]


def test_prefetch_limits_what_a_hand_off_claims(ws: ClientConnection, queue_factory: Any) -> None:
    queue_factory("handoff")
    ws.send(json.dumps({"op": "subscribe", "id": "s", "queue": "handoff", "prefetch": 2, "ack": "client"}))
    assert frames(ws, 1)[0]["op"] == "ok"
    assert quiet(ws, 0.3)
    batch = [{"body": str(i)} for i in range(5)]
    ws.send(json.dumps({"op": "publish", "corr": "p", "queue": "handoff", "messages": batch}))
    got = frames(ws, 3)
    assert sorted(f["op"] for f in got) == ["message", "message", "published"]
    assert quiet(ws, 0.5)  # two out unacked: nothing more until an ack
    receipts = [f["message"]["receipt"] for f in got if f["op"] == "message"]
    ws.send(json.dumps({"op": "ack", "corr": "a", "receipts": receipts}))
    after = frames(ws, 3)  # the ack's answer and the two messages the room it made was filled with
    assert sorted(f["op"] for f in after) == ["message", "message", "ok"]
    assert Delivery.objects.filter(state=State.ACKED).count() == 2
    assert Delivery.objects.filter(state=State.LEASED).count() == 2


async def test_a_rolled_back_hand_off_changes_nothing_and_the_pusher_waits_again(queue_factory: Any) -> None:
    queue = await in_thread(queue_factory)("handoff")
    pusher, pushed = recording_pusher(queue)
    try:
        await until(lambda: queue.pk in push._TAKEABLE, WAIT)

        def publish_then_fail() -> None:
            with transaction.atomic():
                broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="never")])
                assert pusher._taken  # claimed for the pusher inside this transaction
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            await in_thread(publish_then_fail)()
        await until(lambda: queue.pk in push._TAKEABLE, WAIT)  # told of the rollback: takeable again
        assert pushed == [] and pusher.unacked == {}
        assert not await in_thread(Delivery.objects.exists)()

        published = await in_thread(broker.publish)(queue=queue, messages=[broker.OutgoingMessage(body="kept")])
        await until(lambda: bool(pushed), WAIT)
        assert [m.id for m in pushed] == [published[0].id] and list(pusher.unacked) == [pushed[0].receipt]
    finally:
        await pusher.stop()
        with contextlib.suppress(Exception):
            await in_thread(broker.nack)(receipts=list(pusher.unacked))
