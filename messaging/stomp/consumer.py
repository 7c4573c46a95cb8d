"""The STOMP adapter: frames in, one Session operation each, frames out.

Any error (a malformed or out-of-order frame, a refused operation) is answered with an ERROR
frame and the connection is closed, as STOMP prescribes; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from messaging import broker
from messaging.exceptions import DATABASE_UNAVAILABLE, BrokerError, InvalidRequest, NotAuthenticated, as_broker_error
from messaging.push import (
    CLOSE_BAD_FRAME,
    CLOSE_NORMAL,
    CLOSE_TIMEOUT,
    CLOSE_TOO_LARGE,
    CLOSE_UNAUTHORIZED,
    Pusher,
    live_settings,
)
from messaging.session import (
    ClosesSessionOnExit,
    Destination,
    Session,
    authenticate,
    credentials,
    parse_destination,
)
from messaging.stomp.frames import Frame, FrameError, FrameTooLarge, Parser, render

log = logging.getLogger("pegasus.stomp")

VERSIONS = ("1.2", "1.1", "1.0")
SUBPROTOCOLS = {"v12.stomp": "1.2", "v11.stomp": "1.1", "v10.stomp": "1.0"}
ACK_MODES = ("auto", "client", "client-individual")
SERVER = "Pegasus/0.1"
# Headers of a SEND frame that steer the broker and are not stored with the message.
SEND_CONTROL = {"destination", "content-length", "content-type", "transaction", "receipt", "persistent",
                "priority", "expires", "delay", "dedup-id"}  # fmt: skip
# Headers of a MESSAGE frame that the server sets; stored headers of these names are not repeated.
MESSAGE_RESERVED = {"destination", "message-id", "subscription", "ack", "content-length", "content-type",
                    "redelivered", "receipt", "transaction", "persistent", "priority", "expires"}  # fmt: skip
BASE64_HEADER = "pegasus-body-encoding"
DURABLE_NAME_HEADERS = ("durable-subscription-name", "activemq.subscriptionName")


class StompError(Exception):
    """An ERROR frame: `message` header, optional detail as the body."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    @classmethod
    def of(cls, exc: StompError | BrokerError) -> StompError:
        """The ERROR frame for a protocol error or a broker error (its code as the message)."""
        return exc if isinstance(exc, StompError) else cls(exc.code, exc.message)


