"""Receive (lease), ack, nack, extend, lease expiry, TTL and dead letters."""

from __future__ import annotations

import functools
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connection
from django.db.models import F, Q, QuerySet

from messaging import clock, conf, events, metrics
from messaging.broker import bulk
from messaging.broker.common import (
    ANY_QUEUE,
    DURABLE,
    MAX_DELAY_SECONDS,
    STORES,
    TRANSIENT,
    ReceivedMessage,
    Store,
    _lock_transaction,
    _positive,
    _touch,
    atomic,
    may_be_one_statement,
    one_statement,
)
from messaging.exceptions import (
    BatchTooLarge,
    InvalidRequest,
    PermissionDenied,
    StaleReceipt,
)
from messaging.models import (
    ExpiredAction,
    Queue,
    State,
    TxState,
)

# Decides whether the caller may consume from a queue (messaging.access.may_consume).
Authorize = Callable[[Queue], bool]

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
    vt = _receive_args(queue, max_messages, visibility_timeout_seconds)
    with atomic():
        return _receive_locked(queue, max_messages, vt)


def ack_and_receive(
    *,
    receipts: Sequence[str],
    queue: Queue,
    max_messages: int,
    visibility_timeout_seconds: int | None = None,
    user: Any = None,
    authorize: Authorize | None = None,
) -> tuple[list[str], list[ReceivedMessage]]:
    """`ack(receipts)` (outside any messaging transaction), then `receive(queue, max_messages)`,
    in ONE database transaction: one commit instead of two for a consumer that acks what it has
    and takes the next messages (a push consumer; a REST receive carrying `ack`). Each keeps its
    own contract: the statuses are ack's, the messages receive's; an error in either changes
    nothing at all (the caller may then ack alone). `receipts` may be empty and `max_messages` 0."""
    vt = _receive_args(queue, max_messages, visibility_timeout_seconds) if max_messages else 0
    with atomic():
        statuses = _ack_locked(receipts, None, user, authorize) if receipts else []
        messages = _receive_locked(queue, max_messages, vt) if max_messages else []
    return statuses, messages


def _receive_args(queue: Queue, max_messages: int, visibility_timeout_seconds: int | None) -> int:
    """Check receive's arguments; returns the lease's visibility timeout in seconds."""
    if not 1 <= max_messages <= 1000:
        raise InvalidRequest("max_messages is between 1 and 1000.")
    _positive(visibility_timeout_seconds, "visibility_timeout_seconds")
    if visibility_timeout_seconds is not None and visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    return visibility_timeout_seconds or queue.visibility_timeout_seconds


def _receive_locked(queue: Queue, max_messages: int, vt: int) -> list[ReceivedMessage]:
    """receive's work. Should be called inside atomic()."""
    now = clock.now()
    _touch(queue)
    if queue.paused:
        return []
    if _ttl_sweep_due(queue, now):
        for store in STORES:
            _expire_messages(store, queue, now)
    deadline = now + timedelta(seconds=vt)
    if connection.vendor == "postgresql":  # check, choose and lease in one round trip (broker/bulk.py)
        claim = functools.partial(
            bulk.claim, stores=STORES, queue_id=queue.pk, limit=max_messages, now=now, deadline=deadline,
            token=secrets.token_hex(8),
        )  # fmt: skip
        rows = claim(gated=True)
        if rows is None:  # the queue has expired leases: return them first, then claim
            _expire_leases_all(queue, now)
            rows = claim(gated=False)
            assert rows is not None
        metrics.count_queues_on_commit(metrics.DELIVERED, {queue.pk: len(rows)})
        return [_render_leased(STORES[store], queue, row) for store, row in rows]
    _expire_leases_all(queue, now)
    chosen = _choose(queue, max_messages, now)
    metrics.count_queues_on_commit(metrics.DELIVERED, {queue.pk: len(chosen)})
    return _lease(queue, chosen, deadline)


