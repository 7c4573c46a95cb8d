"""THE CORE: every delivery rule of Pegasus lives here (docs/API.md, "Concepts").

Each public function is one synchronous operation that owns its database transaction and takes
keyword-only arguments. REST, WebSocket, STOMP, the console, bridges and commands call these and
nothing else writes messages or delivery state.

Time-based rules need no daemon: lease expiry, delays and TTL are decided at query time inside
`receive`; housekeeping (idle transactions, expired non-durable subscriptions, acked rows, old
dedup records) is `run_maintenance`, which each server process runs on a timer
(messaging/maintenance.py).

Lock order, to stay free of deadlocks: transaction row, then delivery rows in id order, durable
store before transient store. Claims use FOR UPDATE SKIP LOCKED, so consumers never wait on
each other and never get the same row.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, QuerySet

from messaging import clock, conf, events, filters
from messaging.exceptions import (
    BatchTooLarge,
    InvalidName,
    InvalidRequest,
    MessageTooLarge,
    NameTaken,
    QueueNotFound,
    StaleReceipt,
    SubscriptionNotFound,
    TopicNotFound,
    TransactionNotFound,
    TransactionStateError,
)
from messaging.models import (
    NAME_PATTERN,
    DedupRecord,
    Delivery,
    DeliveryBase,
    ExpiredAction,
    Message,
    MessageBase,
    Queue,
    State,
    Topic,
    Transaction,
    TransientDelivery,
    TransientMessage,
    TxState,
)

_NAME_RE = re.compile(NAME_PATTERN)
MAX_DELAY_SECONDS = 7 * 24 * 3600
MAX_HEADERS = 100


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class Store:
    """Where a message lives: durable (logged) or transient (UNLOGGED on PostgreSQL)."""

    code: str
    message: type[MessageBase]
    delivery: type[DeliveryBase]

    def public_id(self, pk: int) -> str:
        return str(pk) if self is DURABLE else f"t{pk}"

    def deliveries(self) -> QuerySet[Any]:
        return self.delivery.objects.all()  # type: ignore[attr-defined,no-any-return]


DURABLE = Store("d", Message, Delivery)
TRANSIENT = Store("t", TransientMessage, TransientDelivery)
STORES = (DURABLE, TRANSIENT)


def store_for(durable: bool) -> Store:
    return DURABLE if durable else TRANSIENT


# --------------------------------------------------------------------------- values


@dataclass
class OutgoingMessage:
    """A message as a publisher sends it. Validated by `validate_message`."""

    body: str
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    durable: bool = True
    priority: int = 4
    delay_seconds: float = 0
    ttl_seconds: float | None = None
    dedup_id: str | None = None


@dataclass
class PublishResult:
    id: str
    duplicate: bool


@dataclass
class ReceivedMessage:
    id: str
    body: str
    content_type: str
    headers: dict[str, str]
    priority: int
    durable: bool
    published_at: datetime
    expires_at: datetime | None
    destination: str
    receipt: str
    delivery_count: int
    redelivered: bool


@dataclass
class QueueSettings:
    """Settings a queue or subscription may be created with; None means "the default"."""

    max_deliveries: int | None = None
    visibility_timeout_seconds: int | None = None
    dead_letter_queue: str | None = None
    dedup_window_seconds: int | None = None
    max_message_bytes: int | None = None
    expired_action: str | None = None


# --------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidName(f"Invalid name {str(name)[:50]!r}: names match {NAME_PATTERN}.")
    return name


def validate_message(msg: OutgoingMessage, *, max_bytes: int) -> None:
    if not isinstance(msg.body, str):
        raise InvalidRequest("body must be a string (binary as base64 with content_type).")
    if len(msg.body.encode("utf-8", "surrogatepass")) > max_bytes:
        raise MessageTooLarge(f"Message body is larger than {max_bytes} bytes.")
    if "\x00" in msg.body:
        raise InvalidRequest("body may not contain NUL characters; send binary as base64.")
    if not isinstance(msg.headers, dict) or len(msg.headers) > MAX_HEADERS:
        raise InvalidRequest(f"headers must be an object of at most {MAX_HEADERS} strings.")
    for key, value in msg.headers.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or len(key) > 200:
            raise InvalidRequest("headers map non-empty names to string values.")
        if "\x00" in key or "\x00" in value:
            raise InvalidRequest("headers may not contain NUL characters.")
    if isinstance(msg.priority, bool) or not isinstance(msg.priority, int) or not 0 <= msg.priority <= 9:
        raise InvalidRequest("priority is an integer from 0 to 9.")
    if not 0 <= msg.delay_seconds <= MAX_DELAY_SECONDS:
        raise InvalidRequest(f"delay_seconds is between 0 and {MAX_DELAY_SECONDS}.")
    if msg.ttl_seconds is not None and not 0 < msg.ttl_seconds <= 365 * 24 * 3600:
        raise InvalidRequest("ttl_seconds must be positive (at most a year).")
    if msg.dedup_id is not None and not (isinstance(msg.dedup_id, str) and 0 < len(msg.dedup_id) <= 200):
        raise InvalidRequest("dedup_id is a string of 1 to 200 characters.")
    if len(msg.content_type) > 200:
        raise InvalidRequest("content_type is at most 200 characters.")


def _positive(value: int | None, what: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise InvalidRequest(f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer.")


def _validate_settings(s: QueueSettings) -> None:
    _positive(s.max_deliveries, "max_deliveries")
    _positive(s.visibility_timeout_seconds, "visibility_timeout_seconds")
    _positive(s.dedup_window_seconds, "dedup_window_seconds", allow_zero=True)
    _positive(s.max_message_bytes, "max_message_bytes")
    if s.visibility_timeout_seconds is not None and s.visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    if s.max_message_bytes is not None and s.max_message_bytes > conf.get().max_request_bytes:
        raise InvalidRequest("max_message_bytes may not exceed the server's request size limit.")
    if s.expired_action is not None and s.expired_action not in ExpiredAction.values:
        raise InvalidRequest(f"expired_action is one of {', '.join(ExpiredAction.values)}.")
    if s.dead_letter_queue is not None:
        validate_name(s.dead_letter_queue)


# --------------------------------------------------------------------------- destinations


def _settings_fields(s: QueueSettings) -> dict[str, Any]:
    defaults = conf.get()
    dlq = None
    if s.dead_letter_queue is not None:
        dlq = Queue.objects.filter(topic__isnull=True, name=s.dead_letter_queue).first()
        if dlq is None:
            raise QueueNotFound(f"Dead-letter queue {s.dead_letter_queue!r} does not exist.")
    return {
        "max_deliveries": s.max_deliveries or defaults.default_max_deliveries,
        "visibility_timeout_seconds": s.visibility_timeout_seconds or defaults.default_visibility_timeout_seconds,
        "dedup_window_seconds": (
            defaults.default_dedup_window_seconds if s.dedup_window_seconds is None else s.dedup_window_seconds
        ),
        "max_message_bytes": s.max_message_bytes or defaults.default_max_message_bytes,
        "expired_action": s.expired_action or ExpiredAction.DROP,
        "dead_letter_queue": dlq,
    }


def _same_settings(existing: Queue, s: QueueSettings) -> bool:
    """True when every setting the caller gave explicitly matches the existing row."""
    wanted = _settings_fields(s)
    given = {k for k, v in vars(s).items() if v is not None}
    for key in given:
        model_key = key
        if key == "dead_letter_queue":
            if existing.dead_letter_queue_id != (wanted[key].pk if wanted[key] else None):
                return False
            continue
        if getattr(existing, model_key) != wanted[key]:
            return False
    return True


def create_queue(*, name: str, settings: QueueSettings | None = None, user: Any = None) -> tuple[Queue, bool]:
    """Create a queue; return (queue, created). An existing queue with the same explicitly given
    settings is returned as is (idempotent create); with other settings it raises NameTaken."""
    validate_name(name)
    s = settings or QueueSettings()
    _validate_settings(s)
    with transaction.atomic():
        existing = Queue.objects.filter(topic__isnull=True, name=name).first()
        if existing is not None:
            if not _same_settings(existing, s):
                raise NameTaken(f"Queue {name!r} exists with other settings.")
            return existing, False
        try:
            with transaction.atomic():
                queue = Queue.objects.create(name=name, created_by=_user_or_none(user), **_settings_fields(s))
        except IntegrityError:  # created concurrently: same answer as above
            existing = Queue.objects.get(topic__isnull=True, name=name)
            if not _same_settings(existing, s):
                raise NameTaken(f"Queue {name!r} exists with other settings.") from None
            return existing, False
    return queue, True


def get_queue(*, name: str) -> Queue:
    queue = Queue.objects.select_related("dead_letter_queue").filter(topic__isnull=True, name=name).first()
    if queue is None:
        raise QueueNotFound(f"Queue {name!r} does not exist.")
    return queue


def get_topic(*, name: str) -> Topic:
    topic = Topic.objects.filter(name=name).first()
    if topic is None:
        raise TopicNotFound(f"Topic {name!r} does not exist.")
    return topic


def get_subscription(*, topic: str, name: str) -> Queue:
    sub = Queue.objects.select_related("topic", "dead_letter_queue").filter(topic__name=topic, name=name).first()
    if sub is None:
        get_topic(name=topic)
        raise SubscriptionNotFound(f"Subscription {name!r} of topic {topic!r} does not exist.")
    return sub


def delete_queue(*, queue: Queue) -> None:
    """Delete a queue or subscription with all its messages."""
    with transaction.atomic():
        for store in STORES:
            _delete_deliveries(store, store.deliveries().filter(queue=queue), skip_locked=False)
        Queue.objects.filter(pk=queue.pk).delete()


def purge_queue(*, queue: Queue) -> int:
    """Remove the ready (and scheduled) messages. Leased, staged and dead-lettered ones stay:
    a consumer holding a lease can still ack it, and a transaction's work is its own."""
    with transaction.atomic():
        return sum(
            _delete_deliveries(store, store.deliveries().filter(queue=queue, state=State.READY)) for store in STORES
        )


