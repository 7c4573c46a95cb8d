"""The read side: stats and browsing. Never mutates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db.models import Count, Min, Q

from messaging import clock
from messaging.broker import DURABLE, STORES, Store
from messaging.models import Consumer, Queue, State

LIVE_CONSUMER_SECONDS = 60


def queue_stats(queue: Queue) -> dict[str, Any]:
    """depth (ready now), in_flight, scheduled, dead_lettered, consumers, oldest_age_seconds."""
    now = clock.now()
    # An expired lease is deliverable again, so it counts as ready, not in flight.
    lease_expired = Q(state=State.LEASED, visible_at__lte=now, transaction_id__isnull=True)
    ready = Q(state=State.READY, visible_at__lte=now) | lease_expired
    totals = {"depth": 0, "in_flight": 0, "scheduled": 0, "dead_lettered": 0}
    oldest = None
    for store in STORES:
        agg = (
            store.deliveries()
            .filter(queue=queue)
            .aggregate(
                depth=Count("id", filter=ready),
                in_flight=Count("id", filter=Q(state=State.LEASED) & ~lease_expired),
                scheduled=Count("id", filter=Q(state=State.READY, visible_at__gt=now)),
                oldest=Min("message__published_at", filter=ready),
            )
        )
        for key in ("depth", "in_flight", "scheduled"):
            totals[key] += agg[key]
        if agg["oldest"] is not None and (oldest is None or agg["oldest"] < oldest):
            oldest = agg["oldest"]
        totals["dead_lettered"] += store.deliveries().filter(origin_queue=queue).count()
    consumers = Consumer.objects.filter(
        queue=queue, heartbeat_at__gte=now - timedelta(seconds=LIVE_CONSUMER_SECONDS)
    ).count()
    return {
        **totals,
        "consumers": consumers,
        "oldest_age_seconds": max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
    }


BROWSE_STATES = {
    "ready": Q(state=State.READY),
    "in_flight": Q(state=State.LEASED),
    "staged": Q(state=State.STAGED),
    "dead_lettered": Q(state=State.DEAD) | Q(origin_queue__isnull=False),
}


@dataclass
class BrowsedMessage:
    id: str
    cursor: str
    state: str
    body: str
    content_type: str
    headers: dict[str, str]
    priority: int
    durable: bool
    delivery_count: int
    published_at: Any
    visible_at: Any
    expires_at: Any
    dead_letter_reason: str
    origin: str = ""  # the queue a dead letter came from (label), if any
    redelivered: bool = False


def browse(
    queue: Queue,
    *,
    state: str | None = None,
    after: str | None = None,
    limit: int = 50,
    header: tuple[str, str] | None = None,
) -> list[BrowsedMessage]:
    """Messages of a queue without consuming them, by keyset: durable rows by id, then
    transient rows by id. `after` is the `cursor` of the last row of the previous page."""
    start_store, start_id = _parse_cursor(after)
    rows: list[BrowsedMessage] = []
    for store in STORES:
        if STORES.index(store) < STORES.index(start_store):
            continue
        qs = (
            store.deliveries()
            .filter(queue=queue)
            .exclude(state=State.ACKED)
            .select_related("message", "origin_queue__topic")
        )
        if store is start_store and start_id:
            qs = qs.filter(id__gt=start_id)
        if state:
            qs = qs.filter(BROWSE_STATES[state])
        if header:
            qs = qs.filter(**{f"message__headers__{header[0]}": header[1]})
        for row in qs.order_by("id")[: limit - len(rows)]:
            rows.append(_browsed(store, row))
        if len(rows) >= limit:
            break
    return rows


def _parse_cursor(after: str | None) -> tuple[Store, int]:
    if not after:
        return DURABLE, 0
    store = next((s for s in STORES if after.startswith(s.code)), DURABLE)
    digits = after[1:] if after[:1].isalpha() else after
    return store, int(digits) if digits.isdigit() and len(digits) < 19 else 0


def _browsed(store: Store, row: Any) -> BrowsedMessage:
    msg = row.message
    state = State(row.state).label
    if row.state == State.READY and row.visible_at > clock.now():
        state = "scheduled"
    return BrowsedMessage(
        id=store.public_id(msg.pk),
        cursor=f"{store.code}{row.pk}",
        state=state,
        body=msg.body,
        content_type=msg.content_type,
        headers=msg.headers,
        priority=row.priority,  # this queue's (an operator may have changed it), not the publisher's
        durable=store is DURABLE,
        delivery_count=row.delivery_count,
        published_at=msg.published_at,
        visible_at=row.visible_at,
        expires_at=msg.expires_at,
        dead_letter_reason=row.dead_letter_reason,
        origin=row.origin_queue.label if row.origin_queue is not None else "",
        redelivered=row.delivery_count > 1,
    )


def browse_one(queue: Queue, cursor: str) -> BrowsedMessage | None:
    """The message at `cursor` in `queue` (as browse shows it), or None if it is gone."""
    store = next((s for s in STORES if cursor[:1] == s.code), None)
    digits = cursor[1:]
    if store is None or not digits.isdigit() or len(digits) > 18:
        return None
    row = (
        store.deliveries()
        .filter(queue=queue, pk=int(digits))
        .exclude(state=State.ACKED)
        .select_related("message", "origin_queue__topic")
        .first()
    )
    return _browsed(store, row) if row is not None else None


def all_queue_stats(queue_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """queue_stats for every queue and subscription (or those in `queue_ids`), keyed by queue
    pk: a few grouped queries instead of several per queue (the console).

    One difference: the oldest ready message is taken to be the one with the lowest message id
    (ids grow in publish order), which saves joining every ready row to its message.
    """
    now = clock.now()
    lease_expired = Q(state=State.LEASED, visible_at__lte=now, transaction_id__isnull=True)
    ready = Q(state=State.READY, visible_at__lte=now) | lease_expired
    empty = {"depth": 0, "in_flight": 0, "scheduled": 0, "dead_lettered": 0, "consumers": 0}
    queues = Queue.objects.all() if queue_ids is None else Queue.objects.filter(pk__in=queue_ids)
    stats: dict[int, dict[str, Any]] = {pk: dict(empty) for pk in queues.values_list("pk", flat=True)}
    oldest: dict[int, Any] = {}
    for store in STORES:
        deliveries = store.deliveries().filter(queue_id__in=list(stats))
        grouped = (
            deliveries.exclude(state=State.ACKED)
            .values("queue_id")
            .annotate(
                depth=Count("id", filter=ready),
                in_flight=Count("id", filter=Q(state=State.LEASED) & ~lease_expired),
                scheduled=Count("id", filter=Q(state=State.READY, visible_at__gt=now)),
                first=Min("message_id", filter=ready),
            )
            .order_by()
        )
        first_ids = {}
        for row in grouped:
            entry = stats[row["queue_id"]]
            for key in ("depth", "in_flight", "scheduled"):
                entry[key] += row[key]
            if row["first"] is not None:
                first_ids[row["first"]] = row["queue_id"]
        published = store.message.objects.filter(pk__in=list(first_ids)).values_list("pk", "published_at")
        for pk, at in published:
            qid = first_ids[pk]
            oldest[qid] = at if qid not in oldest else min(oldest[qid], at)
        dead = store.deliveries().filter(origin_queue_id__in=list(stats)).values("origin_queue_id")
        for row in dead.annotate(n=Count("id")).order_by():
            stats[row["origin_queue_id"]]["dead_lettered"] += row["n"]
    live = Consumer.objects.filter(
        queue_id__in=list(stats), heartbeat_at__gte=now - timedelta(seconds=LIVE_CONSUMER_SECONDS)
    )
    for row in live.values("queue_id").annotate(n=Count("id")).order_by():
        stats[row["queue_id"]]["consumers"] = row["n"]
    for qid, entry in stats.items():
        at = oldest.get(qid)
        entry["oldest_age_seconds"] = max(0.0, (now - at).total_seconds()) if at else 0.0
    return stats


def browse_window(
    queue: Queue,
    *,
    state: str | None = None,
    after: str | None = None,
    limit: int = 50,
    header: tuple[str, str] | None = None,
    scan: int = 20_000,
) -> tuple[list[BrowsedMessage], str | None]:
    """browse with filters whose cost stays bounded on a huge queue: looks at no more than
    `scan` messages past `after` and returns the matches with the cursor to continue from, or
    None when the queue has been read to its end. A page may hold fewer than `limit` rows (even
    none) and still have a continuation: a rare match is found by paging on, never by one
    unbounded scan.

    The filters are applied here, on small keyset batches of (id, state, headers), rather than
    in SQL: PostgreSQL misjudges how selective a JSON header test is and would scan the whole
    message table for it."""
    start_store, start_id = _parse_cursor(after)
    rows: list[BrowsedMessage] = []
    for store in STORES[STORES.index(start_store) :]:
        last = start_id if store is start_store else 0
        matches, last, exhausted = _scan_matches(store, queue, last, state, header, limit - len(rows), scan)
        found = store.deliveries().filter(pk__in=matches).select_related("message", "origin_queue__topic")
        rows += [_browsed(store, row) for row in found.order_by("id")]
        if len(rows) >= limit:
            return rows, rows[-1].cursor
        if not exhausted:  # the window is used up: there is more to look at in this store
            return rows, f"{store.code}{last}"
    return rows, None


SCAN_BATCH = 1000


def _scan_matches(
    store: Store, queue: Queue, last: int, state: str | None, header: tuple[str, str] | None, want: int, scan: int
) -> tuple[list[int], int, bool]:
    """Ids of up to `want` matching deliveries after `last`, reading at most about `scan` rows;
    also the last id looked at and whether the store was read to its end."""
    base = store.deliveries().filter(queue=queue).exclude(state=State.ACKED)
    # Headers need a join to the message; a state filter alone does not.
    fields = ("id", "state", "origin_queue_id", "message__headers" if header else "origin_queue_id")
    matches: list[int] = []
    scanned, size = 0, min(SCAN_BATCH, scan)
    while scanned < scan:
        batch = list(base.filter(id__gt=last).order_by("id").values_list(*fields)[:size])
        for pk, row_state, origin, headers in batch:
            last = pk
            if _state_matches(state, row_state, origin) and (
                header is None or (isinstance(headers, dict) and headers.get(header[0]) == header[1])
            ):
                matches.append(pk)
                if len(matches) >= want:
                    return matches, last, False
        if len(batch) < size:
            return matches, last, True
        scanned += len(batch)
    return matches, last, False


def _state_matches(state: str | None, row_state: int, origin: int | None) -> bool:
    """BROWSE_STATES, evaluated on a fetched row."""
    if state is None:
        return True
    if state == "dead_lettered":
        return row_state == State.DEAD or origin is not None
    return row_state == {"ready": State.READY, "in_flight": State.LEASED, "staged": State.STAGED}[state]


def purgeable_count(queue: Queue) -> int:
    """How many messages broker.purge_queue would remove right now (ready and scheduled)."""
    return sum(store.deliveries().filter(queue=queue, state=State.READY).count() for store in STORES)
