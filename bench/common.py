"""What every benchmark stage shares: the result record, the scale, the message body, timing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# 256 printable bytes, the body size every stage uses (the "256-byte bodies").
BODY = ("pegasus-bench-" * 20)[:256]
PG_ADMIN_URL = os.environ.get("PEGASUS_BENCH_PG", "postgres://postgres@127.0.0.1:5432/postgres")
BENCH_DB = os.environ.get("PEGASUS_BENCH_DB", "pegasus_bench")
RABBIT_HOST = os.environ.get("PEGASUS_BENCH_RABBIT", "127.0.0.1")


@dataclass
class Scale:
    """How long or how big each stage is. `smoke` must finish in well under a minute."""

    seconds: float  # duration of a throughput stage
    drain_messages: int  # messages filled before a consume stage
    backlog: int  # messages in the backlog stage
    latency_seconds: float
    latency_rate: int  # messages per second in the latency stage
    floor_runs: int = 3  # each floor is the best of this many runs (bench/daphne_ceiling.py)

    @classmethod
    def full(cls) -> Scale:
        return cls(seconds=6.0, drain_messages=30_000, backlog=1_000_000, latency_seconds=10.0, latency_rate=500)

    @classmethod
    def smoke(cls) -> Scale:
        return cls(seconds=0.6, drain_messages=500, backlog=3_000, latency_seconds=1.0, latency_rate=500, floor_runs=1)


@dataclass
class Result:
    """One measured figure. `rate` is messages per second (None when the stage is not a rate)."""

    name: str
    system: str  # "postgres", "rabbitmq" or "pegasus"
    messages: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    @property
    def rate(self) -> float | None:
        if self.skipped or self.error or self.seconds <= 0:
            return None
        return self.messages / self.seconds

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate"] = self.rate
        return data


def run_for(seconds: float, step: Callable[[], int]) -> tuple[int, float]:
    """Call `step` (which returns how many messages it moved) until `seconds` have passed."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        done += step()
        now = time.perf_counter()
        if now >= deadline:
            return done, now - start


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]