# Finding messages past their TTL scans every ready row of the queue (no index leads with
# expires_at), which a deep backlog turns into the cost of every receive. Expired messages are
# never delivered either way (the claim skips them); dropping or dead-lettering them runs at most
# once per TTL_SWEEP_SECONDS per queue and process. Keyed by created_at too: SQLite reuses pks.
TTL_SWEEP_SECONDS = 1.0
_last_ttl_sweep: dict[tuple[int, datetime], datetime] = {}


def _ttl_sweep_due(queue: Queue, now: datetime) -> bool:
    key = (queue.pk, queue.created_at)
    last = _last_ttl_sweep.get(key)
    if last is not None and timedelta(0) <= now - last < timedelta(seconds=TTL_SWEEP_SECONDS):
        return False
    if len(_last_ttl_sweep) > 10_000:  # queues come and go: forget them all now and then
        _last_ttl_sweep.clear()
    _last_ttl_sweep[key] = now
    return True


def _ready_now(store: Store, queue: Queue, now: datetime) -> QuerySet[Any]:
    return store.deliveries().filter(queue=queue, state=State.READY, visible_at__lte=now)


def _choose(queue: Queue, limit: int, now: datetime) -> list[tuple[Store, int]]:
    """SQLite (on PostgreSQL bulk.claim does _choose and _lease in one statement). Lock up to
    `limit` deliverable rows per store (skipping rows other consumers hold), then keep the best
    `limit` across both stores."""
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


def _render_leased(store: Store, queue: Queue, row: bulk.LeasedRow) -> ReceivedMessage:
    """_render for a row of bulk.claim: (delivery pk, delivery_count, lease_token, dead_letter_reason,
    origin_queue_id, message pk, body, content_type, headers, priority, published_at, expires_at)."""
    pk, count, token, reason, origin_id, msg_pk, body, content_type, headers, priority, published, expires = row
    headers = dict(bulk.json_value(headers))
    if reason:
        headers["x-dead-letter-reason"] = reason
        origin = Queue.objects.select_related("topic").filter(pk=origin_id).first() if origin_id else None
        if origin is not None:
            headers["x-dead-letter-origin"] = origin.label
    return ReceivedMessage(
        id=store.public_id(msg_pk), body=body, content_type=content_type, headers=headers, priority=priority,
        durable=store is DURABLE, published_at=published, expires_at=expires, destination=queue.label,
        receipt=f"{store.code}{pk}.{token}", delivery_count=count, redelivered=count > 1,
    )  # fmt: skip


# Leased rows of one queue whose deadline passed, in both stores, locked: one round trip.
_EXPIRED_LEASES_SQL = """
WITH d AS (
  SELECT id FROM {durable}
  WHERE queue_id = %s AND state = {leased} AND visible_at <= %s AND transaction_id IS NULL
  ORDER BY id FOR UPDATE SKIP LOCKED
), t AS (
  SELECT id FROM {transient}
  WHERE queue_id = %s AND state = {leased} AND visible_at <= %s AND transaction_id IS NULL
  ORDER BY id FOR UPDATE SKIP LOCKED
)
SELECT 0, id FROM d UNION ALL SELECT 1, id FROM t
"""