def set_paused(*, queue: Queue, paused: bool) -> None:
    """Pause or resume delivery of a queue: publishes are still accepted while paused."""
    Queue.objects.filter(pk=queue.pk).update(paused=paused)
    if not paused:
        with transaction.atomic():
            events.notify_on_commit([queue.pk])


def create_topic(*, name: str) -> tuple[Topic, bool]:
    validate_name(name)
    try:
        with transaction.atomic():
            return Topic.objects.get_or_create(name=name)
    except IntegrityError:
        return Topic.objects.get(name=name), False


def delete_topic(*, topic: Topic) -> None:
    with transaction.atomic():
        for sub in Queue.objects.filter(topic=topic):
            delete_queue(queue=sub)
        Topic.objects.filter(pk=topic.pk).delete()


def create_subscription(
    *,
    topic: Topic,
    name: str,
    durable: bool = True,
    filter: object = None,
    owner: str = "",
    expires_after_seconds: int | None = None,
    settings: QueueSettings | None = None,
    user: Any = None,
) -> tuple[Queue, bool]:
    """Create a subscription. A non-durable one lives while its owner keeps it alive: a
    WebSocket connection (`owner`) or, for REST, a receive at least every
    `expires_after_seconds` (default 300)."""
    validate_name(name)
    flt = filters.validate(filter)
    s = settings or QueueSettings()
    _validate_settings(s)
    _positive(expires_after_seconds, "expires_after_seconds")
    if not durable and expires_after_seconds is None:
        expires_after_seconds = 300
    if durable:
        expires_after_seconds = None
    with transaction.atomic():
        existing = Queue.objects.filter(topic=topic, name=name).first()
        if existing is not None:
            if existing.durable != durable or existing.filter != flt or not _same_settings(existing, s):
                raise NameTaken(f"Subscription {name!r} exists with other settings.")
            _touch(existing)
            return existing, False
        expires_at = clock.now() + timedelta(seconds=expires_after_seconds) if expires_after_seconds else None
        try:
            with transaction.atomic():
                sub = Queue.objects.create(
                    name=name,
                    topic=topic,
                    durable=durable,
                    filter=flt,
                    owner=owner,
                    expires_after_seconds=expires_after_seconds,
                    expires_at=expires_at,
                    created_by=_user_or_none(user),
                    **_settings_fields(s),
                )
        except IntegrityError:
            raise NameTaken(f"Subscription {name!r} was just created by someone else.") from None
    return sub, True