class StompConsumer(ClosesSessionOnExit, AsyncWebsocketConsumer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = live_settings()
        self.parser = Parser(max_frame_bytes=self.settings.max_frame_bytes)
        self.session: Session | None = None
        self.user: Any = None
        self.version = ""
        self.client_id = ""
        self.transactions: dict[str, str] = {}  # STOMP transaction name → broker transaction id
        self.closing = False
        self._timers: list[asyncio.Task[None]] = []
        self._sends: list[asyncio.Task[None]] = []  # pipelined SENDs waiting for their group commit
        self.last_received = self.last_sent = time.monotonic()

    # ------------------------------------------------------------------ WebSocket events

    async def connect(self) -> None:
        token = credentials(self.scope)
        if token is not None:
            self.user = await authenticate(token)
            if self.user is None:
                await self.close()  # a bad token: refuse the upgrade (HTTP 403)
                return
        offered = self.scope.get("subprotocols") or []
        chosen = next((p for p in SUBPROTOCOLS if p in offered), None)
        await self.accept(subprotocol=chosen)
        self._timers.append(asyncio.create_task(self._connect_deadline()))

    async def disconnect(self, code: int) -> None:
        self.closing = True
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)  # shielded in group_commit
        if self.session is not None:
            await self.session.close()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return
        self.last_received = time.monotonic()
        data = text_data.encode("utf-8") if text_data is not None else bytes_data or b""
        try:
            for frame in self.parser.feed(data):
                await self._handle(frame)
                if self.closing:
                    return
        except FrameTooLarge as exc:
            await self._fail(StompError("frame too large", str(exc)), code=CLOSE_TOO_LARGE)
        except FrameError as exc:
            await self._fail(StompError("malformed frame", str(exc)))

    # ------------------------------------------------------------------ dispatch

    async def _handle(self, frame: Frame) -> None:
        receipt = frame.get("receipt")
        if frame.command == "SEND" and not frame.get("transaction") and self.session is not None:
            self._pipeline_send(frame, receipt)
            return
        # Any other frame waits for the SENDs before it: their RECEIPTs and ERRORs come first.
        await self._drain_sends()
        if self.closing:
            return
        try:
            await self._dispatch(frame)
        except (StompError, BrokerError, *DATABASE_UNAVAILABLE) as exc:  # the database away: ERROR unavailable
            error = exc if isinstance(exc, StompError) else as_broker_error(exc)
            await self._fail(StompError.of(error), receipt=receipt)
            return
        if receipt is not None and frame.command not in ("CONNECT", "STOMP") and not self.closing:
            await self._send_frame("RECEIPT", {"receipt-id": receipt})
            if frame.command == "DISCONNECT":
                await self._close_now()

    async def _dispatch(self, frame: Frame) -> None:
        if frame.command in ("CONNECT", "STOMP"):
            if self.session is not None:
                raise StompError("already connected", "CONNECT may only be sent once.")
            await self._on_connect(frame)
            return
        if self.session is None:
            raise StompError("not connected", f"{frame.command} before CONNECT.")
        handler: Callable[[Frame], Awaitable[None]] = getattr(self, f"_on_{frame.command.lower()}")
        await handler(frame)

    # ------------------------------------------------------------------ frames

    async def _on_connect(self, frame: Frame) -> None:
        self.version = _negotiate(frame.get("accept-version", "1.0") or "1.0")
        login, passcode = frame.get("login"), frame.get("passcode")
        if self.user is None and passcode:
            self.user = await authenticate(passcode)
        if self.user is None:
            raise StompError("not_authenticated", NotAuthenticated().message)
        if login and login != self.user.get_username():
            raise StompError("not_authenticated", "login does not match the token's user.")
        self.parser.escapes = self.version != "1.0"
        self.client_id = frame.get("client-id", "") or ""
        out_ms, in_ms = self._heartbeats(frame.get("heart-beat", "0,0") or "0,0")
        session = Session(protocol=f"stomp{self.version}", user=self.user, on_revoked=self._token_revoked)
        session.start()  # OverQuota (too many connections) becomes an ERROR frame
        self.session = session
        beat = self.settings.stomp_heartbeat_ms
        await self._send_frame(
            "CONNECTED",
            {"version": self.version, "heart-beat": f"{beat},{beat}", "server": SERVER,
             "session": self.session.connection_id},
        )  # fmt: skip
        self._start_heartbeats(out_ms, in_ms)

    def _pipeline_send(self, frame: Frame, receipt: str | None) -> None:
        """A SEND outside a transaction joins the next group commit (messaging/group_commit.py)
        while the following frames are read, so a client sending many messages gets them
        committed together; its RECEIPT, the publisher confirm, follows the commit."""
        earlier = self._sends[-1] if self._sends else None
        self._sends = [t for t in self._sends if not t.done()]
        self._sends.append(asyncio.create_task(self._grouped_send(frame, receipt, earlier)))

    async def _grouped_send(self, frame: Frame, receipt: str | None, earlier: asyncio.Task[None] | None) -> None:
        """Publish, then answer once the SEND before it has answered: a non-durable SEND may be
        confirmed before a durable one sent earlier is committed (messaging/write_behind.py),
        and RECEIPTs and ERRORs go out in the order of the frames."""
        outcome: StompError | None = None
        try:
            destination = parse_destination(_required(frame, "destination"))
            await self._session.publish_grouped(destination, [_outgoing(frame)])
        except (StompError, BrokerError) as exc:
            outcome = StompError.of(exc)
        except Exception:  # the database is away, say: this connection fails, nothing else
            log.exception("STOMP publish failed")
            outcome = StompError("internal error", "The message could not be stored.")
        if earlier is not None:
            await asyncio.gather(earlier, return_exceptions=True)
        if outcome is not None:
            await self._fail(outcome, receipt=receipt)
        elif receipt is not None:
            await self._send_frame("RECEIPT", {"receipt-id": receipt})

    async def _drain_sends(self) -> None:
        sends, self._sends = self._sends, []
        if sends:
            await asyncio.gather(*sends)

    async def _on_send(self, frame: Frame) -> None:
        destination = parse_destination(_required(frame, "destination"))
        message = _outgoing(frame)
        await self._session.publish(destination, [message], self._transaction(frame))

    async def _on_subscribe(self, frame: Frame) -> None:
        label = _required(frame, "destination")
        destination = parse_destination(label)
        key = frame.get("id") or (label if self.version == "1.0" else _required(frame, "id"))
        mode = frame.get("ack", "auto") or "auto"
        if mode not in ACK_MODES:
            raise StompError("invalid ack mode", f"ack is one of {', '.join(ACK_MODES)}.")
        await self._session.subscribe(
            key=key, destination=destination, subscription=self._durable_name(frame, destination),
            durable=True, prefetch=_int_header(frame, "prefetch-count", self.settings.default_prefetch),
            auto_ack=mode == "auto", deliver=self._deliver, extra={"ack": mode, "destination": destination.label},
        )  # fmt: skip

    async def _on_unsubscribe(self, frame: Frame) -> None:
        key = frame.get("id") or (frame.get("destination") if self.version == "1.0" else None)
        if not key:
            raise StompError("missing header", "UNSUBSCRIBE needs an id header.")
        await self._session.unsubscribe(key)

    async def _on_ack(self, frame: Frame) -> None:
        receipts = self._receipts_for(frame)
        statuses = await self._session.ack(receipts, self._transaction(frame))
        if statuses and all(s == broker.ACK_STALE for s in statuses):
            raise StompError("stale_receipt", "The message's lease expired or was superseded; nothing was changed.")

    async def _on_nack(self, frame: Frame) -> None:
        receipts = self._receipts_for(frame)
        if frame.get("transaction"):
            raise StompError("not supported", "NACK inside a transaction is not supported: ABORT returns acked ones.")
        await self._session.nack(receipts)

    async def _on_begin(self, frame: Frame) -> None:
        name = _required(frame, "transaction")
        if name in self.transactions:
            raise StompError("transaction exists", f"Transaction {name[:60]!r} is already open.")
        self.transactions[name] = await self._session.begin()

    async def _on_commit(self, frame: Frame) -> None:
        await self._session.finish(self._pop_transaction(frame), "commit")

    async def _on_abort(self, frame: Frame) -> None:
        await self._session.finish(self._pop_transaction(frame), "rollback")

    async def _on_disconnect(self, frame: Frame) -> None:
        # Clean up before the RECEIPT: a client that waited for it finds its unacked messages
        # already returned and its non-durable subscriptions gone.
        await self._session.close()
        if frame.get("receipt") is None:
            await self._close_now()

    # ------------------------------------------------------------------ delivery

    async def _deliver(self, pusher: Pusher, messages: Sequence[broker.ReceivedMessage]) -> None:
        for m in messages:
            await self._send_frame("MESSAGE", self._message_headers(pusher, m), _body_bytes(m))

    def _message_headers(self, pusher: Pusher, m: broker.ReceivedMessage) -> dict[str, str]:
        headers = {
            "subscription": pusher.key, "message-id": m.id, "destination": pusher.extra["destination"],
            "redelivered": "true" if m.redelivered else "false", "priority": str(m.priority),
            "persistent": "true" if m.durable else "false", "delivery-count": str(m.delivery_count),
        }  # fmt: skip
        if self.version == "1.2":
            headers["ack"] = m.receipt
        if m.expires_at is not None:
            headers["expires"] = str(int(m.expires_at.timestamp() * 1000))
        headers["content-type"] = m.content_type or "text/plain;charset=utf-8"
        for name, value in m.headers.items():
            if name not in MESSAGE_RESERVED and name != BASE64_HEADER and name not in headers:
                headers[name] = value
        return headers

    # ------------------------------------------------------------------ helpers

    @property
    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _durable_name(self, frame: Frame, destination: Destination) -> str | None:
        name = next((frame.get(h) for h in DURABLE_NAME_HEADERS if frame.get(h)), None)
        if name is None:
            return None
        if destination.kind.value != "topic":
            raise StompError("invalid header", "durable-subscription-name is for /topic/ destinations.")
        # ActiveMQ Artemis names the subscription queue CLIENTID.NAME.
        return broker.validate_name(f"{self.client_id}.{name}" if self.client_id else name)

    def _transaction(self, frame: Frame) -> str | None:
        name = frame.get("transaction")
        if name is None:
            return None
        if name not in self.transactions:
            raise StompError("unknown transaction", f"No open transaction {name[:60]!r}.")
        return self.transactions[name]

    def _pop_transaction(self, frame: Frame) -> str:
        transaction_id = self._transaction(frame) or _required(frame, "transaction")
        self.transactions.pop(_required(frame, "transaction"))
        return transaction_id

    def _receipts_for(self, frame: Frame) -> list[str]:
        """The receipts an ACK/NACK settles. 1.2 names the message by its `ack` header (the
        receipt); 1.0/1.1 by message-id (and subscription). In `client` mode an ack is
        cumulative: it settles everything delivered on that subscription up to this one."""
        if self.version == "1.2":
            receipt = _required(frame, "id")
        else:
            receipt = self._receipt_by_message_id(_required(frame, "message-id"), frame.get("subscription"))
        pusher = self._session.holder(receipt)
        if pusher is not None and pusher.extra.get("ack") == "client":
            return pusher.up_to(receipt)
        return [receipt]

    def _receipt_by_message_id(self, message_id: str, subscription: str | None) -> str:
        for key, pusher in self._session.pushers.items():
            if subscription in (None, key):
                receipt = pusher.receipt_for(message_id)
                if receipt is not None:
                    return receipt
        raise StompError("unknown message", f"No unacknowledged message {message_id[:60]!r} on this connection.")

    def _heartbeats(self, value: str) -> tuple[int, int]:
        """(server → client, client → server) intervals in ms; 0 means none."""
        try:
            cx, cy = (int(v) for v in value.split(","))
        except ValueError:
            raise StompError("malformed frame", "heart-beat is two integers: cx,cy.") from None
        ours = self.settings.stomp_heartbeat_ms
        out_ms = max(ours, cy) if ours and cy else 0
        in_ms = max(ours, cx) if ours and cx else 0
        return out_ms, in_ms

    def _start_heartbeats(self, out_ms: int, in_ms: int) -> None:
        if out_ms:
            self._timers.append(asyncio.create_task(self._beat(out_ms / 1000)))
        if in_ms:
            self._timers.append(asyncio.create_task(self._watch_client(in_ms / 1000)))

    async def _beat(self, interval: float) -> None:
        while not self.closing:
            await asyncio.sleep(max(0.0, self.last_sent + interval - time.monotonic()))
            if time.monotonic() - self.last_sent >= interval:
                await self._send_raw("\n")

    async def _watch_client(self, interval: float) -> None:
        # Allow for the client's timer and the network: close after twice the interval.
        grace = 2 * interval
        while not self.closing:
            await asyncio.sleep(max(0.1, self.last_received + grace - time.monotonic()))
            if time.monotonic() - self.last_received > grace:
                error = StompError("heart-beat timeout", "No frame or heart-beat from the client in time.")
                await self._fail(error, code=CLOSE_TIMEOUT)
                return

    async def _connect_deadline(self) -> None:
        await asyncio.sleep(self.settings.connect_timeout_seconds)
        if self.session is None and not self.closing:
            await self._fail(StompError("connect timeout", "No CONNECT frame in time."), code=CLOSE_TIMEOUT)

    async def _send_frame(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        data = render(command, headers, body, escapes=self.version not in ("", "1.0"))
        try:
            await self._send_raw(data.decode("utf-8"))
        except UnicodeDecodeError:  # a binary body goes in a binary WebSocket message
            await self._send_raw(data)

    async def _send_raw(self, data: str | bytes) -> None:
        if self.closing:
            return
        self.last_sent = time.monotonic()
        if isinstance(data, bytes):
            await self.send(bytes_data=data)
        else:
            await self.send(text_data=data)

    async def _fail(self, error: StompError, *, receipt: str | None = None, code: int = CLOSE_BAD_FRAME) -> None:
        headers = {"message": error.message[:200], "content-type": "text/plain"}
        if receipt is not None:
            headers["receipt-id"] = receipt
        if not self.closing:
            log.info("STOMP error on %s: %s %s", self.scope.get("client"), error.message, error.detail)
            await self._send_frame("ERROR", headers, error.detail.encode("utf-8"))
        await self._close_now(code)

    async def _token_revoked(self) -> None:
        error = StompError("not_authenticated", "The token was revoked or has expired.")
        await self._fail(error, code=CLOSE_UNAUTHORIZED)

    async def _close_now(self, code: int = CLOSE_NORMAL) -> None:
        if not self.closing:
            self.closing = True
            await self.close(code=code)


def _negotiate(accept_version: str) -> str:
    offered = {v.strip() for v in accept_version.split(",")}
    for version in VERSIONS:
        if version in offered:
            return version
    raise StompError("unsupported version", f"Supported versions are {','.join(VERSIONS)}.")


def _required(frame: Frame, name: str) -> str:
    value = frame.get(name)
    if not value:
        raise StompError("missing header", f"{frame.command} needs a {name} header.")
    return value


def _int_header(frame: Frame, name: str, default: int) -> int:
    value = frame.get(name)
    if value is None:
        return default
    if not value.isdigit() or len(value) > 9:
        raise StompError("invalid header", f"{name} must be a non-negative integer.")
    return int(value)


def _outgoing(frame: Frame) -> broker.OutgoingMessage:
    """A SEND frame as a message. A body that is not UTF-8 text is stored as base64 and given
    back as the same bytes to STOMP consumers."""
    headers = {k: v for k, v in frame.headers.items() if k not in SEND_CONTROL and k != BASE64_HEADER}
    try:
        body = frame.body.decode("utf-8")
        if "\x00" in body:
            raise UnicodeDecodeError("utf-8", frame.body, 0, 1, "NUL")
    except UnicodeDecodeError:
        body = base64.b64encode(frame.body).decode("ascii")
        headers[BASE64_HEADER] = "base64"
    try:
        return broker.OutgoingMessage(
            body=body,
            headers=headers,
            content_type=frame.get("content-type", "") or "",
            durable=(frame.get("persistent", "true") or "true").lower() != "false",
            priority=_int_header(frame, "priority", 4),
            delay_seconds=_int_header(frame, "delay", 0) / 1000,
            ttl_seconds=_ttl(frame),
            dedup_id=frame.get("dedup-id"),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _ttl(frame: Frame) -> float | None:
    """STOMP/JMS `expires` is an absolute time in ms since the epoch (0: never)."""
    expires = _int_header(frame, "expires", 0)
    if not expires:
        return None
    from messaging import clock

    remaining = expires / 1000 - clock.now().timestamp()
    return max(remaining, 0.001)


def _body_bytes(m: broker.ReceivedMessage) -> bytes:
    if m.headers.get(BASE64_HEADER) == "base64":
        return base64.b64decode(m.body)
    return m.body.encode("utf-8")
