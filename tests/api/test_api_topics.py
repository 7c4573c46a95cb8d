"""Topics and subscriptions over HTTP."""

from __future__ import annotations

import pytest

from messaging import clock
from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db


@pytest.fixture
def topic(admin_api: Api) -> str:
    assert admin_api.post("/topics", {"name": "events"}).status_code == 201
    return "events"


def test_topics__create_get_list_delete(admin_api: Api):
    r = admin_api.post("/topics", {"name": "events"})
    assert r.status_code == 201 and r.json()["name"] == "events" and r.json()["subscriptions"] == []
    assert admin_api.post("/topics", {"name": "events"}).status_code == 200
    assert [t["name"] for t in admin_api.get("/topics").json()["topics"]] == ["events"]
    assert admin_api.get("/topics/events").json()["name"] == "events"
    assert admin_api.delete("/topics/events").status_code == 204
    r = admin_api.get("/topics/events")
    assert r.status_code == 404 and error_code(r) == "topic_not_found"


def test_topics__bad_names_and_fields(admin_api: Api):
    assert error_code(admin_api.post("/topics", {"name": "a b"})) == "invalid_name"
    assert admin_api.post("/topics", {"name": "ok", "extra": 1}).status_code == 400


def test_subscriptions__each_gets_a_copy(user_api: Api, topic: str):
    for name in ("one", "two"):
        r = user_api.post("/topics/events/subscriptions", {"name": name, "durable": True})
        assert r.status_code == 201, r.content
        assert r.json()["topic"] == "events" and r.json()["durable"] is True
    assert user_api.get("/topics/events").json()["subscriptions"] == ["one", "two"]
    assert user_api.post("/topics/events/messages", {"body": "hi"}).status_code == 201
    for name in ("one", "two"):
        got = user_api.post(f"/topics/events/subscriptions/{name}/receive", {}).json()["messages"]
        assert [m["body"] for m in got] == ["hi"]
        assert got[0]["destination"] == f"events/{name}"
        assert user_api.post("/ack", {"receipts": [got[0]["receipt"]]}).status_code == 200


def test_subscriptions__filter(user_api: Api, topic: str):
    r = user_api.post("/topics/events/subscriptions", {"name": "eu", "filter": {"region": ["eu", "uk"]}})
    assert r.json()["filter"] == {"region": ["eu", "uk"]}
    user_api.post("/topics/events/messages", {"messages": [{"body": "a", "headers": {"region": "us"}},
                                                           {"body": "b", "headers": {"region": "uk"}}]})  # fmt: skip
    got = user_api.post("/topics/events/subscriptions/eu/receive", {"max_messages": 5}).json()["messages"]
    assert [m["body"] for m in got] == ["b"]


@pytest.mark.parametrize("flt", [{"region": 5}, {"region": []}, ["region"], {"region": {"in": ["eu"]}}])
def test_subscriptions__bad_filter_is_400(user_api: Api, topic: str, flt):
    assert user_api.post("/topics/events/subscriptions", {"name": "s", "filter": flt}).status_code == 400


def test_subscriptions__same_again_200_other_settings_409(user_api: Api, topic: str):
    assert user_api.post("/topics/events/subscriptions", {"name": "s"}).status_code == 201
    assert user_api.post("/topics/events/subscriptions", {"name": "s"}).status_code == 200
    r = user_api.post("/topics/events/subscriptions", {"name": "s", "durable": False})
    assert r.status_code == 409 and error_code(r) == "name_taken"


def test_subscriptions__non_durable_expires_without_receives(user_api: Api, topic: str, bob):
    r = user_api.post("/topics/events/subscriptions", {"name": "tmp", "durable": False, "expires_after_seconds": 60})
    assert r.json()["durable"] is False and r.json()["expires_after_seconds"] == 60 and r.json()["expires_at"]
    clock.advance(30)
    user_api.post("/topics/events/subscriptions/tmp/receive", {})  # keeps it alive
    clock.advance(45)
    from messaging import broker

    broker.run_maintenance()
    assert user_api.get("/topics/events/subscriptions/tmp").status_code == 200
    clock.advance(61)
    broker.run_maintenance()
    r = user_api.get("/topics/events/subscriptions/tmp")
    assert r.status_code == 404 and error_code(r) == "subscription_not_found"


def test_subscriptions__list_get_purge_delete_browse(admin_api: Api, topic: str):
    admin_api.post("/topics/events/subscriptions", {"name": "s", "max_deliveries": 2})
    admin_api.post("/topics/events/messages", {"messages": [{"body": "a"}, {"body": "b"}]})
    [sub] = admin_api.get("/topics/events/subscriptions").json()["subscriptions"]
    assert sub["name"] == "s" and sub["depth"] == 2 and sub["max_deliveries"] == 2
    assert [m["body"] for m in admin_api.get("/topics/events/subscriptions/s/messages").json()["messages"]] == [
        "a",
        "b",
    ]
    assert admin_api.post("/topics/events/subscriptions/s/purge").json() == {"purged": 2}
    assert admin_api.delete("/topics/events/subscriptions/s").status_code == 204
    assert admin_api.get("/topics/events/subscriptions/s").status_code == 404


def test_subscriptions__unknown_topic_is_404(user_api: Api):
    r = user_api.post("/topics/nope/subscriptions", {"name": "s"})
    assert r.status_code == 404 and error_code(r) == "topic_not_found"
    r = user_api.post("/topics/nope/subscriptions/s/receive", {})
    assert r.status_code == 404 and error_code(r) == "topic_not_found"


def test_subscriptions__members_may_not_purge_or_browse(user_api: Api, topic: str):
    user_api.post("/topics/events/subscriptions", {"name": "s"})
    assert user_api.post("/topics/events/subscriptions/s/purge").status_code == 403
    assert user_api.get("/topics/events/subscriptions/s/messages").status_code == 403
    assert user_api.delete("/topics/events").status_code == 403


def test_topic_publish__without_subscriptions_is_accepted(user_api: Api, topic: str):
    r = user_api.post("/topics/events/messages", {"body": "into the void"})
    assert r.status_code == 201 and len(r.json()["messages"]) == 1