def delete_owned_subscriptions(*, owner: str) -> int:
    """Delete the non-durable subscriptions of an owner (a closed connection), with their messages."""
    subs = list(Queue.objects.filter(topic__isnull=False, durable=False, owner=owner))
    for sub in subs:
        delete_queue(queue=sub)
    return len(subs)


def keep_alive(*, queue: Queue) -> None:
    """Push back the expiry of a non-durable subscription (called by its owner)."""
    _touch(queue)


def _touch(queue: Queue) -> None:
    if queue.expires_after_seconds:
        queue.expires_at = clock.now() + timedelta(seconds=queue.expires_after_seconds)
        Queue.objects.filter(pk=queue.pk).update(expires_at=queue.expires_at)


def _user_or_none(user: Any) -> Any:
    return user if user is not None and getattr(user, "pk", None) is not None else None


# --------------------------------------------------------------------------- publish


def publish(
    *,
    queue: Queue | None = None,
    topic: Topic | None = None,
    messages: Sequence[OutgoingMessage],
    transaction_id: str | None = None,
    user: Any = None,
) -> list[PublishResult]:
    """Publish a batch to a queue or a topic, all or nothing.

    Returns when the messages are committed (durable ones to disk). A message whose dedup_id was
    seen on this destination within its dedup window is answered with the first message's id
    and `duplicate=True`, and nothing is enqueued for it. Inside a transaction the messages are
    staged: invisible until commit, gone on rollback.
    """
    if (queue is None) == (topic is None):
        raise InvalidRequest("Publish to exactly one queue or topic.")
    limits = conf.get()
    if not messages:
        raise InvalidRequest("A publish needs at least one message.")
    if len(messages) > limits.max_batch_messages:
        raise BatchTooLarge(f"At most {limits.max_batch_messages} messages per batch.")
    max_bytes = queue.max_message_bytes if queue is not None else limits.default_max_message_bytes
    for msg in messages:
        validate_message(msg, max_bytes=max_bytes)
    window = queue.dedup_window_seconds if queue is not None else limits.default_dedup_window_seconds
    destination = f"queue:{queue.name}" if queue is not None else f"topic:{topic.name}"  # type: ignore[union-attr]
    with transaction.atomic():
        if transaction_id is not None:
            _lock_transaction(transaction_id, user=user, states=(TxState.OPEN,))
        now = clock.now()
        targets = [queue] if queue is not None else list(Queue.objects.filter(topic=topic).order_by("pk"))
        results = _publish_locked(
            destination=destination, targets=targets, messages=messages, window=window,
            transaction_id=transaction_id, now=now,
        )  # fmt: skip
    return results


