"""A Jepsen-style total-queue ledger: record every publish attempt, delivery and ack, then check.

Each message a producer means to send has a key, which is both its body and its dedup_id, so a
delivery can always be traced back to the attempt that caused it. A publish attempt ends as:

- ok: the broker confirmed it (with the message id it answered);
- failed: the broker said no, definitely (a 4xx, or an error raised before anything was sent);
- unknown: we cannot know (connection reset, server killed, timeout, 503 after sending).

`attempted` counts keys; `unknown` counts attempts without a definite answer; `unresolved`
counts keys that never got one (a crash at the very end).

`check()` drains nothing itself: the scenario drains the queue first, recording what it gets,
then asks the ledger for its figures:

- lost: confirmed keys never delivered (must be 0);
- duplicated: keys enqueued as more than one message id (must be 0 when producers retry with
  the same dedup_id);
- phantom: delivered keys that were never attempted, or whose every attempt failed definitely;
- after_ack: deliveries of a message after one of its deliveries was acknowledged with "ok";
- unflagged: second and later deliveries of a message that did not say `redelivered`;
- leased_twice: two deliveries of a message with the same delivery_count (two owners at once).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"


@dataclass
class Figures:
    scenario: str
    attempted: int = 0
    confirmed: int = 0
    failed: int = 0
    unknown: int = 0
    unresolved: int = 0
    delivered: int = 0
    deliveries: int = 0
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    phantom: int = 0
    after_ack: int = 0
    unflagged: int = 0
    leased_twice: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        data = asdict(self)
        data.pop("scenario")
        extra = data.pop("extra")
        data["seconds"] = round(self.seconds, 1)
        return f"[faults] {self.scenario}: " + " ".join(f"{k}={v}" for k, v in {**data, **extra}.items())


@dataclass
class _Delivery:
    key: str
    message_id: str
    delivery_count: int
    redelivered: bool


class Ledger:
    """Thread-safe record of one scenario. Keys are strings; message ids are the broker's ids."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._outcomes: dict[str, list[str]] = defaultdict(list)
        self._confirmed_ids: dict[str, set[str]] = defaultdict(set)
        self._deliveries: list[_Delivery] = []
        self._acked: dict[str, int] = {}  # message id -> delivery_count of the acked delivery
        self.extra: dict[str, Any] = {}

    # ------------------------------------------------------------------ recording

    def attempt(self, key: str, outcome: str, message_id: str | None = None) -> None:
        assert outcome in (OK, FAILED, UNKNOWN)
        with self._lock:
            self._outcomes[key].append(outcome)
            if outcome == OK and message_id is not None:
                self._confirmed_ids[key].add(message_id)

    def delivered(self, key: str, message_id: str, delivery_count: int, redelivered: bool) -> None:
        with self._lock:
            self._deliveries.append(_Delivery(key, message_id, delivery_count, redelivered))

    def acked(self, message_id: str, delivery_count: int) -> None:
        """Record an ack answered "ok" for the delivery with this delivery_count."""
        with self._lock:
            self._acked[message_id] = min(delivery_count, self._acked.get(message_id, delivery_count))

    # ------------------------------------------------------------------ reading

    def confirmed_keys(self) -> set[str]:
        with self._lock:
            return {k for k, outcomes in self._outcomes.items() if OK in outcomes}

    def delivered_keys(self) -> set[str]:
        with self._lock:
            return {d.key for d in self._deliveries}

    def acked_keys(self) -> set[str]:
        with self._lock:
            return {d.key for d in self._deliveries if d.message_id in self._acked}

    def lost_keys(self) -> set[str]:
        """Confirmed keys never delivered (what `lost` counts), for a scenario to explain."""
        return self.confirmed_keys() - self.delivered_keys()

    def outcomes(self, key: str) -> list[str]:
        with self._lock:
            return list(self._outcomes.get(key, []))

    def check(self) -> Figures:
        with self._lock:
            return self._figures()

    def _figures(self) -> Figures:
        f = Figures(self.scenario, seconds=time.monotonic() - self.started, extra=dict(self.extra))
        f.attempted = len(self._outcomes)
        confirmed = {k for k, o in self._outcomes.items() if OK in o}
        f.confirmed = len(confirmed)
        f.failed = sum(1 for o in self._outcomes.values() if set(o) == {FAILED})
        # unknown counts attempts without a definite answer (each was retried or given up);
        # unresolved counts keys that never got a definite answer at all.
        f.unknown = sum(o.count(UNKNOWN) for o in self._outcomes.values())
        f.unresolved = sum(1 for o in self._outcomes.values() if OK not in o and FAILED not in o)
        delivered_ids: dict[str, set[str]] = defaultdict(set)
        by_message: dict[str, list[_Delivery]] = defaultdict(list)
        for d in self._deliveries:
            delivered_ids[d.key].add(d.message_id)
            by_message[d.message_id].append(d)
        # Every id the broker ever gave a key, delivered or only confirmed: more than one is a
        # duplicate enqueue.
        enqueued = {k: delivered_ids.get(k, set()) | self._confirmed_ids.get(k, set()) for k in self._outcomes}
        enqueued.update({k: ids for k, ids in delivered_ids.items() if k not in enqueued})
        f.deliveries = len(self._deliveries)
        f.delivered = len(delivered_ids)
        f.acked = len(self._acked)
        f.lost = len(confirmed - set(delivered_ids))
        f.duplicated = sum(len(ids) - 1 for ids in enqueued.values() if ids)
        f.redelivered = sum(1 for d in self._deliveries if d.redelivered)
        f.phantom = sum(1 for k in delivered_ids if set(self._outcomes.get(k, [FAILED])) == {FAILED})
        for message_id, ds in by_message.items():
            acked_at = self._acked.get(message_id)
            counts = [d.delivery_count for d in ds]
            f.leased_twice += len(counts) - len(set(counts))
            f.after_ack += sum(1 for d in ds if acked_at is not None and d.delivery_count > acked_at)
            # A redelivery is any delivery after the message's first (delivery_count > 1), seen or not.
            f.unflagged += sum(1 for d in ds if d.delivery_count > 1 and not d.redelivered)
        return f

    def report(self) -> Figures:
        """Print the figures (pytest -s shows them; they also go to the terminal summary)."""
        figures = self.check()
        print(figures.line(), flush=True)
        REPORTED.append(figures)
        return figures


REPORTED: list[Figures] = []
NOTES: list[str] = []  # figures of scenarios that keep no ledger (the model check)


def note(line: str) -> None:
    print(line, flush=True)
    NOTES.append(line)


def assert_clean(f: Figures, *, allow_unknown_lost: bool = True) -> None:
    """The invariants every scenario checks."""
    problems = {
        "lost": f.lost,
        "duplicated": f.duplicated,
        "phantom": f.phantom,
        "after_ack": f.after_ack,
        "unflagged": f.unflagged,
        "leased_twice": f.leased_twice,
    }
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, f"{f.line()}\nviolations: {bad}"
