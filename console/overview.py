"""The console's read side: what the overview, transactions and consumers pages show.

Never mutates (except flushing this process's rate counters, which is bookkeeping)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from django.db.models import Count

from console import charts, rates
from messaging import broker, clock, queries
from messaging.models import Consumer, Queue, State, Topic, Transaction, TxState


@dataclass
class Row:
    """One queue or subscription (or, with queue None, a topic) on the overview."""

    label: str
    queue: Queue | None
    stats: dict[str, Any]
    series: rates.Series
    subscriptions: list[Row] = field(default_factory=list)

    @property
    def chart(self) -> Any:
        return charts.sparkline(self.series, label=self.label)

    @property
    def publish_rate(self) -> float:
        return self.series.per_second("published")

    @property
    def deliver_rate(self) -> float:
        return self.series.per_second("delivered")

    @property
    def ack_rate(self) -> float:
        return self.series.per_second("acked")


@dataclass
class Overview:
    queues: list[Row]
    topics: list[Row]
    broker: rates.Series
    totals: dict[str, Any]

    @property
    def chart(self) -> Any:
        return charts.broker_chart(self.broker)

    @property
    def rates(self) -> dict[str, float]:
        return {kind: self.broker.per_second(kind) for kind in ("published", "delivered", "acked")}


def overview() -> Overview:
    rates.flush()  # this process's latest counts; other processes flush on their own timer
    stats = _adaptive(("all",), queries.all_queue_stats)
    series = _adaptive(("rates",), rates.series)  # 60 buckets per destination: cached when slow, too
    empty = rates.empty_series()

    def row(queue: Queue) -> Row:
        return Row(queue.label, queue, stats.get(queue.pk, {}), series.get(f"queue:{queue.pk}", empty))

    all_queues = list(Queue.objects.select_related("topic", "dead_letter_queue").order_by("name", "pk"))
    queues = [row(q) for q in all_queues if q.topic_id is None]
    topics = []
    for topic in Topic.objects.order_by("name"):
        subs = [row(q) for q in all_queues if q.topic_id == topic.pk]
        topic_stats = {"subscriptions": len(subs)}
        topics.append(Row(topic.name, None, topic_stats, series.get(f"topic:{topic.pk}", empty), subs))
    keys = ("depth", "in_flight", "scheduled", "dead_lettered", "consumers")
    totals = {k: sum(s.get(k, 0) for s in stats.values()) for k in keys}
    return Overview(queues, topics, series.get(rates.BROKER_SCOPE, empty), totals)


def destination_row(queue: Queue) -> Row:
    """One queue or subscription's stats and rates (its page)."""
    rates.flush()
    scope = f"queue:{queue.pk}"
    stats = _adaptive(("queue", queue.pk), lambda: queries.all_queue_stats([queue.pk]))[queue.pk]
    return Row(queue.label, queue, stats, rates.series([scope]).get(scope, rates.empty_series()))


@dataclass
class TransactionRow:
    txn: Transaction
    staged_publishes: int
    staged_acks: int


def transactions(*, user: Any) -> dict[str, list[TransactionRow]]:
    """Open and prepared (in-doubt) transactions with how much work each holds (superusers see
    all of them, other staff their own, as the broker decides)."""
    out: dict[str, list[TransactionRow]] = {}
    for state in (TxState.PREPARED, TxState.OPEN):
        txns = broker.list_transactions(state=state, user=user)
        work: dict[tuple[str, int], int] = {}
        ids = [t.pk for t in txns]
        for store in broker.STORES:
            grouped = (
                store.deliveries()
                .filter(transaction_id__in=ids)
                .values("transaction_id", "state")
                .annotate(n=Count("id"))
                .order_by()
            )
            for entry in grouped:
                key = (entry["transaction_id"], entry["state"])
                work[key] = work.get(key, 0) + entry["n"]
        out[state] = [
            TransactionRow(t, work.get((t.pk, State.STAGED), 0), work.get((t.pk, State.LEASED), 0)) for t in txns
        ]
    return out


def live_consumers() -> list[Consumer]:
    cutoff = clock.now() - timedelta(seconds=queries.LIVE_CONSUMER_SECONDS)
    return list(
        Consumer.objects.filter(heartbeat_at__gte=cutoff)
        .select_related("queue__topic", "user")
        .order_by("queue__name", "connected_at", "pk")[:1000]
    )


# --------------------------------------------------------------------------- adaptive cache

# Counting a queue of millions takes a noticeable fraction of a second, and every open console
# tab refreshes every few seconds. A read that took longer than SLOW_SECONDS is reused for
# REUSE_FACTOR times as long, so console refreshes never keep the database more than about a
# quarter busy, however many tabs are open; fast reads (small queues) are never cached.
SLOW_SECONDS = 0.2
REUSE_FACTOR = 4
T = TypeVar("T")
_cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _adaptive(key: tuple[Any, ...], compute: Callable[[], T]) -> T:
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] > time.monotonic():
        value: T = hit[1]
        return value
    started = time.monotonic()
    value = compute()
    took = time.monotonic() - started
    if took > SLOW_SECONDS:
        with _cache_lock:
            _cache[key] = (time.monotonic() + REUSE_FACTOR * took, value)
    return value


def forget(queue_pk: int | None = None) -> None:
    """Drop cached stats (of one queue and the overview, or all) after an operator action, so
    its result shows at once."""
    with _cache_lock:
        if queue_pk is None:
            _cache.clear()
        else:
            _cache.pop(("all",), None)
            _cache.pop(("queue", queue_pk), None)
