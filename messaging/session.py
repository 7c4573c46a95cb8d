"""What a live connection (JSON WebSocket or STOMP) holds, shared by both protocols.

A Session owns the connection's pushers (one per subscription), the transactions it opened and
the non-durable subscriptions it created. Every database operation is one hop through
`database_sync_to_async` into a small sync function below that checks access and calls the
broker. Closing a session returns every unacked message at once (redelivered), rolls back its
open transactions and deletes its non-durable subscriptions with their messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.http import QueryDict

from messaging import access, broker, group_commit, limits, listener, tokens
from messaging.exceptions import BrokerError, InvalidRequest, SubscriptionNotFound
from messaging.models import Queue
from messaging.push import Deliver, LiveSettings, Pusher, hop, live_settings, push_hop

log = logging.getLogger("pegasus.session")


@dataclass(frozen=True)
class Destination:
    kind: access.Kind
    name: str

    @property
    def label(self) -> str:
        return f"/{self.kind.value}/{self.name}"


def parse_destination(text: str) -> Destination:
    """`/queue/NAME` or `/topic/NAME`, as STOMP clients name destinations."""
    for kind in access.Kind:
        prefix = f"/{kind.value}/"
        if text.startswith(prefix):
            return Destination(kind, broker.validate_name(text[len(prefix) :]))
    raise InvalidRequest(f"Unknown destination {text[:60]!r}: use /queue/NAME or /topic/NAME.")


def credentials(scope: dict[str, Any]) -> str | None:
    """The token offered on the upgrade: `?token=` or `Authorization: Bearer ...`."""
    query = QueryDict(scope.get("query_string", b"").decode("latin-1"))
    token = query.get("token")
    if token:
        return str(token)
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, raw = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and raw.strip():
                return str(raw.strip())
    return None


authenticate = hop(tokens.authenticate)


class Session:
    def __init__(self, *, protocol: str, user: Any, on_revoked: Callable[[], Awaitable[None]] | None = None) -> None:
        self.connection_id = f"ws-{secrets.token_hex(8)}"
        self.protocol = protocol
        self.user = user
        self.on_revoked = on_revoked  # called when the connection's token is revoked or expires
        self._counted = False
        self.settings: LiveSettings = live_settings()
        self.pushers: dict[str, Pusher] = {}
        self.transactions: set[str] = set()  # open ones this connection began
        self._owned: dict[str, Queue] = {}  # subscription key → non-durable subscription we made
        self._temp_seq = 0
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Raises OverQuota when the user has too many connections open in this process."""
        limits.connections.acquire(self.user.pk)
        self._counted = True
        listener.ensure_started()
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"tick {self.connection_id}")
        token_watch.add(self)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(
        self,
        *,
        key: str,
        destination: Destination,
        subscription: str | None,
        durable: bool,
        prefetch: int,
        auto_ack: bool,
        deliver: Deliver,
        extra: dict[str, str] | None = None,
    ) -> Pusher:
        if key in self.pushers:
            raise InvalidRequest(f"Subscription id {key[:60]!r} is already in use on this connection.")
        if not 1 <= prefetch <= self.settings.max_prefetch:
            raise InvalidRequest(f"prefetch is between 1 and {self.settings.max_prefetch}.")
        temp = None
        if destination.kind is access.Kind.TOPIC and subscription is None:
            self._temp_seq += 1
            temp = f"tmp.{self.connection_id}.{self._temp_seq}"
        queue, consumer_id, owned = await hop(_open_subscription)(
            user=self.user, destination=destination, subscription=subscription or temp, durable=durable and not temp,
            owner=self.connection_id, protocol=self.protocol, prefetch=prefetch,
        )  # fmt: skip
        if owned:
            self._owned[key] = queue
        pusher = Pusher(
            key=key, queue=queue, prefetch=prefetch, auto_ack=auto_ack, deliver=deliver,
            recheck_seconds=self.settings.recheck_seconds, consumer_id=consumer_id, extra=extra,
        )  # fmt: skip
        self.pushers[key] = pusher
        pusher.start()
        return pusher

    async def unsubscribe(self, key: str) -> None:
        pusher = self.pushers.pop(key, None)
        if pusher is None:
            raise InvalidRequest(f"No subscription {key[:60]!r} on this connection.")
        await pusher.stop()
        await hop(_close_subscription)(
            receipts=list(pusher.unacked), consumer_id=pusher.consumer_id, owned=self._owned.pop(key, None)
        )

    def holder(self, receipt: str) -> Pusher | None:
        return next((p for p in self.pushers.values() if receipt in p.unacked), None)

    def settled(self, receipts: Sequence[str]) -> None:
        for pusher in self.pushers.values():
            pusher.settled(receipts)

    # ------------------------------------------------------------------ operations

    async def ack(self, receipts: Sequence[str], transaction_id: str | None = None) -> list[str]:
        authorize = access.may_consume(self.user)
        if transaction_id is None and receipts:
            # Receipts of one subscription: ack them and claim the room they make in one
            # transaction (Pusher.ack_and_refill), unless that pusher is claiming right now.
            pusher = self.holder(receipts[0])
            if pusher is not None and pusher.holds_all(receipts):
                try:
                    statuses = await pusher.ack_and_refill(receipts, user=self.user, authorize=authorize)
                except BrokerError:
                    raise
                except Exception:  # the claim's part failed, say: nothing was acked, ack alone
                    log.warning("ack with refill on %s failed; acking alone", pusher.key, exc_info=True)
                    statuses = None
                if statuses is not None:
                    return statuses
        # On the push threads, beside the claims, not queued behind the process's other hops.
        statuses = await push_hop(broker.ack)(
            receipts=list(receipts), transaction_id=transaction_id, user=self.user, authorize=authorize
        )
        self.settled(receipts)
        return statuses

    async def nack(self, receipts: Sequence[str], delay_seconds: float = 0) -> list[str]:
        statuses = await hop(broker.nack)(
            receipts=list(receipts), delay_seconds=delay_seconds, authorize=access.may_consume(self.user)
        )
        self.settled(receipts)
        return statuses

    async def publish(
        self, destination: Destination, messages: Sequence[broker.OutgoingMessage], transaction_id: str | None = None
    ) -> list[broker.PublishResult]:
        self._charge(messages)
        return await hop(_publish)(
            user=self.user, destination=destination, messages=messages, transaction_id=transaction_id
        )

    async def publish_grouped(
        self, destination: Destination, messages: Sequence[broker.OutgoingMessage]
    ) -> list[broker.PublishResult]:
        """publish (no transaction) committed together with concurrent publishes: the access
        check and the publish run in the next group commit round (messaging/group_commit.py)."""
        self._charge(messages)
        return await group_commit.publish(
            user=self.user, kind=destination.kind, name=destination.name, messages=messages
        )

    def _charge(self, messages: Sequence[broker.OutgoingMessage]) -> None:
        """The per-token publish rate (raises OverQuota, sent as an error frame)."""
        limits.check_publish_rate(user=self.user, token_key=tokens.token_key(self.user), messages=len(messages))

    async def begin(self) -> str:
        txn = await hop(broker.begin)(user=self.user)
        self.transactions.add(txn.pk)
        return txn.pk

    async def finish(self, transaction_id: str, how: str) -> str:
        """prepare, commit or rollback; returns the transaction's state."""
        operation = {"prepare": broker.prepare, "commit": broker.commit, "rollback": broker.rollback}[how]
        txn = await hop(operation)(transaction_id=transaction_id, user=self.user)
        self.transactions.discard(transaction_id)  # prepared work outlives the connection
        return str(txn.state)

    # ------------------------------------------------------------------ lifetime

    async def close(self) -> None:
        """Return unacked messages at once, roll back open transactions, drop what we own."""
        if self._closed:
            return
        self._closed = True
        token_watch.discard(self)
        if self._counted:
            limits.connections.release(self.user.pk)
            self._counted = False
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        pushers = list(self.pushers.values())
        self.pushers.clear()
        await asyncio.gather(*(p.stop() for p in pushers))
        receipts = [r for p in pushers for r in p.unacked]
        try:
            await hop(_close_session)(
                connection=self.connection_id, receipts=receipts, transactions=sorted(self.transactions),
                user=self.user,
            )  # fmt: skip
        except Exception:  # the database is away: leases expire and housekeeping catches up
            log.warning("closing %s failed", self.connection_id, exc_info=True)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval())
            try:
                await hop(_tick)(
                    consumers={p.consumer_id: len(p.unacked) for p in self.pushers.values() if p.consumer_id},
                    leases=[(list(p.unacked), p.queue.visibility_timeout_seconds) for p in self.pushers.values()],
                    owned=list(self._owned.values()),
                )
            except Exception:
                log.warning("tick of %s failed", self.connection_id, exc_info=True)

    def _tick_interval(self) -> float:
        # Extend leases well before they run out, even on queues with a short visibility timeout.
        timeouts = [p.queue.visibility_timeout_seconds / 3 for p in self.pushers.values()]
        return max(0.5, min([self.settings.tick_seconds, *timeouts]))


