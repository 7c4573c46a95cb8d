"""The one error mapping (pegasus_site/api.py), the request body limit, and the OpenAPI docs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import DataError, InterfaceError, OperationalError
from django.test import Client

from messaging import access
from pegasus_site.bodylimit import BodyLimit
from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db

# Every operation of the contract (docs/API.md, "REST").
CONTRACT = {
    ("post", "/queues"), ("get", "/queues"), ("get", "/queues/{name}"), ("delete", "/queues/{name}"),
    ("post", "/queues/{name}/purge"), ("get", "/queues/{name}/messages"), ("post", "/queues/{name}/redrive"),
    ("post", "/topics"), ("get", "/topics"), ("get", "/topics/{name}"), ("delete", "/topics/{name}"),
    ("post", "/topics/{topic}/subscriptions"), ("get", "/topics/{topic}/subscriptions/{name}"),
    ("delete", "/topics/{topic}/subscriptions/{name}"), ("post", "/topics/{topic}/subscriptions/{name}/purge"),
    ("post", "/queues/{name}/messages"), ("post", "/topics/{name}/messages"), ("post", "/queues/{name}/receive"),
    ("post", "/topics/{topic}/subscriptions/{name}/receive"), ("post", "/ack"), ("post", "/nack"),
    ("post", "/extend"), ("post", "/transactions"), ("post", "/transactions/{id}/prepare"),
    ("post", "/transactions/{id}/commit"), ("post", "/transactions/{id}/rollback"), ("get", "/transactions"),
}  # fmt: skip


def test_openapi__lists_every_contract_operation_with_declared_errors():
    r = Client().get("/api/v1/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    operations = {(m, p.removeprefix("/api/v1")): op for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert CONTRACT <= set(operations)
    for op in operations.values():
        assert {"400", "401", "403", "404", "409", "413", "503"} <= set(op["responses"]), op["operationId"]
        assert op["security"] == [{"BearerAuth": []}]


def test_docs_page_is_served():
    r = Client().get("/api/v1/docs")
    assert r.status_code == 200 and b"openapi.json" in r.content


def test_database_outage_is_503_with_retry_after(user_api: Api, monkeypatch):
    def down(**kwargs: Any) -> Any:
        raise OperationalError("connection refused")

    monkeypatch.setattr(access, "access_queue", down)
    r = user_api.get("/queues/q")
    assert r.status_code == 503 and error_code(r) == "unavailable" and r["Retry-After"] == "1"
    monkeypatch.setattr(access, "access_queue", lambda **kw: (_ for _ in ()).throw(InterfaceError("gone")))
    r = user_api.get("/queues/q")
    assert r.status_code == 503 and error_code(r) == "unavailable"


def test_database_outage_during_authentication_is_503(user_api: Api, monkeypatch):
    from messaging import tokens

    def down(raw: str | None) -> Any:
        raise OperationalError("the database system is shutting down")

    tokens.forget_cached()  # a token authenticated a moment ago needs no query (tokens.CACHE_SECONDS)
    monkeypatch.setattr(tokens, "authenticate_token", down)
    r = user_api.get("/queues")
    assert r.status_code == 503 and error_code(r) == "unavailable"


def test_a_bug_is_a_json_500(user_api: Api, monkeypatch):
    monkeypatch.setattr(access, "access_queue", lambda **kw: 1 / 0)
    r = user_api.get("/queues/q")
    assert r.status_code == 500 and error_code(r) == "internal_error"


def test_unknown_method_is_405(user_api: Api):
    assert user_api.client.put("/api/v1/queues").status_code == 405


# --------------------------------------------------------------------------- the body limit (ASGI)


class FakeApp:
    def __init__(self) -> None:
        self.body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _call(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes, int]:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    read = 0

    async def receive() -> Any:
        nonlocal read
        read += 1
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/api/v1/ack", "headers": headers}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), read


@pytest.fixture
def small_limit(settings: Any) -> int:
    settings.PEGASUS = {**settings.PEGASUS, "MAX_REQUEST_BYTES": 100}
    return 100


async def test_body_limit__declared_length_over_the_limit_is_refused_unread(small_limit: int):
    app = FakeApp()
    status, body, read = await _call(BodyLimit(app), [(b"content-length", b"101")], [b"x" * 101])
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert read == 0 and app.body is None


async def test_body_limit__chunked_body_is_read_only_up_to_the_limit(small_limit: int):
    app = FakeApp()
    status, _, read = await _call(BodyLimit(app), [], [b"x" * 60, b"x" * 60, b"x" * 60])
    assert status == 413 and read == 2 and app.body is None


async def test_body_limit__bodies_within_the_limit_pass_through(small_limit: int):
    app = FakeApp()
    assert (await _call(BodyLimit(app), [(b"content-length", b"100")], [b"y" * 100]))[0] == 200
    assert app.body == b"y" * 100
    app = FakeApp()
    assert (await _call(BodyLimit(app), [], [b"a" * 50, b"b" * 50]))[0] == 200
    assert app.body == b"a" * 50 + b"b" * 50


async def test_body_limit__garbage_content_length_is_refused(small_limit: int):
    assert (await _call(BodyLimit(FakeApp()), [(b"content-length", b"12x")], [b""]))[0] == 413


def test_values_the_database_cannot_store_are_400(user_api: Api, monkeypatch):
    def refuse(**kwargs: Any) -> Any:
        raise DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")

    monkeypatch.setattr(access, "access_queue", refuse)
    r = user_api.get("/queues/q")
    assert r.status_code == 400 and error_code(r) == "invalid_request"
    assert user_api.get("/transactions/ab%00cd").status_code == 400  # our own schemas refuse NUL first
