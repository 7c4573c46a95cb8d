"""Publishing, receiving, ack/nack/extend over HTTP, and every input error on the way."""

from __future__ import annotations

import json

import pytest

from messaging import clock
from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db


@pytest.fixture
def q(admin_api: Api) -> str:
    assert admin_api.post("/queues", {"name": "q"}).status_code == 201
    return "q"


def _depth(api: Api, queue: str = "q") -> int:
    return int(api.get(f"/queues/{queue}").json()["depth"])


def test_publish_receive_ack__the_whole_round(user_api: Api, q: str):
    r = user_api.post(
        "/queues/q/messages",
        {"body": "hello", "headers": {"k": "v"}, "priority": 7, "content_type": "text/plain", "ttl_seconds": 60},
    )
    assert r.status_code == 201, r.content
    [published] = r.json()["messages"]
    assert published["duplicate"] is False and published["id"].isdigit()
    [m] = user_api.post("/queues/q/receive", {"visibility_timeout_seconds": 30}).json()["messages"]
    assert m["id"] == published["id"] and m["body"] == "hello" and m["headers"] == {"k": "v"}
    assert (m["priority"], m["content_type"], m["durable"], m["destination"]) == (7, "text/plain", True, "q")
    assert m["delivery_count"] == 1 and m["redelivered"] is False and m["receipt"] and m["expires_at"]
    r = user_api.post("/ack", {"receipts": [m["receipt"]]})
    assert r.status_code == 200 and r.json() == {"results": [{"receipt": m["receipt"], "status": "ok"}]}
    assert user_api.post("/ack", {"receipts": [m["receipt"]]}).json()["results"][0]["status"] == "ok"  # a retry
    assert user_api.get("/queues/q").json()["in_flight"] == 0


def test_receive__without_a_body_and_when_empty(user_api: Api, q: str):
    assert user_api.post("/queues/q/receive").json() == {"messages": []}
    user_api.post("/queues/q/messages", {"body": "x"})
    assert [m["body"] for m in user_api.post("/queues/q/receive").json()["messages"]] == ["x"]


def test_publish__batch_in_order_and_non_durable_ids(user_api: Api, q: str):
    r = user_api.post("/queues/q/messages", {"messages": [{"body": "a"}, {"body": "b", "durable": False}]})
    ids = [m["id"] for m in r.json()["messages"]]
    assert ids[0].isdigit() and ids[1].startswith("t")
    got = user_api.post("/queues/q/receive", {"max_messages": 10}).json()["messages"]
    assert [(m["body"], m["durable"]) for m in got] == [("a", True), ("b", False)]


def test_publish__duplicate_answers_the_first_id(user_api: Api, q: str):
    first = user_api.post("/queues/q/messages", {"body": "a", "dedup_id": "order-1"}).json()["messages"][0]
    again = user_api.post("/queues/q/messages", {"body": "a", "dedup_id": "order-1"})
    assert again.status_code == 201
    assert again.json()["messages"] == [{"id": first["id"], "duplicate": True}]
    assert _depth(user_api) == 1


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({}, "invalid_request"),
        ({"body": 5}, "invalid_request"),
        ({"body": None}, "invalid_request"),
        ({"body": "x", "priority": 10}, "invalid_request"),
        ({"body": "x", "priority": "5"}, "invalid_request"),
        ({"body": "x", "durable": "yes"}, "invalid_request"),
        ({"body": "x", "headers": {"k": 1}}, "invalid_request"),
        ({"body": "x", "headers": ["k"]}, "invalid_request"),
        ({"body": "x", "delay_seconds": -1}, "invalid_request"),
        ({"body": "x", "ttl_seconds": 0}, "invalid_request"),
        ({"body": "x", "dedup_id": ""}, "invalid_request"),
        ({"body": "x", "colour": "red"}, "invalid_request"),
        ({"body": "x\u0000y"}, "invalid_request"),
        ({"body": "x", "headers": {"k\u0000": "v"}}, "invalid_request"),
        ({"body": "x", "messages": [{"body": "y"}]}, "invalid_request"),
        ({"messages": []}, "invalid_request"),
        ({"messages": [{"body": "ok"}, {"body": "bad", "priority": 99}]}, "invalid_request"),
        ({"messages": [{"body": "x"}] * 1001}, "batch_too_large"),
    ],
)
def test_publish__bad_input_is_400_and_nothing_is_written(user_api: Api, q: str, payload, code):
    r = user_api.post("/queues/q/messages", payload)
    assert r.status_code == 400, r.content
    assert error_code(r) == code
    assert _depth(user_api) == 0


def test_publish__lone_surrogates_and_nonfinite_numbers_are_400(user_api: Api, q: str):
    for raw in ('{"body": "\\ud800"}', '{"body": "x", "delay_seconds": NaN}', '{"body": "x", "ttl_seconds": Infinity}'):
        r = user_api.post("/queues/q/messages", raw=raw)
        assert r.status_code == 400, (raw, r.content)
    assert _depth(user_api) == 0


def test_publish__a_batch_of_1000_is_fine(user_api: Api, q: str):
    r = user_api.post("/queues/q/messages", {"messages": [{"body": str(i)} for i in range(1000)]})
    assert r.status_code == 201 and len(r.json()["messages"]) == 1000


def test_publish__message_over_the_destination_limit_is_413(admin_api: Api, user_api: Api):
    admin_api.post("/queues", {"name": "small", "max_message_bytes": 10})
    r = user_api.post("/queues/small/messages", {"messages": [{"body": "fits"}, {"body": "x" * 11}]})
    assert r.status_code == 413 and error_code(r) == "message_too_large"
    assert _depth(user_api, "small") == 0
    assert user_api.post("/queues/small/messages", {"body": "é" * 5}).status_code == 201  # 10 bytes