# ---------------------------------------------------------------------- the consumers' end


class ClosesSessionOnExit:
    """For the WebSocket consumers (JSON and STOMP): close the session whenever the consumer
    ends. Channels calls disconnect() only for a connection that closes; a consumer that raised
    ends without it, and its session would live on: its pushers taking hand-offs for a gone
    connection, its ticker extending their leases for as long as the process runs (found by
    scenario 4: messages held leased for minutes after a frame's database error escaped)."""

    session: Session | None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            if self.session is not None:
                await self.session.close()  # idempotent: disconnect() may have closed it


# ---------------------------------------------------------------------- revoked tokens


class TokenWatch:
    """Closes live connections whose token was revoked or expired, within WATCH_SECONDS.

    One watcher per event loop checks the tokens of all its sessions with one query, instead
    of a query per connection."""

    WATCH_SECONDS = 2.0

    def __init__(self) -> None:
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Session]] = weakref.WeakKeyDictionary()
        self._tasks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, session: Session) -> None:
        if getattr(session.user, "api_token_id", None) is None:
            return
        loop = asyncio.get_running_loop()
        self._sessions.setdefault(loop, set()).add(session)
        task = self._tasks.get(loop)
        if task is None or task.done():
            self._tasks[loop] = loop.create_task(self._watch(loop), name="pegasus token watch")

    def discard(self, session: Session) -> None:
        for sessions in self._sessions.values():
            sessions.discard(session)

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._sessions.get(loop):
            await asyncio.sleep(self.WATCH_SECONDS)
            sessions = list(self._sessions.get(loop, ()))
            try:
                active = await hop(tokens.active_ids)({s.user.api_token_id for s in sessions})
            except Exception:  # the database is away: check again next round
                log.warning("token watch failed", exc_info=True)
                continue
            for session in sessions:
                if session.user.api_token_id not in active and session.on_revoked is not None:
                    self.discard(session)
                    await session.on_revoked()


