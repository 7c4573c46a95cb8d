"""Limits that keep one client from starving the others (docs/security.md).

Publish rates are token buckets per API token, kept in each server process's memory (no
database write per request): with N server processes a token may reach N times the rate.
Connection counts are per user and per process, for the same reason.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from messaging import conf
from messaging.exceptions import OverQuota


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `rate` per second, holding at most `burst`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, cost: int, *, rate: float, burst: int) -> None:
        """Spend `cost` from `key`'s bucket or raise OverQuota with the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(burst), updated=now)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if cost > burst:
                raise OverQuota(f"A request may carry at most {burst} messages for this token.")
            if bucket.tokens < cost:
                wait = (cost - bucket.tokens) / rate
                raise OverQuota(f"Publish rate over {rate:g} messages/s for this token.", retry_after=round(wait, 3))
            bucket.tokens -= cost

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()


publish_limiter = RateLimiter()


def check_publish_rate(*, user: Any, token_key: str, messages: int) -> None:
    """Charge a publish of `messages` to the token; admins are exempt unless configured."""
    limits = conf.get()
    if getattr(user, "is_superuser", False) and not limits.rate_limit_admins:
        return
    publish_limiter.take(token_key, messages, rate=limits.publish_rate_per_token, burst=limits.publish_burst_per_token)


class ConnectionCounter:
    """Live connections per user in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, int] = defaultdict(int)

    def acquire(self, user_id: int) -> None:
        limit = conf.get().max_connections_per_user
        with self._lock:
            if self._counts[user_id] >= limit:
                raise OverQuota(f"At most {limit} connections per user.", retry_after=5)
            self._counts[user_id] += 1

    def release(self, user_id: int) -> None:
        with self._lock:
            self._counts[user_id] = max(0, self._counts[user_id] - 1)
            if not self._counts[user_id]:
                del self._counts[user_id]


connections = ConnectionCounter()
