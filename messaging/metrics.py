"""Publish / deliver / ack counters, kept in process memory: no database write on the hot path.

The broker calls `count_on_commit()` once per operation (not per message); the numbers are added
to this process's counters only when the transaction commits, so rolled-back work is not counted.
Something periodic drains them into storage: the console's rate table (console/rates.py) flushes
every few seconds from each server process and adds its deltas, so several processes sum up.
A crash loses at most one flush interval of counts, which is fine for rates.

Keys: ("queue", queue_pk) for a queue or subscription, ("topic", topic_pk) for messages published
to a topic, ("broker", 0) for the whole broker (a message published to a topic with three
subscriptions is one publish there, and three deliveries into the subscriptions).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

from django.db import transaction

PUBLISHED = "published"
DELIVERED = "delivered"
ACKED = "acked"
KINDS = (PUBLISHED, DELIVERED, ACKED)

Key = tuple[str, int]
BROKER: Key = ("broker", 0)

_lock = threading.Lock()
_counts: Counter[tuple[str, Key]] = Counter()


def count_on_commit(kind: str, per_key: Mapping[Key, int]) -> None:
    """Add `per_key` to the `kind` counters when the current transaction commits."""
    items = [(key, n) for key, n in per_key.items() if n]
    if items:
        transaction.on_commit(lambda: _add(kind, items))


def count_queues_on_commit(kind: str, per_queue: Mapping[int, int], *, broker_total: bool = True) -> None:
    """Count `kind` events per queue pk (and, with broker_total, their sum for the whole broker)."""
    per_key: dict[Key, int] = {("queue", pk): n for pk, n in per_queue.items()}
    if broker_total:
        per_key[BROKER] = sum(per_queue.values())
    count_on_commit(kind, per_key)


def _add(kind: str, items: list[tuple[Key, int]]) -> None:
    with _lock:
        for key, n in items:
            _counts[(kind, key)] += n


def drain() -> dict[tuple[str, Key], int]:
    """Take the counts gathered since the last drain and reset them."""
    global _counts
    with _lock:
        taken, _counts = _counts, Counter()
    return dict(taken)


def restore(taken: Mapping[tuple[str, Key], int]) -> None:
    """Put drained counts back (their flush failed), so they are flushed next time."""
    with _lock:
        _counts.update(taken)