def _publish_locked(
    *,
    destination: str,
    targets: list[Queue],
    messages: Sequence[OutgoingMessage],
    window: int,
    transaction_id: str | None,
    now: datetime,
) -> list[PublishResult]:
    results: list[PublishResult | None] = [None] * len(messages)
    first_in_batch: dict[str, int] = {}
    fresh: list[int] = []  # indexes of messages to enqueue
    for i, msg in enumerate(messages):
        if msg.dedup_id is not None and msg.dedup_id in first_in_batch:
            continue  # a repeat inside this batch: answered from the first below
        if msg.dedup_id is not None:
            first_in_batch[msg.dedup_id] = i
        fresh.append(i)

    rows_by_store: dict[Store, list[tuple[int, MessageBase]]] = {}
    for i in fresh:
        msg = messages[i]
        store = store_for(msg.durable)
        row = store.message(
            body=msg.body,
            content_type=msg.content_type,
            headers=msg.headers,
            priority=msg.priority,
            dedup_id=msg.dedup_id or "",
            destination=destination,
            published_at=now,
            expires_at=now + timedelta(seconds=msg.ttl_seconds) if msg.ttl_seconds else None,
        )
        rows_by_store.setdefault(store, []).append((i, row))
    for store, rows in rows_by_store.items():
        store.message.objects.bulk_create([row for _, row in rows])  # type: ignore[attr-defined]
        for i, row in rows:
            results[i] = PublishResult(id=store.public_id(row.pk), duplicate=False)

    duplicates = _claim_dedup_ids(
        destination=destination,
        claims={messages[i].dedup_id: results[i].id for i in fresh if messages[i].dedup_id},  # type: ignore[union-attr,misc]
        window=window,
        now=now,
    )
    if duplicates:
        for store, rows in rows_by_store.items():
            dropped = [row.pk for i, row in rows if messages[i].dedup_id in duplicates]
            if dropped:
                store.message.objects.filter(pk__in=dropped).delete()  # type: ignore[attr-defined]
            rows_by_store[store] = [(i, row) for i, row in rows if messages[i].dedup_id not in duplicates]
        for i in fresh:
            dedup_id = messages[i].dedup_id
            if dedup_id in duplicates:
                results[i] = PublishResult(id=duplicates[dedup_id], duplicate=True)
    for i, msg in enumerate(messages):
        if results[i] is None:
            first = results[first_in_batch[msg.dedup_id]]  # type: ignore[index]
            results[i] = PublishResult(id=first.id, duplicate=True)  # type: ignore[union-attr]

    touched = _create_deliveries(rows_by_store, messages, targets, transaction_id, now)
    if transaction_id is None:
        events.notify_on_commit(touched)
    return results  # type: ignore[return-value]


def _create_deliveries(
    rows_by_store: dict[Store, list[tuple[int, MessageBase]]],
    messages: Sequence[OutgoingMessage],
    targets: list[Queue],
    transaction_id: str | None,
    now: datetime,
) -> set[int]:
    touched: set[int] = set()
    state = State.STAGED if transaction_id is not None else State.READY
    for store, rows in rows_by_store.items():
        deliveries = []
        for i, row in rows:
            msg = messages[i]
            for target in targets:
                if not filters.matches(target.filter, msg.headers):
                    continue
                touched.add(target.pk)
                deliveries.append(
                    store.delivery(
                        message_id=row.pk,
                        queue_id=target.pk,
                        state=state,
                        priority=msg.priority,
                        visible_at=now + timedelta(seconds=msg.delay_seconds),
                        expires_at=row.expires_at,
                        transaction_id=transaction_id,
                    )
                )
        store.delivery.objects.bulk_create(deliveries, batch_size=1000)  # type: ignore[attr-defined]
    return touched


