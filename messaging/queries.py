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
        qs = store.deliveries().filter(queue=queue).exclude(state=State.ACKED).select_related("message")
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
        priority=msg.priority,
        durable=store is DURABLE,
        delivery_count=row.delivery_count,
        published_at=msg.published_at,
        visible_at=row.visible_at,
        expires_at=msg.expires_at,
        dead_letter_reason=row.dead_letter_reason,
    )
