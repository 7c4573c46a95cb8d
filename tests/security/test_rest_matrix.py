"""The REST permission matrix, tried as an attacker would: every endpoint, against four personas
(admin; a user allowed everything on `orders.*`; a user allowed nothing; no token), on a
destination inside `orders.*` and one outside. The exact allowed set is asserted, so an
unauthorised success fails the test, and so does a refusal of something allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from django.test import Client

from messaging import broker

pytestmark = pytest.mark.django_db

PERSONAS = ("admin", "orders_user", "nobody", "anonymous")
ORDERS, BILLING = "orders.eu", "billing"


@dataclass(frozen=True)
class Op:
    name: str
    method: str
    path: str  # {q} queue, {t} topic, {s} subscription
    action: str  # send | consume | browse | manage | list | any (authenticated) | admin
    body: Any = None


OPS = [
    Op("create queue", "post", "/queues", "manage", {"name": "{q}-new"}),
    Op("list queues", "get", "/queues", "list"),
    Op("get queue", "get", "/queues/{q}", "consume"),
    Op("delete queue", "delete", "/queues/{q}", "manage"),
    Op("purge queue", "post", "/queues/{q}/purge", "manage"),
    Op("browse queue", "get", "/queues/{q}/messages", "browse"),
    Op("redrive queue", "post", "/queues/{q}/redrive", "manage", {}),
    Op("publish to queue", "post", "/queues/{q}/messages", "send", {"body": "x"}),
    Op("receive from queue", "post", "/queues/{q}/receive", "consume", {}),
    Op("ack", "post", "/ack", "consume", "receipt"),
    Op("nack", "post", "/nack", "consume", "receipt"),
    Op("extend", "post", "/extend", "consume", "receipt-extend"),
    Op("create topic", "post", "/topics", "manage", {"name": "{t}-new"}),
    Op("list topics", "get", "/topics", "list"),
    Op("get topic", "get", "/topics/{t}", "consume"),
    Op("delete topic", "delete", "/topics/{t}", "manage"),
    Op("publish to topic", "post", "/topics/{t}/messages", "send", {"body": "x"}),
    Op("create subscription", "post", "/topics/{t}/subscriptions", "consume", {"name": "mine", "durable": True}),
    Op("list subscriptions", "get", "/topics/{t}/subscriptions", "consume"),
    Op("get subscription", "get", "/topics/{t}/subscriptions/s", "consume"),
    Op("delete subscription", "delete", "/topics/{t}/subscriptions/s", "consume"),
    Op("purge subscription", "post", "/topics/{t}/subscriptions/s/purge", "manage"),
    Op("browse subscription", "get", "/topics/{t}/subscriptions/s/messages", "browse"),
    Op("receive from subscription", "post", "/topics/{t}/subscriptions/s/receive", "consume", {}),
    Op("begin transaction", "post", "/transactions", "any"),
    Op("list transactions", "get", "/transactions", "any"),
    Op("commit admin's transaction", "post", "/transactions/{txn}/commit", "admin"),
    Op("rollback admin's transaction", "post", "/transactions/{txn}/rollback", "admin"),
    Op("list bridges", "get", "/bridges", "admin"),
]


@pytest.fixture
def world(alice, bob, mallory, grant, token_for):
    """Queues orders.eu and billing, topics orders.eu and billing with subscription s, a
    message in each, and a token per persona."""
    grant(bob, "orders.*", "send", "consume", "browse", "manage")
    for name in (ORDERS, BILLING):
        queue, _ = broker.create_queue(name=name)
        broker.publish(queue=queue, messages=[broker.OutgoingMessage(body="q")])
        topic, _ = broker.create_topic(name=name)
        broker.create_subscription(topic=topic, name="s")
        broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="t")])
    return {
        "admin": token_for(alice),
        "orders_user": token_for(bob),
        "nobody": token_for(mallory),
        "anonymous": None,
        "txn": broker.begin(user=alice).id,
    }


def allowed(op: Op, persona: str, dest: str) -> bool:
    if persona == "anonymous":
        return False
    if persona == "admin":
        return True
    if op.action in ("any", "list"):
        return True
    if op.action == "admin":
        return False
    return persona == "orders_user" and dest == ORDERS


def _call(op: Op, token: str | None, dest: str, world: dict[str, Any]) -> Any:
    client = Client(headers={"Authorization": f"Bearer {token}"} if token else {})
    path = "/api/v1" + op.path.format(q=dest, t=dest, txn=world["txn"])
    body = op.body
    if isinstance(body, str) and body.startswith("receipt"):
        # a receipt the admin holds on `dest`: a stolen receipt is not permission to consume
        queue = broker.get_queue(name=dest)
        [leased] = broker.receive(queue=queue)
        body = {"receipts": [leased.receipt]}
        if body and op.body == "receipt-extend":
            body["visibility_timeout_seconds"] = 60
    elif isinstance(body, dict):
        body = {k: v.format(q=dest, t=dest) if isinstance(v, str) else v for k, v in body.items()}
    if op.method == "get":
        return client.get(path)
    if op.method == "delete":
        return client.delete(path)
    return client.post(path, body if body is not None else {}, content_type="application/json")


@pytest.mark.parametrize("dest", [ORDERS, BILLING])
@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_rest_permission_matrix(op, persona, dest, world):
    response = _call(op, world[persona], dest, world)
    status = response.status_code
    if allowed(op, persona, dest):
        assert 200 <= status < 300, (op.name, persona, dest, status, response.content[:200])
    elif persona == "anonymous":
        assert status == 401, (op.name, dest, status)
        assert response.json()["error"]["code"] == "not_authenticated"
    elif op.action == "admin" and op.path.startswith("/transactions"):
        assert status == 404, (op.name, persona, status)  # someone else's transaction does not exist for you
    else:
        assert status == 403, (op.name, persona, dest, status, response.content[:200])
        assert response.json()["error"]["code"] == "permission_denied"


def test_lists_show_only_permitted_destinations(world):
    client = Client(headers={"Authorization": f"Bearer {world['orders_user']}"})
    assert [q["name"] for q in client.get("/api/v1/queues").json()["queues"]] == [ORDERS]
    assert [t["name"] for t in client.get("/api/v1/topics").json()["topics"]] == [ORDERS]
    nobody = Client(headers={"Authorization": f"Bearer {world['nobody']}"})
    assert nobody.get("/api/v1/queues").json()["queues"] == []


def test_refused_operations_change_nothing(world):
    client = Client(headers={"Authorization": f"Bearer {world['orders_user']}"})
    client.post("/api/v1/queues/billing/purge")
    client.delete("/api/v1/queues/billing")
    client.post("/api/v1/queues/billing/messages", {"body": "sneaky"}, content_type="application/json")
    queue = broker.get_queue(name=BILLING)
    assert [m.body for m in broker.receive(queue=queue, max_messages=10)] == ["q"]
