"""Queues over HTTP: create, list, inspect, delete, purge, redrive, browse; auth and input errors."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db


def test_create_queue__201_then_200_for_the_same_settings_then_409(admin_api: Api):
    r = admin_api.post("/queues", {"name": "orders", "max_deliveries": 3})
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["name"] == "orders" and body["max_deliveries"] == 3 and body["depth"] == 0
    assert admin_api.post("/queues", {"name": "orders", "max_deliveries": 3}).status_code == 200
    assert admin_api.post("/queues", {"name": "orders"}).status_code == 200  # nothing explicit differs
    r = admin_api.post("/queues", {"name": "orders", "max_deliveries": 4})
    assert r.status_code == 409 and error_code(r) == "name_taken"


def test_create_queue__with_every_setting(admin_api: Api):
    assert admin_api.post("/queues", {"name": "dlq"}).status_code == 201
    settings = {
        "max_deliveries": 2, "visibility_timeout_seconds": 60, "dead_letter_queue": "dlq",
        "dedup_window_seconds": 0, "max_message_bytes": 100, "expired_action": "dead_letter",
    }  # fmt: skip
    r = admin_api.post("/queues", {"name": "work", **settings})
    assert r.status_code == 201, r.content
    assert {k: r.json()[k] for k in settings} == settings


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"name": "bad name"}, "invalid_name"),
        ({"name": "-dash-first"}, "invalid_name"),
        ({"name": "x" * 201}, "invalid_request"),
        ({"name": "ok", "dead_letter_queue": "no/slash"}, "invalid_name"),
        ({"name": 5}, "invalid_request"),
        ({}, "invalid_request"),
        ({"name": "ok", "max_deliveries": "3"}, "invalid_request"),  # strict: no "3" -> 3
        ({"name": "ok", "max_deliveries": True}, "invalid_request"),
        ({"name": "ok", "max_deliveries": 0}, "invalid_request"),
        ({"name": "ok", "max_deliveries": 10**20}, "invalid_request"),
        ({"name": "ok", "visibility_timeout_seconds": 43201}, "invalid_request"),
        ({"name": "ok", "max_message_bytes": 10**12}, "invalid_request"),
        ({"name": "ok", "expired_action": "explode"}, "invalid_request"),
        ({"name": "ok", "max_delivery": 3}, "invalid_request"),  # a typo is not silently ignored
        ([1, 2], "invalid_request"),
    ],
)
def test_create_queue__bad_input_is_400(admin_api: Api, payload, code):
    r = admin_api.post("/queues", payload)
    assert r.status_code == 400, r.content
    assert error_code(r) == code
    assert admin_api.get("/queues").json()["queues"] == []  # nothing half-written


def test_create_queue__unknown_dead_letter_queue_is_404(admin_api: Api):
    r = admin_api.post("/queues", {"name": "work", "dead_letter_queue": "nope"})
    assert r.status_code == 404 and error_code(r) == "queue_not_found"


@pytest.mark.parametrize("raw", ["{", "not json", '{"name": "a",}', "\xff"])
def test_bad_json_is_400(admin_api: Api, raw):
    r = admin_api.post("/queues", raw=raw.encode("latin-1"))
    assert r.status_code == 400 and error_code(r) == "invalid_request"


def test_auth__no_token_bad_token_and_other_schemes_are_401(api_for, admin_api: Api):
    for client in (api_for(None), Api("pgs_not-a-real-token")):
        r = client.get("/queues")
        assert r.status_code == 401 and error_code(r) == "not_authenticated"
        assert r["WWW-Authenticate"] == "Bearer"
    r = Api(None).client.get("/api/v1/queues", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert r.status_code == 401


def test_auth__inactive_user_is_401(bob, user_api: Api):
    bob.is_active = False
    bob.save()
    assert user_api.get("/queues").status_code == 401


def test_permissions__members_may_not_manage(user_api: Api, admin_api: Api):
    for path, payload in [("/queues", {"name": "mine"}), ("/topics", {"name": "mine"})]:
        r = user_api.post(path, payload)
        assert r.status_code == 403 and error_code(r) == "permission_denied"
    admin_api.post("/queues", {"name": "q"})
    assert user_api.delete("/queues/q").status_code == 403
    assert user_api.post("/queues/q/purge").status_code == 403
    assert user_api.post("/queues/q/redrive").status_code == 403
    assert user_api.get("/queues/q/messages").status_code == 403
    assert user_api.get("/queues/q").status_code == 200  # but may look at what they consume


def test_get_queue__stats(admin_api: Api, user_api: Api):
    admin_api.post("/queues", {"name": "q"})
    user_api.post("/queues/q/messages", {"messages": [{"body": "a"}, {"body": "b"}, {"body": "c"}]})
    user_api.post("/queues/q/messages", {"body": "later", "delay_seconds": 60})
    user_api.post("/queues/q/receive", {})
    stats = user_api.get("/queues/q").json()
    assert (stats["depth"], stats["in_flight"], stats["scheduled"]) == (2, 1, 1)
    assert stats["dead_lettered"] == 0 and stats["consumers"] == 0 and stats["oldest_age_seconds"] >= 0


def test_get_queue__unknown_is_404_and_bad_name_is_400(admin_api: Api):
    r = admin_api.get("/queues/nope")
    assert r.status_code == 404 and error_code(r) == "queue_not_found"
    r = admin_api.get("/queues/.hidden")
    assert r.status_code == 400 and error_code(r) == "invalid_name"


def test_list_queues(admin_api: Api, user_api: Api):
    for name in ("b", "a"):
        admin_api.post("/queues", {"name": name})
    assert [q["name"] for q in user_api.get("/queues").json()["queues"]] == ["a", "b"]


def test_delete_queue__204_with_its_messages_then_404(admin_api: Api):
    admin_api.post("/queues", {"name": "q"})
    admin_api.post("/queues/q/messages", {"body": "x"})
    assert admin_api.delete("/queues/q").status_code == 204
    assert admin_api.get("/queues/q").status_code == 404
    assert admin_api.delete("/queues/q").status_code == 404


def test_purge_queue(admin_api: Api):
    admin_api.post("/queues", {"name": "q"})
    admin_api.post("/queues/q/messages", {"messages": [{"body": "a"}, {"body": "b"}]})
    assert admin_api.post("/queues/q/purge").json() == {"purged": 2}
    assert admin_api.get("/queues/q").json()["depth"] == 0


def test_redrive__moves_dead_letters_back(admin_api: Api):
    admin_api.post("/queues", {"name": "dlq"})
    admin_api.post("/queues", {"name": "work", "max_deliveries": 1, "dead_letter_queue": "dlq"})
    admin_api.post("/queues/work/messages", {"messages": [{"body": "a"}, {"body": "b"}]})
    received = admin_api.post("/queues/work/receive", {"max_messages": 2}).json()["messages"]
    admin_api.post("/nack", {"receipts": [m["receipt"] for m in received]})
    assert admin_api.get("/queues/dlq").json()["depth"] == 2
    assert admin_api.get("/queues/work").json()["dead_lettered"] == 2
    assert admin_api.post("/queues/dlq/redrive", {"max_messages": 1}).json() == {"moved": 1}
    assert admin_api.post("/queues/dlq/redrive").json() == {"moved": 1}
    assert admin_api.get("/queues/work").json()["depth"] == 2
    r = admin_api.post("/queues/dlq/redrive", {"max_messages": 0})
    assert r.status_code == 400


def test_browse__pages_by_cursor_without_consuming(admin_api: Api):
    admin_api.post("/queues", {"name": "q"})
    admin_api.post("/queues/q/messages", {"messages": [{"body": str(i)} for i in range(5)]})
    page = admin_api.get("/queues/q/messages", limit=3).json()
    assert [m["body"] for m in page["messages"]] == ["0", "1", "2"] and page["next"]
    rest = admin_api.get("/queues/q/messages", limit=3, after=page["next"]).json()
    assert [m["body"] for m in rest["messages"]] == ["3", "4"] and rest["next"] is None
    assert admin_api.get("/queues/q").json()["depth"] == 5
    assert admin_api.get("/queues/q/messages", state="in_flight").json()["messages"] == []
    assert admin_api.get("/queues/q/messages", state="bogus").status_code == 400
    assert admin_api.get("/queues/q/messages", limit=0).status_code == 400


def test_permissions__a_user_without_rules_may_do_nothing(mallory, api_for, admin_api: Api):
    admin_api.post("/queues", {"name": "q"})
    mallory_api = api_for(mallory)
    assert mallory_api.post("/queues/q/messages", {"body": "x"}).status_code == 403
    assert mallory_api.post("/queues/q/receive", {}).status_code == 403
    assert mallory_api.get("/queues/q").status_code == 403
    assert mallory_api.get("/queues").json() == {"queues": []}
