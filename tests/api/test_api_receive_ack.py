"""A receive that carries `ack`: the receipts are acked in the same commit as the next lease.

One request and one commit per batch instead of an /ack and a receive (docs/rest.md). Each part
keeps its own contract: the statuses are /ack's, the messages receive's, and an error in either
changes nothing at all.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import close_old_connections

from messaging import clock
from messaging.models import Delivery, State
from messaging.schemas import ReceivedOut
from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db


@pytest.fixture
def q(admin_api: Api) -> str:
    assert admin_api.post("/queues", {"name": "q"}).status_code == 201
    assert admin_api.post("/queues", {"name": "other"}).status_code == 201
    return "q"


def _publish(api: Api, *bodies: str, queue: str = "q") -> None:
    r = api.post(f"/queues/{queue}/messages", {"messages": [{"body": b} for b in bodies]})
    assert r.status_code == 201, r.content


def _receive(api: Api, queue: str = "q", **payload: Any) -> Any:
    return api.post(f"/queues/{queue}/receive", payload)


def test_receive_with_ack__acks_the_old_batch_and_leases_the_next(user_api: Api, q: str):
    _publish(user_api, "a", "b", "c", "d")
    first = _receive(user_api, max_messages=2).json()["messages"]
    receipts = [m["receipt"] for m in first]
    r = _receive(user_api, max_messages=2, ack=receipts)
    assert r.status_code == 200, r.content
    answer = r.json()
    assert [m["body"] for m in answer["messages"]] == ["c", "d"]
    assert answer["acked"] == [{"receipt": rc, "status": "ok"} for rc in receipts]
    stats = user_api.get("/queues/q").json()
    assert (stats["depth"], stats["in_flight"]) == (0, 2)  # a and b acked, c and d leased
    assert sorted(Delivery.objects.filter(state=State.ACKED).values_list("message__body", flat=True)) == ["a", "b"]


def test_receive_without_ack__answers_exactly_as_before(user_api: Api, q: str):
    _publish(user_api, "a")
    answer = _receive(user_api).json()
    assert set(answer) == {"messages"}
    assert answer["messages"][0]["expires_at"] is None  # unset-looking fields are still there
    assert set(answer["messages"][0]) == set(ReceivedOut.model_fields)
    assert _receive(user_api).json() == {"messages": []}


def test_receive_with_ack__statuses_in_order_and_stale_ones_are_no_error(user_api: Api, q: str):
    _publish(user_api, "a", "b")
    [a] = _receive(user_api).json()["messages"]
    assert user_api.post("/ack", {"receipts": [a["receipt"]]}).status_code == 200
    sent = ["d999999.nope", a["receipt"], "garbage"]
    r = _receive(user_api, ack=sent)
    assert r.status_code == 200, r.content  # /ack would answer 409 to all-stale; here messages still come
    assert [x["status"] for x in r.json()["acked"]] == ["stale_receipt", "ok", "stale_receipt"]  # repeat: ok
    assert [x["receipt"] for x in r.json()["acked"]] == sent
    assert [m["body"] for m in r.json()["messages"]] == ["b"]


def test_receive_with_ack__empty_list_acks_nothing(user_api: Api, q: str):
    _publish(user_api, "a")
    r = _receive(user_api, ack=[])
    assert r.json()["acked"] == [] and [m["body"] for m in r.json()["messages"]] == ["a"]


def test_receive_with_ack__of_an_expired_lease_is_stale_and_the_message_comes_again(user_api: Api, q: str):
    _publish(user_api, "a")
    [a] = _receive(user_api, visibility_timeout_seconds=5).json()["messages"]
    clock.advance(6)
    answer = _receive(user_api, ack=[a["receipt"]]).json()
    assert answer["acked"][0]["status"] == "stale_receipt"
    [again] = answer["messages"]
    assert again["id"] == a["id"] and again["redelivered"] and again["delivery_count"] == 2


def test_receive_with_ack__refused_ack_changes_nothing(bob: Any, api_for: Any, grant: Any, admin_api: Api, q: str):
    # bob may consume from q but not from `other`: an ack of other's receipt is refused, and the
    # whole request with it: nothing acked, nothing leased.
    grant(bob, "q", "send", "consume")
    bob_api = api_for(bob)
    _publish(admin_api, "theirs", queue="other")
    _publish(admin_api, "mine")
    [theirs] = _receive(admin_api, queue="other").json()["messages"]
    r = _receive(bob_api, ack=[theirs["receipt"]])
    assert r.status_code == 403, r.content
    assert error_code(r) == "permission_denied"
    assert admin_api.get("/queues/q").json()["depth"] == 1  # nothing leased
    assert Delivery.objects.get(message__body="theirs").state == State.LEASED  # nothing acked


def test_receive_with_ack__refused_receive_acks_nothing(bob: Any, api_for: Any, grant: Any, admin_api: Api, q: str):
    grant(bob, "other", "consume")  # bob may consume from `other` only
    bob_api = api_for(bob)
    _publish(admin_api, "x", queue="other")
    [x] = _receive(bob_api, queue="other").json()["messages"]
    r = _receive(bob_api, queue="q", ack=[x["receipt"]])
    assert r.status_code == 403 and error_code(r) == "permission_denied"
    assert Delivery.objects.get(message__body="x").state == State.LEASED


@pytest.mark.parametrize(
    "payload",
    [{"ack": "d1.x"}, {"ack": [5]}, {"ack": ["d1.x"] * 1001}, {"ack": ["x" * 201]}, {"ack": None, "extra": 1}],
)
def test_receive_with_ack__bad_input_is_a_400(user_api: Api, q: str, payload: dict[str, Any]):
    r = _receive(user_api, **payload)
    assert r.status_code == 400, r.content
    assert "error" in r.json()


@pytest.mark.django_db(transaction=True)
def test_receive_with_ack__commits_the_acks_before_it_waits(user_api: Api, q: str):
    """A long poll that carries acks commits them at once, not when its wait ends."""
    _publish(user_api, "a")
    [a] = _receive(user_api).json()["messages"]
    answers: list[Any] = []

    def poll() -> None:
        answers.append(_receive(user_api, wait_seconds=3, ack=[a["receipt"]]))
        close_old_connections()

    waiting = threading.Thread(target=poll)
    waiting.start()
    try:
        deadline = time.monotonic() + 2.5
        while Delivery.objects.get(message__body="a").state != State.ACKED:
            assert time.monotonic() < deadline, "ack not committed while the receive waits"
            time.sleep(0.02)
        assert waiting.is_alive()  # still waiting for a message
    finally:
        waiting.join()
    assert answers[0].json() == {"messages": [], "acked": [{"receipt": a["receipt"], "status": "ok"}]}
