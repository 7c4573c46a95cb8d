"""The express lane: the hot REST operations served straight from ASGI, without Django's handler.

Django's ASGI handler costs about a millisecond of CPU and several thread hand-offs per request
(each MiddlewareMixin runs its hooks in a worker thread, the response is closed in another):
at thousands of publishes a second that, not the database, was the limit (docs/performance.md).
This adapter serves the five hottest operations (publish to a queue or topic, receive from a
queue or subscription, ack) with only what they need, and shares everything that decides the
answer with the ninja views:

- the same input and output schemas (messaging/schemas.py) and the same JSON renderer;
- the same operations (`messaging.api.publish_as`, `receive_*_as`, `ack_as`);
- the same token check (`pegasus_site.api.authenticate_async`) and the same mapping of errors
  to status, code and headers (`pegasus_site.api.describe_exception`).

Whatever it is not sure of goes to Django unchanged, with its body: a host not in ALLOWED_HOSTS,
plain HTTP when SECURE_SSL_REDIRECT is on, a body that is not JSON or does not validate, a name
that breaks the naming rule. So every such error answer is still made in one place, by Django
and ninja. PEGASUS_EXPRESS=0 turns the lane off (every request goes to Django).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from pydantic import BaseModel
from pydantic import ValidationError as SchemaError

from messaging import api as rest
from messaging import longpoll
from messaging.access import Kind
from messaging.models import NAME_PATTERN
from messaging.schemas import (
    AckIn,
    PublishedOut,
    PublishIn,
    PublishOut,
    ReceivedOut,
    ReceiveIn,
    ReceiveOut,
    ResultsOut,
)
from pegasus_site import api as ninja_api
from pegasus_site.bodylimit import ASGIApp, Message, Receive, Scope, Send, replay

ENABLED = os.environ.get("PEGASUS_EXPRESS", "1") != "0"
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Route:
    path: re.Pattern[str]
    schema: type[BaseModel]
    out: type[BaseModel]
    status: int
    call: Callable[[Any, dict[str, str], Any], Awaitable[dict[str, Any]]]
    empty_body_ok: bool = False  # receive's payload is optional

    def render(self, result: dict[str, Any]) -> dict[str, Any]:
        """The answer's JSON data, as the ninja view's response schema gives it. Lists of
        messages are copied field by field (validating what the broker built is a tenth of a
        100-message receive's CPU); tests/api/test_express.py checks both lanes answer alike."""
        fields = _MESSAGE_FIELDS.get(self.out)
        if fields is None:
            return self.out.model_validate(result).model_dump()
        rendered: dict[str, Any] = {"messages": [{f: getattr(m, f) for f in fields} for m in result["messages"]]}
        if "acked" in result:  # a receive that carried `ack` (receipts as sent, and broker statuses)
            rendered["acked"] = result["acked"]
        return rendered


_MESSAGE_FIELDS = {PublishOut: tuple(PublishedOut.model_fields), ReceiveOut: tuple(ReceivedOut.model_fields)}


def _publish(kind: Kind) -> Callable[[Any, dict[str, str], Any], Awaitable[dict[str, Any]]]:
    return lambda user, names, payload: rest.publish_as(user, kind, names["name"], payload)


async def _ack(user: Any, names: dict[str, str], payload: Any) -> dict[str, Any]:
    return await longpoll.hop(rest.ack_as)(user, payload)


ROUTES = (
    Route(re.compile(r"/api/v1/queues/([^/]+)/messages"), PublishIn, PublishOut, 201, _publish(Kind.QUEUE)),
    Route(re.compile(r"/api/v1/topics/([^/]+)/messages"), PublishIn, PublishOut, 201, _publish(Kind.TOPIC)),
    Route(
        re.compile(r"/api/v1/queues/([^/]+)/receive"), ReceiveIn, ReceiveOut, 200,
        lambda user, names, payload: rest.receive_queue_as(user, names["name"], payload), empty_body_ok=True,
    ),
    Route(
        re.compile(r"/api/v1/topics/([^/]+)/subscriptions/([^/]+)/receive"), ReceiveIn, ReceiveOut, 200,
        lambda user, names, payload: rest.receive_subscription_as(user, names["topic"], names["name"], payload),
        empty_body_ok=True,
    ),
    Route(re.compile(r"/api/v1/ack"), AckIn, ResultsOut, 200, _ack),
)  # fmt: skip


class ExpressLane:
    """ASGI: the routes above served here, everything else (and anything doubtful) by `app`."""

    def __init__(self, app: ASGIApp, *, enabled: bool = ENABLED) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        matched = _match(scope["path"])
        headers = _headers(scope)
        if matched is None or not _acceptable(scope, headers):
            return await self.app(scope, receive, send)
        route, names = matched
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        payload = _parse(route, body)
        if payload is None:  # let ninja say what is wrong with it
            return await self.app(scope, replay(body, receive), send)
        await self._serve(route, names, payload, headers, scope, receive, send)

    async def _serve(
        self, route: Route, names: dict[str, str], payload: Any, headers: dict[bytes, bytes],
        scope: Scope, receive: Receive, send: Send,
    ) -> None:  # fmt: skip
        where = f"POST {scope['path']}"
        try:
            user = await ninja_api.authenticate_async(_bearer(headers))
            if user is None:
                message = ninja_api.AUTHENTICATE_MESSAGE
                return await _answer(
                    send, scope, 401, _error("not_authenticated", message), {"WWW-Authenticate": "Bearer"}
                )
            work = route.call(user, names, payload)
            result = await (_unless_disconnected(work, receive) if route.empty_body_ok else work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, code, message, extra = ninja_api.describe_exception(exc, where)
            return await _answer(send, scope, status, _error(code, message), extra)
        if result is None:
            return  # disconnected during a long poll
        await _answer(send, scope, route.status, route.render(result), {})


def _match(path: str) -> tuple[Route, dict[str, str]] | None:
    if not path.startswith("/api/v1/"):
        return None
    for route in ROUTES:
        found = route.path.fullmatch(path)
        if found is None:
            continue
        parts = found.groups()
        if not all(len(p) <= 200 and _NAME.match(p) for p in parts):
            return None  # ninja answers invalid_name
        keys = ("topic", "name")[-len(parts) :] if parts else ()
        return route, dict(zip(keys, parts, strict=True))
    return None


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", ())}


def _acceptable(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """Would Django's middleware let this request through unchanged? Otherwise it decides."""
    if settings.USE_X_FORWARDED_HOST or b"host" not in headers:
        return False
    domain, _ = split_domain_port(headers[b"host"].decode("latin-1"))
    allowed = settings.ALLOWED_HOSTS or ([".localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    if not domain or not validate_host(domain, allowed):
        return False
    if settings.SECURE_SSL_REDIRECT and not _is_secure(scope, headers):
        return False
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in (b"application/json", b"")


def _is_secure(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    proxy = settings.SECURE_PROXY_SSL_HEADER
    if proxy:
        name = proxy[0].lower().removeprefix("http_").replace("_", "-").encode("latin-1")
        return headers.get(name, b"").decode("latin-1").split(",")[0].strip() == proxy[1]
    return scope.get("scheme") == "https"


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse(route: Route, body: bytes) -> Any | None:
    """The validated payload, or None when ninja should answer (it says what is wrong)."""
    if not body.strip():
        return route.schema.model_validate({}) if route.empty_body_ok else None
    try:
        data = json.loads(body)
        return route.schema.model_validate(data) if isinstance(data, dict) else None
    except (ValueError, SchemaError):
        return None


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _unless_disconnected(work: Awaitable[dict[str, Any]], receive: Receive) -> dict[str, Any] | None:
    """Run `work` (a long poll), cancelled if the client disconnects first, as Django does."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return None
    finally:
        listener.cancel()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def _answer(send: Send, scope: Scope, status: int, data: Any, extra: dict[str, str]) -> None:
    content = ninja_api.api.renderer.render(None, data, response_status=status)  # type: ignore[arg-type]
    body = content if isinstance(content, bytes) else content.encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            *security_headers(scope),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


def security_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """What Django's SecurityMiddleware and XFrameOptionsMiddleware add to an API answer."""
    out: list[tuple[bytes, bytes]] = []
    if settings.SECURE_HSTS_SECONDS and scope.get("scheme") == "https":
        value = f"max-age={settings.SECURE_HSTS_SECONDS}"
        value += "; includeSubDomains" if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS else ""
        value += "; preload" if settings.SECURE_HSTS_PRELOAD else ""
        out.append((b"strict-transport-security", value.encode()))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        out.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        value = policy if isinstance(policy, str) else ",".join(policy)
        out.append((b"referrer-policy", value.encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        out.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    out.append((b"x-frame-options", getattr(settings, "X_FRAME_OPTIONS", "DENY").encode()))
    return out