def test_publish__default_limit_is_one_mebibyte(user_api: Api, q: str):
    assert user_api.post("/queues/q/messages", {"body": "x" * (1024 * 1024)}).status_code == 201
    r = user_api.post("/queues/q/messages", {"body": "x" * (1024 * 1024 + 1)})
    assert r.status_code == 413 and error_code(r) == "message_too_large"


def test_publish__request_over_the_total_limit_is_413(user_api: Api, q: str, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    r = user_api.post("/queues/q/messages", {"body": "x" * 2000})
    assert r.status_code == 413 and error_code(r) == "request_too_large"
    assert _depth(user_api) == 0


def test_publish__unknown_queue_is_404(user_api: Api):
    r = user_api.post("/queues/nope/messages", {"body": "x"})
    assert r.status_code == 404 and error_code(r) == "queue_not_found"


def test_publish__delayed_message_is_scheduled(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "later", "delay_seconds": 30})
    assert user_api.post("/queues/q/receive").json()["messages"] == []
    clock.advance(31)
    assert [m["body"] for m in user_api.post("/queues/q/receive").json()["messages"]] == ["later"]


def test_ack__stale_receipt_is_409(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "x"})
    first = user_api.post("/queues/q/receive", {"visibility_timeout_seconds": 1}).json()["messages"][0]
    clock.advance(2)
    second = user_api.post("/queues/q/receive").json()["messages"][0]
    assert second["redelivered"] is True and second["delivery_count"] == 2
    r = user_api.post("/ack", {"receipts": [first["receipt"]]})
    assert r.status_code == 409 and error_code(r) == "stale_receipt"
    r = user_api.post("/ack", {"receipts": [first["receipt"], second["receipt"]]})
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == ["stale_receipt", "ok"]


@pytest.mark.parametrize(
    "payload",
    [{}, {"receipts": []}, {"receipts": "abc"}, {"receipts": [1]}, {"receipts": ["x"] * 1001}, {"receipt": ["x"]}],
)
def test_ack__bad_input_is_400(user_api: Api, payload):
    r = user_api.post("/ack", payload)
    assert r.status_code == 400 and error_code(r) == "invalid_request"


def test_ack__garbage_receipts_are_stale(user_api: Api):
    r = user_api.post("/ack", {"receipts": ["nonsense", "d999.abc", "t1.x"]})
    assert r.status_code == 409 and error_code(r) == "stale_receipt"


def test_nack__redelivers_after_the_delay(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "x"})
    m = user_api.post("/queues/q/receive").json()["messages"][0]
    r = user_api.post("/nack", {"receipts": [m["receipt"]], "delay_seconds": 10})
    assert r.json()["results"] == [{"receipt": m["receipt"], "status": "ok"}]
    assert user_api.post("/queues/q/receive").json()["messages"] == []
    clock.advance(11)
    again = user_api.post("/queues/q/receive").json()["messages"][0]
    assert again["redelivered"] and again["delivery_count"] == 2
    assert user_api.post("/nack", {"receipts": [m["receipt"]]}).status_code == 409
    assert user_api.post("/nack", {"receipts": [again["receipt"]], "delay_seconds": -1}).status_code == 400


def test_extend__keeps_the_lease(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "x"})
    m = user_api.post("/queues/q/receive", {"visibility_timeout_seconds": 5}).json()["messages"][0]
    r = user_api.post("/extend", {"receipts": [m["receipt"]], "visibility_timeout_seconds": 60})
    assert r.json()["results"][0]["status"] == "ok"
    clock.advance(30)
    assert user_api.post("/queues/q/receive").json()["messages"] == []
    assert user_api.post("/ack", {"receipts": [m["receipt"]]}).status_code == 200
    assert user_api.post("/extend", {"receipts": [m["receipt"]]}).status_code == 400  # timeout is required


@pytest.mark.parametrize(
    "payload",
    [
        {"max_messages": 0},
        {"max_messages": 1001},
        {"max_messages": "2"},
        {"wait_seconds": 21},
        {"wait_seconds": -1},
        {"visibility_timeout_seconds": 0},
        {"visibility_timeout_seconds": 43201},
        {"max_message": 2},
    ],
)
def test_receive__bad_input_is_400(user_api: Api, q: str, payload):
    r = user_api.post("/queues/q/receive", payload)
    assert r.status_code == 400 and error_code(r) == "invalid_request"


def test_receive__unknown_queue_is_404(user_api: Api):
    assert user_api.post("/queues/nope/receive", {}).status_code == 404


def test_receive__max_messages_and_priority_order(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"messages": [{"body": "low", "priority": 1}, {"body": "high", "priority": 9}]})
    user_api.post("/queues/q/messages", {"body": "mid"})
    got = user_api.post("/queues/q/receive", {"max_messages": 2}).json()["messages"]
    assert [m["body"] for m in got] == ["high", "mid"]


def test_binary_bodies_travel_as_base64(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "AAEC/w==", "content_type": "application/octet-stream;base64"})
    m = user_api.post("/queues/q/receive").json()["messages"][0]
    assert (m["body"], m["content_type"]) == ("AAEC/w==", "application/octet-stream;base64")


def test_errors_are_json_with_the_contract_shape(user_api: Api):
    r = user_api.post("/queues/nope/messages", raw=json.dumps({"body": "x"}))
    assert r["Content-Type"].startswith("application/json")
    assert error_code(r) == "queue_not_found"
