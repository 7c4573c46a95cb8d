"""Live push consumers (WebSocket and STOMP subscriptions): a registry for stats and the console.

A row exists while a connection consumes from a queue; `heartbeat_at` is refreshed by its
connection, so rows left behind by a crashed process stop counting after
queries.LIVE_CONSUMER_SECONDS and are removed by `unregister_consumers(stale_before=...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from messaging import clock
from messaging.broker.common import _user_or_none
from messaging.models import Consumer, Queue


def register_consumer(*, connection: str, user: Any, queue: Queue, protocol: str, prefetch: int) -> int:
    """Record a live consumer of `queue` on `connection`; returns its id."""
    now = clock.now()
    row = Consumer.objects.create(
        connection=connection, user=_user_or_none(user), queue=queue, protocol=protocol,
        prefetch=prefetch, unacked=0, connected_at=now, heartbeat_at=now,
    )  # fmt: skip
    return row.pk


def refresh_consumers(*, unacked: Mapping[int, int]) -> None:
    """Mark these consumers (id → messages out unacked) as alive now."""
    now = clock.now()
    for consumer_id, count in unacked.items():
        Consumer.objects.filter(pk=consumer_id).update(heartbeat_at=now, unacked=count)


def unregister_consumers(
    *, connection: str | None = None, ids: list[int] | None = None, stale_before: datetime | None = None
) -> int:
    """Remove the consumers of a closed connection, some by id, or those not refreshed since
    `stale_before` (left by a process that died)."""
    qs = Consumer.objects.all()
    if connection is None and ids is None and stale_before is None:
        return 0
    if connection is not None:
        qs = qs.filter(connection=connection)
    if ids is not None:
        qs = qs.filter(pk__in=ids)
    if stale_before is not None:
        qs = qs.filter(heartbeat_at__lt=stale_before)
    deleted, _ = qs.delete()
    return deleted