def _expire_leases_all(queue: Queue, now: datetime) -> None:
    """_expire_leases for every store (on PostgreSQL in one statement: receive runs it each time)."""
    if connection.vendor != "postgresql":
        for store in STORES:
            _expire_leases(store, queue, now)
        return
    durable, transient = STORES
    sql = _EXPIRED_LEASES_SQL.format(
        durable=durable.delivery._meta.db_table, transient=transient.delivery._meta.db_table, leased=State.LEASED.value
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [queue.pk, now] * 2)
        expired = cursor.fetchall()
    for order, store in enumerate(STORES):
        ids = sorted(pk for s, pk in expired if s == order)
        if ids:
            _return_to_queue(store, queue, ids, visible_at=now, reason="max_deliveries")


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
        store.message.objects.filter(pk__in=message_ids).exclude(
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


class _Held(NamedTuple):
    """The columns of a delivery row that ack, nack and extend decide on."""

    pk: int
    state: int
    lease_token: str
    transaction_id: str | None
    visible_at: datetime
    queue_id: int


_LOCK_SQL = (
    "SELECT id, state, lease_token, transaction_id, visible_at, queue_id FROM {table} "
    "WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
)


_QUEUES_BY_ID = f"SELECT * FROM {Queue._meta.db_table} WHERE id IN ({{}})"


def _lock_receipts(
    receipts: Sequence[str], authorize: Authorize | None = None, *, ack_at: tuple[datetime, datetime] | None = None
) -> tuple[list[tuple[Store, int, str] | None], dict[tuple[str, int], _Held]]:
    """Parse receipts and lock their rows, durable store first, in id order (lock order).
    Returns the rows as they were when locked.

    With `ack_at` (now, retained until), on PostgreSQL the same statement also acks every row
    whose lease its receipt holds (bulk.ack; _holds_lease is the same test), saving ack a round
    trip; the caller then only decides the statuses.

    With `authorize`, every queue that a receipt validly names must pass it, or PermissionDenied
    is raised (a receipt alone is not permission to consume). The check runs after the rows are
    locked (and perhaps acked): raised inside the caller's atomic block, it undoes the ack."""
    if len(receipts) > 1000:
        raise BatchTooLarge("At most 1000 receipts per request.")
    parsed = [_parse_receipt(r) for r in receipts]
    rows: dict[tuple[str, int], _Held] = {}
    for store in STORES:
        mine = sorted({(p[1], p[2]) for p in parsed if p is not None and p[0] is store})
        if not mine:
            continue
        ids = sorted({pk for pk, _ in mine})
        if connection.vendor == "postgresql" and ack_at is not None:
            found = bulk.ack(store=store, receipts=mine, now=ack_at[0], retain_until=ack_at[1])
        elif connection.vendor == "postgresql":  # one statement, tuples instead of model objects
            with bulk.server_cursor() as cursor:
                cursor.execute(_LOCK_SQL.format(table=store.delivery._meta.db_table), [ids])
                found = cursor.fetchall()
        else:
            found = list(
                store.deliveries()
                .filter(pk__in=ids)
                .select_for_update(of=("self",))
                .order_by("id")
                .values_list("id", "state", "lease_token", "transaction_id", "visible_at", "queue_id")
            )
        for values in found:
            rows[(store.code, values[0])] = _Held(*values)
    if authorize is not None and authorize is not ANY_QUEUE:
        named = {row.queue_id for p in parsed if p and (row := rows.get((p[0].code, p[1]))) and row.lease_token == p[2]}
        ids = sorted(named)
        for queue in Queue.objects.raw(_QUEUES_BY_ID.format(", ".join(["%s"] * len(ids))), ids) if ids else ():
            if not authorize(queue):
                raise PermissionDenied(f"Not permitted to consume from {queue.label!r}.")
    return parsed, rows


def _holds_lease(row: _Held | None, token: str, now: datetime) -> bool:
    return bool(
        row is not None
        and row.state == State.LEASED
        and row.lease_token == token
        and row.transaction_id is None
        and row.visible_at > now
    )


def ack(
    *,
    receipts: Sequence[str],
    transaction_id: str | None = None,
    user: Any = None,
    authorize: Authorize | None = None,
) -> list[str]:
    """Acknowledge deliveries; one status per receipt, in order: "ok" or "stale_receipt".

    Only the current lease's receipt can ack; an ack of an expired or superseded lease changes
    nothing. Repeating a successful ack answers "ok" again (acked rows are kept for
    ACK_RETENTION_SECONDS). Inside a transaction the message stays leased to the transaction
    until commit (acked) or rollback (redelivered).
    """
    with one_statement() if _ack_commits_alone(receipts, transaction_id, authorize) else atomic():
        return _ack_locked(receipts, transaction_id, user, authorize)


def _ack_commits_alone(receipts: Sequence[str], transaction_id: str | None, authorize: Authorize | None) -> bool:
    """May the ack be its one statement's transaction (broker.common.one_statement)? Yes on
    PostgreSQL for receipts of one store (bulk.ack, one statement a store), outside a messaging
    transaction, with nothing to authorize: the queues' check comes after the statement, and a
    refusal must undo it."""
    return (
        transaction_id is None
        and (authorize is None or authorize is ANY_QUEUE)
        and len({str(r)[:1] for r in receipts}) <= 1  # one store code ("d", "t"); garbage: atomic()
        and may_be_one_statement()
    )


def _ack_locked(
    receipts: Sequence[str], transaction_id: str | None, user: Any, authorize: Authorize | None
) -> list[str]:
    """ack's work. Should be called inside atomic()."""
    retention = timedelta(seconds=conf.get().ack_retention_seconds)
    if transaction_id is not None:
        _lock_transaction(transaction_id, user=user, states=(TxState.OPEN,))
    now = clock.now()
    ack_at = (now, now + retention) if transaction_id is None else None
    parsed, rows = _lock_receipts(receipts, authorize, ack_at=ack_at)
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
    metrics.count_queues_on_commit(
        metrics.ACKED, Counter(rows[(store.code, pk)].queue_id for store, ids in to_ack.items() for pk in ids)
    )
    for store, ids in to_ack.items():
        if transaction_id is not None:
            store.deliveries().filter(pk__in=ids).update(transaction_id=transaction_id)
        elif connection.vendor != "postgresql":  # on PostgreSQL _lock_receipts has acked them
            store.deliveries().filter(pk__in=ids).update(state=State.ACKED, visible_at=now + retention)
    return statuses


def nack(*, receipts: Sequence[str], delay_seconds: float = 0, authorize: Authorize | None = None) -> list[str]:
    """Give leased messages back, deliverable again after `delay_seconds` (redelivered), or
    dead-lettered if they used up max_deliveries."""
    if not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
        raise InvalidRequest(f"delay_seconds is between 0 and {MAX_DELAY_SECONDS}.")
    with atomic():
        now = clock.now()
        parsed, rows = _lock_receipts(receipts, authorize)
        statuses, held = _partition_held(parsed, rows, now)
        for (store, queue_id), ids in held.items():
            queue = Queue.objects.select_related("topic").get(pk=queue_id)
            _return_to_queue(store, queue, ids, visible_at=now + timedelta(seconds=delay_seconds), reason="nacked")
    return statuses


def extend(
    *, receipts: Sequence[str], visibility_timeout_seconds: int, authorize: Authorize | None = None
) -> list[str]:
    """Push the lease deadline of held messages to now + visibility_timeout_seconds."""
    _positive(visibility_timeout_seconds, "visibility_timeout_seconds")
    if visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    with atomic():
        now = clock.now()
        parsed, rows = _lock_receipts(receipts, authorize)
        statuses, held = _partition_held(parsed, rows, now)
        for (store, _), ids in held.items():
            store.deliveries().filter(pk__in=ids).update(visible_at=now + timedelta(seconds=visibility_timeout_seconds))
    return statuses


def _partition_held(
    parsed: list[tuple[Store, int, str] | None], rows: dict[tuple[str, int], _Held], now: datetime
) -> tuple[list[str], dict[tuple[Store, int], list[int]]]:
    statuses: list[str] = []
    held: dict[tuple[Store, int], list[int]] = {}
    for p in parsed:
        row = rows.get((p[0].code, p[1])) if p else None
        if p is not None and row is not None and _holds_lease(row, p[2], now):
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
    with atomic():
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