def _claim_dedup_ids(*, destination: str, claims: dict[str, str], window: int, now: datetime) -> dict[str, str]:
    """Record dedup ids for this destination; return {dedup_id: first id} for those already seen
    within the window. The unique index makes a concurrent publisher of the same dedup_id wait
    for ours to commit, then see it as a duplicate."""
    if not claims:
        return {}
    table = DedupRecord._meta.db_table
    cutoff = now - timedelta(seconds=window)
    values = ", ".join(["(%s, %s, %s, %s)"] * len(claims))
    params: list[Any] = []
    for dedup_id, message_id in claims.items():
        params += [destination, dedup_id, message_id, _db_datetime(now)]
    sql = (
        f"INSERT INTO {table} (destination, dedup_id, message_id, created_at) VALUES {values} "
        f"ON CONFLICT (destination, dedup_id) DO UPDATE SET message_id = excluded.message_id, "
        f"created_at = excluded.created_at WHERE {table}.created_at < %s RETURNING dedup_id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, _db_datetime(cutoff)])
        claimed = {row[0] for row in cursor.fetchall()}
    seen = [d for d in claims if d not in claimed]
    if not seen:
        return {}
    return dict(
        DedupRecord.objects.filter(destination=destination, dedup_id__in=seen).values_list("dedup_id", "message_id")
    )


def _db_datetime(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


# --------------------------------------------------------------------------- receive


def receive(
    *,
    queue: Queue,
    max_messages: int = 1,
    visibility_timeout_seconds: int | None = None,
) -> list[ReceivedMessage]:
    """Lease up to `max_messages` deliverable messages, highest priority first, then oldest.

    Before claiming, expired leases of this queue are returned (redelivered, or dead-lettered
    after max_deliveries) and messages past their TTL are dropped or dead-lettered.
    """
    if not 1 <= max_messages <= 1000:
        raise InvalidRequest("max_messages is between 1 and 1000.")
    _positive(visibility_timeout_seconds, "visibility_timeout_seconds")
    if visibility_timeout_seconds is not None and visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    vt = visibility_timeout_seconds or queue.visibility_timeout_seconds
    with transaction.atomic():
        now = clock.now()
        _touch(queue)
        if queue.paused:
            return []
        for store in STORES:
            _expire_leases(store, queue, now)
            _expire_messages(store, queue, now)
        chosen = _choose(queue, max_messages, now)
        return _lease(queue, chosen, now + timedelta(seconds=vt))


def _ready_now(store: Store, queue: Queue, now: datetime) -> QuerySet[Any]:
    return store.deliveries().filter(queue=queue, state=State.READY, visible_at__lte=now)


def _choose(queue: Queue, limit: int, now: datetime) -> list[tuple[Store, int]]:
    """Lock up to `limit` deliverable rows per store (skipping rows other consumers hold), then
    keep the best `limit` across both stores."""
    candidates: list[tuple[int, datetime, int, Store, int]] = []
    for order, store in enumerate(STORES):
        rows = (
            _ready_now(store, queue, now)
            .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            .select_for_update(skip_locked=True, of=("self",))
            .order_by("-priority", "id")
            .values_list("id", "priority", "visible_at")[:limit]
        )
        candidates += [(-priority, visible_at, order, store, pk) for pk, priority, visible_at in rows]
    candidates.sort(key=lambda c: (c[0], c[1], c[2], c[4]))
    return [(store, pk) for _, _, _, store, pk in candidates[:limit]]


def _lease(queue: Queue, chosen: list[tuple[Store, int]], deadline: datetime) -> list[ReceivedMessage]:
    token = secrets.token_hex(8)
    received: list[ReceivedMessage] = []
    for store in STORES:
        ids = [pk for s, pk in chosen if s is store]
        if not ids:
            continue
        store.deliveries().filter(pk__in=ids).update(
            state=State.LEASED, visible_at=deadline, lease_token=token, delivery_count=F("delivery_count") + 1
        )
        rows = store.deliveries().filter(pk__in=ids).select_related("message", "origin_queue__topic")
        received += [_render(store, queue, row) for row in rows]
    order = {(s.code, pk): n for n, (s, pk) in enumerate(chosen)}
    received.sort(key=lambda m: order[(m.receipt[0], int(m.receipt[1:].split(".")[0]))])
    return received


def _render(store: Store, queue: Queue, row: Any) -> ReceivedMessage:
    msg = row.message
    headers = dict(msg.headers)
    if row.dead_letter_reason:
        headers["x-dead-letter-reason"] = row.dead_letter_reason
        if row.origin_queue is not None:
            headers["x-dead-letter-origin"] = row.origin_queue.label
    return ReceivedMessage(
        id=store.public_id(msg.pk),
        body=msg.body,
        content_type=msg.content_type,
        headers=headers,
        priority=msg.priority,
        durable=store is DURABLE,
        published_at=msg.published_at,
        expires_at=msg.expires_at,
        destination=queue.label,
        receipt=f"{store.code}{row.pk}.{row.lease_token}",
        delivery_count=row.delivery_count,
        redelivered=row.delivery_count > 1,
    )


def _expire_leases(store: Store, queue: Queue, now: datetime) -> None:
    """Return leases whose deadline passed (and that no transaction holds) to the queue."""
    expired = list(
        store.deliveries()
        .filter(queue=queue, state=State.LEASED, visible_at__lte=now, transaction_id__isnull=True)
        .select_for_update(skip_locked=True, of=("self",))
        .order_by("id")
        .values_list("id", flat=True)
    )
    if expired:
        _return_to_queue(store, queue, expired, visible_at=now, reason="max_deliveries")


def _expire_messages(store: Store, queue: Queue, now: datetime) -> None:
    """Messages past their TTL are never delivered: drop or dead-letter them."""
    expired = store.deliveries().filter(queue=queue, state=State.READY, expires_at__lte=now)
    if queue.expired_action == ExpiredAction.DEAD_LETTER:
        ids = list(
            expired.select_for_update(skip_locked=True, of=("self",)).order_by("id").values_list("id", flat=True)
        )
        if ids:
            _dead_letter(store, queue, ids, reason="expired")
    else:
        _delete_deliveries(store, expired)


def _return_to_queue(store: Store, queue: Queue, ids: list[int], *, visible_at: datetime, reason: str) -> None:
    """Make leased rows deliverable again, or dead-letter those that used up max_deliveries.
    Should be called while holding the rows' locks."""
    rows = store.deliveries().filter(pk__in=ids)
    exhausted = list(rows.filter(delivery_count__gte=queue.max_deliveries).values_list("id", flat=True))
    rows.filter(delivery_count__lt=queue.max_deliveries).update(
        state=State.READY, visible_at=visible_at, lease_token="", transaction_id=None
    )
    if exhausted:
        _dead_letter(store, queue, exhausted, reason=reason)
    events.notify_on_commit([queue.pk])


def _dead_letter(store: Store, queue: Queue, ids: list[int], *, reason: str) -> None:
    """Move rows to the queue's dead-letter queue, or keep them here as DEAD if it has none."""
    rows = store.deliveries().filter(pk__in=ids)
    # A dead letter is kept until someone deals with it: its TTL no longer applies.
    common = {
        "lease_token": "", "transaction_id": None, "origin_queue_id": queue.pk,
        "dead_letter_reason": reason, "expires_at": None,
    }  # fmt: skip
    dlq_id = queue.dead_letter_queue_id
    if dlq_id is not None and dlq_id != queue.pk:
        rows.update(queue_id=dlq_id, state=State.READY, visible_at=clock.now(), delivery_count=0, **common)
        events.notify_on_commit([dlq_id])
    else:
        rows.update(state=State.DEAD, **common)


def _delete_deliveries(store: Store, deliveries: QuerySet[Any], *, skip_locked: bool = True) -> int:
    """Delete delivery rows in chunks (locked in id order), then the messages no other delivery
    refers to. With skip_locked, rows another transaction holds are left alone."""
    deleted = 0
    while True:
        chunk = list(
            deliveries.select_for_update(skip_locked=skip_locked, of=("self",))
            .order_by("id")
            .values_list("id", "message_id")[:2000]
        )
        if not chunk:
            return deleted
        store.deliveries().filter(pk__in=[pk for pk, _ in chunk]).delete()
        message_ids = sorted({mid for _, mid in chunk})
        store.message.objects.filter(pk__in=message_ids).exclude(  # type: ignore[attr-defined]
            pk__in=store.deliveries().filter(message_id__in=message_ids).values("message_id")
        ).delete()
        deleted += len(chunk)


# --------------------------------------------------------------------------- ack, nack, extend

ACK_OK = "ok"
ACK_STALE = "stale_receipt"


def _parse_receipt(receipt: str) -> tuple[Store, int, str] | None:
    if not isinstance(receipt, str) or len(receipt) > 80:
        return None
    store = DURABLE if receipt[:1] == "d" else TRANSIENT if receipt[:1] == "t" else None
    pk, _, token = receipt[1:].partition(".")
    if store is None or not pk.isdigit() or not token or len(pk) > 19:
        return None
    return store, int(pk), token


def _lock_receipts(receipts: Sequence[str]) -> tuple[list[tuple[Store, int, str] | None], dict[tuple[str, int], Any]]:
    """Parse receipts and lock their rows, durable store first, in id order (lock order)."""
    if len(receipts) > 1000:
        raise BatchTooLarge("At most 1000 receipts per request.")
    parsed = [_parse_receipt(r) for r in receipts]
    rows: dict[tuple[str, int], Any] = {}
    for store in STORES:
        ids = sorted({p[1] for p in parsed if p is not None and p[0] is store})
        if ids:
            for row in store.deliveries().filter(pk__in=ids).select_for_update(of=("self",)).order_by("id"):
                rows[(store.code, row.pk)] = row
    return parsed, rows


def _holds_lease(row: Any, token: str, now: datetime) -> bool:
    return bool(
        row is not None
        and row.state == State.LEASED
        and row.lease_token == token
        and row.transaction_id is None
        and row.visible_at > now
    )


def ack(*, receipts: Sequence[str], transaction_id: str | None = None, user: Any = None) -> list[str]:
    """Acknowledge deliveries; one status per receipt, in order: "ok" or "stale_receipt".

    Only the current lease's receipt can ack; an ack of an expired or superseded lease changes
    nothing. Repeating a successful ack answers "ok" again (acked rows are kept for
    ACK_RETENTION_SECONDS). Inside a transaction the message stays leased to the transaction
    until commit (acked) or rollback (redelivered).
    """
    retention = timedelta(seconds=conf.get().ack_retention_seconds)
    with transaction.atomic():
        if transaction_id is not None:
            _lock_transaction(transaction_id, user=user, states=(TxState.OPEN,))
        now = clock.now()
        parsed, rows = _lock_receipts(receipts)
        statuses: list[str] = []
        to_ack: dict[Store, list[int]] = {}
        for p in parsed:
            row = rows.get((p[0].code, p[1])) if p else None
            if p is None or row is None or row.lease_token != p[2]:
                statuses.append(ACK_STALE)
            elif row.state == State.ACKED or (
                transaction_id is not None and row.state == State.LEASED and row.transaction_id == transaction_id
            ):
                statuses.append(ACK_OK)  # a repeat of an ack that already succeeded
            elif _holds_lease(row, p[2], now):
                statuses.append(ACK_OK)
                to_ack.setdefault(p[0], []).append(row.pk)
            else:
                statuses.append(ACK_STALE)
        for store, ids in to_ack.items():
            if transaction_id is not None:
                store.deliveries().filter(pk__in=ids).update(transaction_id=transaction_id)
            else:
                store.deliveries().filter(pk__in=ids).update(state=State.ACKED, visible_at=now + retention)
    return statuses


def nack(*, receipts: Sequence[str], delay_seconds: float = 0) -> list[str]:
    """Give leased messages back, deliverable again after `delay_seconds` (redelivered), or
    dead-lettered if they used up max_deliveries."""
    if not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
        raise InvalidRequest(f"delay_seconds is between 0 and {MAX_DELAY_SECONDS}.")
    with transaction.atomic():
        now = clock.now()
        parsed, rows = _lock_receipts(receipts)
        statuses, held = _partition_held(parsed, rows, now)
        for (store, queue_id), ids in held.items():
            queue = Queue.objects.select_related("topic").get(pk=queue_id)
            _return_to_queue(store, queue, ids, visible_at=now + timedelta(seconds=delay_seconds), reason="nacked")
    return statuses


def extend(*, receipts: Sequence[str], visibility_timeout_seconds: int) -> list[str]:
    """Push the lease deadline of held messages to now + visibility_timeout_seconds."""
    _positive(visibility_timeout_seconds, "visibility_timeout_seconds")
    if visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    with transaction.atomic():
        now = clock.now()
        parsed, rows = _lock_receipts(receipts)
        statuses, held = _partition_held(parsed, rows, now)
        for (store, _), ids in held.items():
            store.deliveries().filter(pk__in=ids).update(visible_at=now + timedelta(seconds=visibility_timeout_seconds))
    return statuses


def _partition_held(
    parsed: list[tuple[Store, int, str] | None], rows: dict[tuple[str, int], Any], now: datetime
) -> tuple[list[str], dict[tuple[Store, int], list[int]]]:
    statuses: list[str] = []
    held: dict[tuple[Store, int], list[int]] = {}
    for p in parsed:
        row = rows.get((p[0].code, p[1])) if p else None
        if p is not None and _holds_lease(row, p[2], now):
            statuses.append(ACK_OK)
            held.setdefault((p[0], row.queue_id), []).append(row.pk)
        else:
            statuses.append(ACK_STALE)
    return statuses, held


def require_some_ok(statuses: list[str]) -> list[str]:
    """Raise StaleReceipt when every receipt was stale (the REST contract's 409)."""
    if statuses and all(s == ACK_STALE for s in statuses):
        raise StaleReceipt("Every receipt is stale: the leases expired or were superseded.")
    return statuses


# --------------------------------------------------------------------------- dead letters


def redrive(*, queue: Queue, max_messages: int | None = None) -> int:
    """Move this queue's dead letters back to where they came from (a dead-letter queue's
    messages to their origins, a queue's own DEAD messages to ready), as fresh deliveries."""
    _positive(max_messages, "max_messages")
    moved = 0
    with transaction.atomic():
        now = clock.now()
        for store in STORES:
            remaining = None if max_messages is None else max_messages - moved
            if remaining == 0:
                break
            qs = (
                store.deliveries()
                .filter(queue=queue, origin_queue__isnull=False, state__in=[State.READY, State.DEAD])
                .select_for_update(skip_locked=True, of=("self",))
                .order_by("id")
                .values_list("id", "origin_queue_id")
            )
            rows = list(qs if remaining is None else qs[:remaining])
            by_origin: dict[int, list[int]] = {}
            for pk, origin in rows:
                by_origin.setdefault(origin, []).append(pk)
            for origin, ids in by_origin.items():
                store.deliveries().filter(pk__in=ids).update(
                    queue_id=origin, state=State.READY, visible_at=now, delivery_count=0,
                    origin_queue=None, dead_letter_reason="", lease_token="",
                )  # fmt: skip
            events.notify_on_commit(by_origin)
            moved += len(rows)
    return moved


# --------------------------------------------------------------------------- transactions


def begin(*, user: Any = None) -> Transaction:
    now = clock.now()
    return Transaction.objects.create(
        id=secrets.token_hex(16), owner=_user_or_none(user), state=TxState.OPEN, created_at=now, last_activity_at=now
    )


def _lock_transaction(transaction_id: str, *, user: Any, states: Iterable[str]) -> Transaction:
    """Lock a transaction row of this user (admins: any) that is in one of `states`."""
    txn = Transaction.objects.select_for_update().filter(pk=str(transaction_id)[:40]).first()
    if txn is None or not _may_use(txn, user):
        raise TransactionNotFound(f"Transaction {str(transaction_id)[:40]!r} does not exist.")
    if txn.state not in states:
        raise TransactionStateError(f"Transaction is {txn.state}.")
    txn.last_activity_at = clock.now()
    Transaction.objects.filter(pk=txn.pk).update(last_activity_at=txn.last_activity_at)
    return txn


def _may_use(txn: Transaction, user: Any) -> bool:
    if user is None or getattr(user, "is_superuser", False):
        return True
    return txn.owner_id == getattr(user, "pk", None)


def get_transaction(*, transaction_id: str, user: Any = None) -> Transaction:
    txn = Transaction.objects.filter(pk=str(transaction_id)[:40]).first()
    if txn is None or not _may_use(txn, user):
        raise TransactionNotFound(f"Transaction {str(transaction_id)[:40]!r} does not exist.")
    return txn


def prepare(*, transaction_id: str, user: Any = None) -> Transaction:
    """Phase one: the staged work is already in the database; from now on it survives restarts
    and timeouts until commit or rollback (listed by list_transactions(state="prepared"))."""
    with transaction.atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED))
        if txn.state == TxState.OPEN:
            txn.state = TxState.PREPARED
            txn.prepared_at = clock.now()
            txn.save(update_fields=["state", "prepared_at"])
        return txn


