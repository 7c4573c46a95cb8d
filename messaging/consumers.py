"""The JSON WebSocket adapter at /ws/v1/ (docs/websocket.md): one Session operation per frame.

A frame that is not a JSON object with a known `op` and well-typed fields is malformed: it gets
an `error` frame and the connection closes. A well-formed operation the broker refuses (unknown
queue, stale receipt, ...) gets an `error` frame with its `corr`, and the connection stays open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import InterfaceError, OperationalError

from messaging import access, broker, jsontext
from messaging.exceptions import DATABASE_UNAVAILABLE, BrokerError, as_broker_error
from messaging.push import CLOSE_BAD_FRAME, CLOSE_TOO_LARGE, CLOSE_UNAUTHORIZED, Pusher, live_settings
from messaging.session import ClosesSessionOnExit, Destination, Session, authenticate, credentials

log = logging.getLogger("pegasus.ws")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
MESSAGE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "body": str, "headers": dict, "content_type": str, "durable": bool, "priority": int,
    "delay_seconds": (int, float), "ttl_seconds": (int, float), "dedup_id": str,
}  # fmt: skip


class Malformed(Exception):
    """A frame that breaks the protocol: answered, then the connection closes."""


class JsonConsumer(ClosesSessionOnExit, AsyncWebsocketConsumer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = live_settings()
        self.session: Session | None = None
        self.closing = False
        self._in_flight: set[asyncio.Future[None]] = set()  # pipelined publishes awaiting their commit

    async def dispatch(self, message: dict[str, Any]) -> None:
        """channels' dispatch without its aclose_old_connections() hop before every frame: each
        database operation here is a hop that closes its own connection, and that extra hop per
        frame queued behind every other hop of the process (it capped pipelined publishing)."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        token = credentials(self.scope)
        user = await authenticate(token) if token else None
        if user is None:
            await self.close()  # refuse the upgrade: HTTP 403
            return
        self.session = Session(protocol="json", user=user, on_revoked=self._token_revoked)
        try:
            self.session.start()
        except BrokerError:  # too many connections for this user: refuse the upgrade
            self.session = None
            await self.close()
            return
        await self.accept()

    async def _token_revoked(self) -> None:
        await self._fail(None, "not_authenticated", "The token was revoked or has expired.", CLOSE_UNAUTHORIZED)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.session is not None:
            await self.session.close()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw) > self.settings.max_frame_bytes:
            limit = self.settings.max_frame_bytes
            await self._fail(None, "frame_too_large", f"Frames are at most {limit} bytes.", CLOSE_TOO_LARGE)
            return
        try:
            frame = json.loads(raw)
        except ValueError:
            await self._fail(None, "malformed_frame", "A frame is one JSON object.", CLOSE_BAD_FRAME)
            return
        if not isinstance(frame, dict):
            await self._fail(None, "malformed_frame", "A frame is one JSON object.", CLOSE_BAD_FRAME)
            return
        try:
            await self._dispatch(frame)
        except Malformed as exc:
            await self._fail(frame.get("corr"), "malformed_frame", str(exc)[:300], CLOSE_BAD_FRAME)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        handler: Handler | None = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if handler is None:
            raise Malformed(f"Unknown op {str(op)[:40]!r}.")
        corr = frame.get("corr")
        try:
            reply = await handler(frame)
        except (BrokerError, *DATABASE_UNAVAILABLE) as exc:  # the connection stays open
            await self._error(corr, exc)
            return
        if reply is not None:
            await self._send({"op": reply.pop("op", "ok"), "corr": corr, **reply})

    # ------------------------------------------------------------------ operations

    async def op_subscribe(self, frame: dict[str, Any]) -> dict[str, Any]:
        key = _field(frame, "id", str)
        mode = frame.get("ack", "client")
        if mode not in ("client", "auto", "client-individual"):
            raise Malformed('ack is "client" or "auto".')
        destination, subscription = _source(frame)
        durable = _field(frame, "durable", bool, default=True)
        prefetch = _field(frame, "prefetch", int, default=self.settings.default_prefetch)
        await self._session.subscribe(
            key=key, destination=destination, subscription=subscription, durable=durable, prefetch=prefetch,
            auto_ack=mode == "auto", deliver=self._deliver,
        )  # fmt: skip
        return {"id": key}

    async def op_unsubscribe(self, frame: dict[str, Any]) -> dict[str, Any]:
        key = _field(frame, "id", str)
        await self._session.unsubscribe(key)
        return {"id": key}

    async def op_publish(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        destination, _ = _target(frame)
        raw = frame.get("messages")
        if not isinstance(raw, list):
            raise Malformed("messages is a list of message objects.")
        messages = [_message(m) for m in raw]
        transaction_id = _field(frame, "transaction", str, None)
        if transaction_id is None:
            # Pipelined: the confirm goes out once the group commit carrying this publish is
            # durable, and the next frames are read meanwhile, so a publisher with many
            # unconfirmed publishes gets them committed together (messaging/group_commit.py).
            self._pipelined(frame.get("corr"), self._session.publish_grouped(destination, messages))
            return None
        results = await self._session.publish(destination, messages, transaction_id)
        return {"op": "published", "messages": [{"id": r.id, "duplicate": r.duplicate} for r in results]}

    def _pipelined(self, corr: Any, publish: Awaitable[list[broker.PublishResult]]) -> None:
        task = asyncio.ensure_future(self._confirm(corr, publish))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _confirm(self, corr: Any, publish: Awaitable[list[broker.PublishResult]]) -> None:
        try:
            results = await publish
        except (BrokerError, *DATABASE_UNAVAILABLE) as exc:
            await self._error(corr, exc)
            return
        except Exception:  # unexpected: logged, answered, and the connection stays open
            log.exception("publish failed")
            await self._send({"op": "error", "corr": corr, "code": "internal_error", "message": "Publish failed."})
            return
        messages = [{"id": r.id, "duplicate": r.duplicate} for r in results]
        await self._send({"op": "published", "corr": corr, "messages": messages})

    async def op_ack(self, frame: dict[str, Any]) -> dict[str, Any]:
        receipts = _receipts(frame)
        statuses = await self._session.ack(receipts, _field(frame, "transaction", str, None))
        broker.require_some_ok(statuses)
        return {"results": [{"receipt": r, "status": s} for r, s in zip(receipts, statuses, strict=True)]}

    async def op_nack(self, frame: dict[str, Any]) -> dict[str, Any]:
        receipts = _receipts(frame)
        delay = _field(frame, "delay_seconds", (int, float), 0)
        statuses = await self._session.nack(receipts, delay)
        return {"results": [{"receipt": r, "status": s} for r, s in zip(receipts, statuses, strict=True)]}

    async def op_begin(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"transaction": await self._session.begin(), "state": "open"}

    async def op_prepare(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._finish(frame, "prepare")

    async def op_commit(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._finish(frame, "commit")

    async def op_rollback(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._finish(frame, "rollback")

    async def op_ping(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "pong"}

    async def _finish(self, frame: dict[str, Any], how: str) -> dict[str, Any]:
        transaction_id = _field(frame, "transaction", str)
        return {"transaction": transaction_id, "state": await self._session.finish(transaction_id, how)}

    # ------------------------------------------------------------------ delivery

    async def _deliver(self, pusher: Pusher, messages: Sequence[broker.ReceivedMessage]) -> None:
        for m in messages:
            await self._send({"op": "message", "subscription": pusher.key, "message": render_message(m)})

    @property
    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    async def _send(self, frame: dict[str, Any]) -> None:
        if not self.closing:
            await self.send(text_data=jsontext.dumps(frame))

    async def _error(self, corr: Any, exc: BrokerError | OperationalError | InterfaceError) -> None:
        """An operation's error frame (exceptions.as_broker_error: the database away is
        `unavailable`, as REST answers 503)."""
        if not isinstance(exc, BrokerError):
            log.warning("ws: database unavailable: %s", exc)
        error = as_broker_error(exc)
        await self._send({"op": "error", "corr": corr, "code": error.code, "message": error.message})

    async def _fail(self, corr: Any, code: str, message: str, close_code: int) -> None:
        await self._send({"op": "error", "corr": corr, "code": code, "message": message})
        self.closing = True
        await self.close(code=close_code)


def render_message(m: broker.ReceivedMessage) -> dict[str, Any]:
    return {
        "id": m.id, "body": m.body, "content_type": m.content_type, "headers": m.headers,
        "priority": m.priority, "durable": m.durable, "published_at": m.published_at.isoformat(),
        "expires_at": m.expires_at.isoformat() if m.expires_at else None, "destination": m.destination,
        "receipt": m.receipt, "delivery_count": m.delivery_count, "redelivered": m.redelivered,
    }  # fmt: skip


_MISSING = object()


def _field(frame: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = frame.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise Malformed(f"{frame.get('op')} needs {name}.")
        return default
    # bool is an int in Python, but `true` is not a number in the protocol.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise Malformed(f"{name} has the wrong type.")
    return value


def _target(frame: dict[str, Any]) -> tuple[Destination, str | None]:
    """`queue` or `topic` (with an optional `subscription`): exactly one of queue, topic."""
    queue, topic = frame.get("queue"), frame.get("topic")
    if (queue is None) == (topic is None):
        raise Malformed("Give exactly one of queue and topic.")
    if queue is not None:
        return Destination(access.Kind.QUEUE, broker.validate_name(_field(frame, "queue", str))), None
    subscription = _field(frame, "subscription", str, None)
    return Destination(access.Kind.TOPIC, broker.validate_name(_field(frame, "topic", str))), subscription


def _source(frame: dict[str, Any]) -> tuple[Destination, str | None]:
    destination, subscription = _target(frame)
    if subscription is not None:
        broker.validate_name(subscription)
    return destination, subscription


def _receipts(frame: dict[str, Any]) -> list[str]:
    receipts = frame.get("receipts")
    if not isinstance(receipts, list) or not receipts or not all(isinstance(r, str) for r in receipts):
        raise Malformed("receipts is a non-empty list of strings.")
    return receipts


def _message(raw: Any) -> broker.OutgoingMessage:
    if not isinstance(raw, dict) or not set(raw) <= set(MESSAGE_FIELDS) or "body" not in raw:
        raise Malformed(f"A message is an object with body and any of {', '.join(sorted(MESSAGE_FIELDS))}.")
    fields = {name: _field(raw, name, kind, None) for name, kind in MESSAGE_FIELDS.items() if name in raw}
    return broker.OutgoingMessage(**{k: v for k, v in fields.items() if v is not None})
