"""/api/v1/bridges: admins only, the allowed-targets rule, a write-only token, state in answers."""

from __future__ import annotations

from typing import Any

import pytest

from messaging import broker
from messaging.bridges.models import Bridge, BridgeState

from .conftest import TARGET

pytestmark = pytest.mark.django_db

URL = "/api/v1/bridges"


@pytest.fixture
def api(client, alice, token_for):
    token = token_for(alice)

    def call(method: str, path: str = "", body: dict[str, Any] | None = None, token: str | None = token):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return getattr(client, method)(f"{URL}{path}", body, content_type="application/json", headers=headers)

    return call


def _body(**overrides):
    return {"name": "to-dc2", "source_queue": "outbox", "target_url": TARGET, "target_queue": "inbox",
            "target_token": "pgs_api-secret", "batch_size": 50, **overrides}  # fmt: skip


@pytest.fixture
def outbox(queue_factory):
    return queue_factory(name="outbox")


def test_create__answers_201_without_the_token(api, outbox):
    r = api("post", body=_body())
    assert r.status_code == 201, r.content
    out = r.json()
    assert out["name"] == "to-dc2" and out["source_queue"] == "outbox" and out["target_queue"] == "inbox"
    assert out["token_set"] is True and "pgs_api-secret" not in r.content.decode()
    assert out["state"]["status"] == "waiting" and out["state"]["lag"] == 0
    assert Bridge.objects.get(name="to-dc2").target_token == "pgs_api-secret"


def test_create__from_a_durable_subscription_to_a_topic(api, queue_factory):
    topic, _ = broker.create_topic(name="events")
    broker.create_subscription(topic=topic, name="to-dc2", durable=True)
    body = _body(source_queue=None, source_topic="events", source_subscription="to-dc2", target_queue=None,
                 target_topic="events")  # fmt: skip
    out = api("post", body=body).json()
    assert (out["source_topic"], out["source_subscription"], out["target_topic"]) == ("events", "to-dc2", "events")


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"target_url": "http://169.254.169.254"}, 400, "target_not_allowed"),
        ({"source_queue": "missing"}, 404, "queue_not_found"),
        ({"target_queue": None}, 400, "invalid_request"),
        ({"target_topic": "t"}, 400, "invalid_request"),
        ({"batch_size": 5000}, 400, "invalid_request"),
        ({"name": "bad name"}, 400, "invalid_name"),
    ],
)
def test_create__refuses_bad_input_with_the_contract_errors(api, outbox, overrides, status, code):
    r = api("post", body=_body(**overrides))
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert not Bridge.objects.exists()


def test_create__a_taken_name_is_409(api, outbox):
    api("post", body=_body())
    assert api("post", body=_body()).status_code == 409


def test_only_admins(api, outbox, bob, token_for):
    assert api("get", token=None).status_code == 401
    assert api("get", token=token_for(bob)).status_code == 403
    assert api("post", body=_body(), token=token_for(bob)).status_code == 403


def test_list_get_patch_delete(api, outbox):
    api("post", body=_body())
    bridge = Bridge.objects.get(name="to-dc2")
    BridgeState.objects.filter(pk=bridge.pk).update(forwarded_count=7, last_error="target answered 503")
    assert [b["name"] for b in api("get").json()["bridges"]] == ["to-dc2"]
    got = api("get", "/to-dc2").json()
    assert got["state"]["forwarded"] == 7 and got["state"]["last_error"] == "target answered 503"
    patched = api("patch", "/to-dc2", {"enabled": False, "batch_size": 10})
    assert patched.status_code == 200 and patched.json()["enabled"] is False
    assert patched.json()["state"]["status"] == "stopped"
    bridge.refresh_from_db()
    assert (bridge.batch_size, bridge.target_token) == (10, "pgs_api-secret")  # the token was kept
    api("patch", "/to-dc2", {"target_token": "pgs_rotated"})
    bridge.refresh_from_db()
    assert bridge.target_token == "pgs_rotated"
    assert api("patch", "/to-dc2", {"target_url": "http://evil.example"}).status_code == 400
    assert api("delete", "/to-dc2").status_code == 204
    assert api("get", "/to-dc2").status_code == 404


def test_openapi__documents_the_bridges_without_a_readable_token(client):
    schema = client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/bridges", "/api/v1/bridges/{name}"} <= set(schema["paths"])
    assert "target_token" in schema["components"]["schemas"]["BridgeIn"]["properties"]
    assert "target_token" not in schema["components"]["schemas"]["BridgeOut"]["properties"]