def commit(*, transaction_id: str, user: Any = None) -> Transaction:
    """Apply all staged publishes and acks at once. Committing again answers the same."""
    retention = timedelta(seconds=conf.get().ack_retention_seconds)
    with transaction.atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED, TxState.COMMITTED))
        if txn.state == TxState.COMMITTED:
            return txn
        now = clock.now()
        touched: set[int] = set()
        for store in STORES:
            staged = store.deliveries().filter(transaction_id=txn.pk)
            touched |= set(staged.filter(state=State.STAGED).values_list("queue_id", flat=True).distinct())
            staged.filter(state=State.STAGED).update(state=State.READY, transaction_id=None)
            staged.filter(state=State.LEASED).update(state=State.ACKED, visible_at=now + retention, transaction_id=None)
        _finish(txn, TxState.COMMITTED, now)
        events.notify_on_commit(touched)
        return txn


def rollback(*, transaction_id: str, user: Any = None) -> Transaction:
    """Discard staged publishes (and their dedup records) and release the transaction's acked
    messages for redelivery. Rolling back again answers the same."""
    with transaction.atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED, TxState.ROLLED_BACK))
        if txn.state == TxState.ROLLED_BACK:
            return txn
        _rollback_locked(txn)
        return txn


def _rollback_locked(txn: Transaction) -> None:
    now = clock.now()
    for store in STORES:
        staged = store.deliveries().filter(transaction_id=txn.pk, state=State.STAGED)
        message_ids = list(staged.values_list("message_id", flat=True).distinct())
        if message_ids:
            public = [store.public_id(pk) for pk in message_ids]
            DedupRecord.objects.filter(message_id__in=public).delete()
            _delete_deliveries(store, staged)
        acked = store.deliveries().filter(transaction_id=txn.pk, state=State.LEASED)
        by_queue: dict[int, list[int]] = {}
        for pk, queue_id in acked.order_by("id").values_list("id", "queue_id"):
            by_queue.setdefault(queue_id, []).append(pk)
        for queue_id, ids in by_queue.items():
            queue = Queue.objects.get(pk=queue_id)
            _return_to_queue(store, queue, ids, visible_at=now, reason="max_deliveries")
    _finish(txn, TxState.ROLLED_BACK, now)


