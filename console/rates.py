"""Publish / deliver / ack rates: flush the broker's in-memory counters into RateSample buckets.

Chosen design (docs/console.md): the broker counts events in process memory after each commit
(messaging/metrics.py: one dict update per operation, no database write on the hot path). Every
server process runs `start_in_background()`, which every FLUSH_SECONDS adds its counts to the row
of the current BUCKET_SECONDS bucket, so the numbers of several processes sum up. Rows older than
RETENTION are pruned on the way.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import F

from console.models import RateSample
from messaging import background, clock, metrics

BUCKET_SECONDS = 10
WINDOW_BUCKETS = 60  # the charts show the last 10 minutes
RATE_BUCKETS = 6  # the "per second" figures average over the last minute
FLUSH_SECONDS = 5
RETENTION = timedelta(hours=2)
BROKER_SCOPE = "broker"

_flush_lock = threading.Lock()


def scope_of(key: metrics.Key) -> str:
    kind, pk = key
    return BROKER_SCOPE if kind == "broker" else f"{kind}:{pk}"


def bucket_start(moment: datetime) -> datetime:
    epoch = int(moment.timestamp())
    return moment.replace(microsecond=0) - timedelta(seconds=epoch % BUCKET_SECONDS)


def flush() -> int:
    """Write this process's counts since the last flush; return how many scopes were written.

    If the write fails (database down) the counts go back into memory for the next try.
    """
    with _flush_lock:
        taken = metrics.drain()
        if not taken:
            return 0
        per_scope: dict[str, dict[str, int]] = defaultdict(dict)
        for (kind, key), n in taken.items():
            per_scope[scope_of(key)][kind] = per_scope[scope_of(key)].get(kind, 0) + n
        bucket = bucket_start(clock.now())
        try:
            with transaction.atomic():
                for scope in sorted(per_scope):  # a stable order: two processes never deadlock
                    _add(scope, bucket, per_scope[scope])
                RateSample.objects.filter(bucket__lt=bucket - RETENTION).delete()
        except Exception:
            metrics.restore(taken)
            raise
        return len(per_scope)


def _add(scope: str, bucket: datetime, counts: dict[str, int]) -> None:
    increments = {kind: F(kind) + n for kind, n in counts.items()}
    if RateSample.objects.filter(scope=scope, bucket=bucket).update(**increments):
        return
    try:
        with transaction.atomic():
            RateSample.objects.create(scope=scope, bucket=bucket, **counts)
    except IntegrityError:  # another process created the row first: add to it
        RateSample.objects.filter(scope=scope, bucket=bucket).update(**increments)


@dataclass
class Series:
    """Per-bucket counts of one scope over the chart window, oldest first."""

    published: list[int]
    delivered: list[int]
    acked: list[int]
    elapsed: float = BUCKET_SECONDS  # seconds into the last (current) bucket

    def per_second(self, kind: str) -> float:
        """The average rate over the last RATE_BUCKETS complete buckets and the current one so
        far (about the last minute; counts reach the table up to FLUSH_SECONDS late)."""
        values: list[int] = getattr(self, kind)[-RATE_BUCKETS - 1 :]
        seconds = (len(values) - 1) * BUCKET_SECONDS + max(self.elapsed, 1.0)
        return sum(values) / seconds


def series(scopes: list[str] | None = None) -> dict[str, Series]:
    """Series for `scopes` (all with data when None) over the last WINDOW_BUCKETS buckets."""
    now = clock.now()
    last = bucket_start(now)
    first = last - timedelta(seconds=BUCKET_SECONDS * (WINDOW_BUCKETS - 1))
    qs = RateSample.objects.filter(bucket__gte=first)
    if scopes is not None:
        qs = qs.filter(scope__in=scopes)
    out: dict[str, Series] = {}
    for scope, bucket, published, delivered, acked in qs.values_list(
        "scope", "bucket", "published", "delivered", "acked"
    ):
        s = out.setdefault(scope, _empty((now - last).total_seconds()))
        i = int((bucket - first).total_seconds()) // BUCKET_SECONDS
        if 0 <= i < WINDOW_BUCKETS:
            s.published[i] += published
            s.delivered[i] += delivered
            s.acked[i] += acked
    return out


def _empty(elapsed: float = BUCKET_SECONDS) -> Series:
    return Series([0] * WINDOW_BUCKETS, [0] * WINDOW_BUCKETS, [0] * WINDOW_BUCKETS, elapsed)


def empty_series() -> Series:
    return _empty()


def start_in_background() -> None:
    """Flush this process's counters every FLUSH_SECONDS (called once per server process); a
    failed flush keeps its counts for the next one."""
    background.start_loop(name="pegasus-console-rates", interval=FLUSH_SECONDS, step=flush)