token_watch = TokenWatch()


# ---------------------------------------------------------------------- one hop each


def _open_subscription(
    *, user: Any, destination: Destination, subscription: str | None, durable: bool, owner: str, protocol: str,
    prefetch: int,
) -> tuple[Queue, int, bool]:  # fmt: skip
    """Check access, find or create the queue to consume, register the consumer.
    Returns (queue, consumer id, whether this connection owns the queue)."""
    owned = False
    if destination.kind is access.Kind.QUEUE:
        queue = access.access_queue(user=user, name=destination.name, action=access.Action.CONSUME)
    else:
        topic = access.access_topic(user=user, name=destination.name, action=access.Action.CONSUME)
        assert subscription is not None
        try:
            queue = broker.get_subscription(topic=topic.name, name=subscription)
        except SubscriptionNotFound:
            queue, owned = broker.create_subscription(
                topic=topic, name=subscription, durable=durable, owner="" if durable else owner,
                expires_after_seconds=None if durable else 120, user=user,
            )  # fmt: skip
            owned = owned and not durable
    consumer_id = broker.register_consumer(
        connection=owner, user=user, queue=queue, protocol=protocol, prefetch=prefetch
    )
    return queue, consumer_id, owned


def _close_subscription(*, receipts: list[str], consumer_id: int | None, owned: Queue | None) -> None:
    _nack_all(receipts)
    if consumer_id is not None:
        broker.unregister_consumers(ids=[consumer_id])
    if owned is not None:
        broker.delete_queue(queue=owned)


def _publish(
    *, user: Any, destination: Destination, messages: Sequence[broker.OutgoingMessage], transaction_id: str | None
) -> list[broker.PublishResult]:
    if destination.kind is access.Kind.QUEUE:
        queue = access.access_queue(user=user, name=destination.name, action=access.Action.SEND)
        return broker.publish(queue=queue, messages=messages, transaction_id=transaction_id, user=user)
    topic = access.access_topic(user=user, name=destination.name, action=access.Action.SEND)
    return broker.publish(topic=topic, messages=messages, transaction_id=transaction_id, user=user)


def _nack_all(receipts: list[str]) -> None:
    """Make messages deliverable again now (flagged redelivered), not after the lease."""
    for i in range(0, len(receipts), 1000):
        broker.nack(receipts=receipts[i : i + 1000])


def _close_session(*, connection: str, receipts: list[str], transactions: list[str], user: Any) -> None:
    _nack_all(receipts)
    for transaction_id in transactions:
        try:
            broker.rollback(transaction_id=transaction_id, user=user)
        except BrokerError:  # committed, prepared or rolled back meanwhile
            pass
    broker.delete_owned_subscriptions(owner=connection)
    broker.unregister_consumers(connection=connection)


def _tick(*, consumers: dict[int, int], leases: list[tuple[list[str], int]], owned: list[Queue]) -> None:
    """Periodic upkeep: consumer heartbeats, leases of unacked messages (extended, so a push
    consumer keeps what it holds while connected), keep-alive of owned subscriptions."""
    broker.refresh_consumers(unacked=consumers)
    for receipts, timeout in leases:
        for i in range(0, len(receipts), 1000):
            broker.extend(receipts=receipts[i : i + 1000], visibility_timeout_seconds=timeout)
    for queue in owned:
        broker.keep_alive(queue=queue)