def _finish(txn: Transaction, state: str, now: datetime) -> None:
    txn.state = state
    txn.finished_at = now
    txn.save(update_fields=["state", "finished_at"])


def list_transactions(*, state: str | None = None, user: Any = None) -> list[Transaction]:
    if state is not None and state not in TxState.values:
        raise InvalidRequest(f"state is one of {', '.join(TxState.values)}.")
    qs = Transaction.objects.order_by("created_at")
    if state is not None:
        qs = qs.filter(state=state)
    if user is not None and not getattr(user, "is_superuser", False):
        qs = qs.filter(owner=user)
    return list(qs[:1000])


# --------------------------------------------------------------------------- housekeeping


@dataclass
class MaintenanceReport:
    transactions_rolled_back: int = 0
    subscriptions_expired: int = 0
    acked_removed: int = 0
    dedup_removed: int = 0
    transactions_removed: int = 0


def run_maintenance(*, batch: int = 10_000) -> MaintenanceReport:
    """One round of housekeeping. Safe to run from several processes at once."""
    report = MaintenanceReport()
    limits = conf.get()
    now = clock.now()
    idle_before = now - timedelta(seconds=limits.transaction_timeout_seconds)
    for txn_id in Transaction.objects.filter(state=TxState.OPEN, last_activity_at__lt=idle_before).values_list(
        "pk", flat=True
    )[:100]:
        with transaction.atomic():
            txn = Transaction.objects.select_for_update(skip_locked=True).filter(pk=txn_id).first()
            if txn is not None and txn.state == TxState.OPEN and txn.last_activity_at < idle_before:
                _rollback_locked(txn)
                report.transactions_rolled_back += 1
    for sub in Queue.objects.filter(topic__isnull=False, durable=False, expires_at__lte=now)[:100]:
        delete_queue(queue=sub)
        report.subscriptions_expired += 1
    for store in STORES:
        with transaction.atomic():
            report.acked_removed += _delete_deliveries(
                store, store.deliveries().filter(state=State.ACKED, visible_at__lte=now)
            )
    longest = max(
        [limits.default_dedup_window_seconds, *Queue.objects.values_list("dedup_window_seconds", flat=True)[:10000]]
    )
    report.dedup_removed, _ = DedupRecord.objects.filter(created_at__lt=now - timedelta(seconds=longest)).delete()
    report.transactions_removed, _ = Transaction.objects.filter(
        state__in=[TxState.COMMITTED, TxState.ROLLED_BACK], finished_at__lt=now - timedelta(hours=1)
    ).delete()
    return report
