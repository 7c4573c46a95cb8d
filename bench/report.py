"""The output of a run: a table (msg/s and ratios to the baselines), the targets, JSON and a PNG."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Result

# Baselines by key, and which baselines each Pegasus figure is compared with.
PG_SINGLE = "publish, one per commit"
PG_MANY = "publish, executemany 100 per commit"
PG_COPY = "publish, COPY 1,000 per commit"
PG_DRAIN = "consume, DELETE SKIP LOCKED 100 per commit"
PG_LEASE_ACK = "consume, lease 100 + ack 100 per commit"
RMQ_CONFIRM = "publish, confirm each"
RMQ_TX = "publish, transaction per 100"
RMQ_CONSUME = "consume, prefetch 100, ack multiple"
SHORT = {
    PG_SINGLE: "PG 1/commit", PG_MANY: "PG executemany", PG_COPY: "PG COPY", PG_DRAIN: "PG drain",
    PG_LEASE_ACK: "PG lease+ack",
    RMQ_CONFIRM: "RMQ confirm-each", RMQ_TX: "RMQ tx-100", RMQ_CONSUME: "RMQ consume",
}  # fmt: skip
# The floors (bench/daphne_ceiling.py): bare apps on daphne doing only a target's commit, if any.
FLOOR_BARE_SINGLE = "1 per request, 8 clients: bare app, no commit"
FLOOR_SINGLE = "durable 1 per request, 8 clients: bare app, group commit"
FLOOR_BATCH = "durable batch 100: bare app, one INSERT per request"
FLOOR_ASGI_RELAY = "latency: bare ASGI relay, commit each message"
FLOOR_RELAY = "latency: channels consumer relay, commit each message"
FLOOR_THREADED_RELAY = "latency: bare ASGI relay, group commit on a thread"
COMPARE = {
    "durable publish, 1 per request": [RMQ_CONFIRM, PG_SINGLE],
    "durable publish, batch 100": [RMQ_TX, PG_MANY],
    "non-durable publish, batch 100": [RMQ_TX, PG_MANY],
    "WebSocket publish, pipelined confirms": [RMQ_CONFIRM, RMQ_TX],
    "consume + ack, batch 100": [RMQ_CONSUME, PG_LEASE_ACK, PG_DRAIN],
    "consume, acks on the next receive, batch 100": [RMQ_CONSUME, PG_LEASE_ACK, PG_DRAIN],
    "consume + ack, push prefetch 100": [RMQ_CONSUME, PG_LEASE_ACK, PG_DRAIN],
    "fan-out to 10 subscriptions, batch 100": [RMQ_TX, PG_MANY],
    "durable publish, batch 100, empty queue (before the backlog)": [RMQ_TX, PG_MANY],
    "backlog fill, batch 1000, 2 clients": [PG_COPY],
    "durable publish, batch 100, with backlog": [RMQ_TX, PG_MANY],
    "backlog drain, batch 1000, 2 clients": [RMQ_CONSUME, PG_DRAIN],
    FLOOR_BARE_SINGLE: [RMQ_CONFIRM],
    FLOOR_SINGLE: [RMQ_CONFIRM],
    FLOOR_BATCH: [RMQ_TX, PG_MANY],
}


def rates(results: list[Result]) -> dict[tuple[str, str], float]:
    return {(r.system, r.name): r.rate for r in results if r.rate}


def _baseline_rate(results: list[Result], name: str) -> float | None:
    return next((r.rate for r in results if r.name == name and r.system != "pegasus"), None)


def _pegasus(results: list[Result], name: str, system: str = "pegasus") -> Result | None:
    return next((r for r in results if r.name == name and r.system == system), None)


def table(results: list[Result]) -> str:
    lines = ["| system | stage | msg/s | compared with | RSS MB | server CPU |", "|---|---|---:|---|---:|---:|"]
    for r in results:
        if r.skipped or r.error:
            lines.append(f"| {r.system} | {r.name} | {'skipped: ' + r.skipped if r.skipped else 'ERROR'} | | | |")
            continue
        figure = f"{r.rate:,.0f}" if r.rate is not None else ""
        if "p50_ms" in r.extra:
            figure = f"p50 {r.extra['p50_ms']:.2f} ms, p99 {r.extra['p99_ms']:.2f} ms"
        runs = len(r.extra.get("runs_msg_per_s", r.extra.get("runs_p50_p99_cpu", [])))
        if runs > 1:  # a floor: the best of its runs (bench/daphne_ceiling.py)
            figure += f" (best of {runs})"
        ratios = []
        for base in COMPARE.get(r.name, []) if r.system in ("pegasus", "floor") else []:
            b = _baseline_rate(results, base)
            if b and r.rate:
                ratios.append(f"{r.rate / b:.2f}x {SHORT[base]}")
        rss = f"{r.extra['rss_mb']:.0f}" if "rss_mb" in r.extra else ""
        cpu = f"{r.extra['server_cpu_pct']:.0f}%" if r.extra.get("server_cpu_pct") is not None else ""
        lines.append(f"| {r.system} | {r.name} | {figure} | {', '.join(ratios)} | {rss} | {cpu} |")
    return "\n".join(lines)


@dataclass
class Target:
    text: str
    measure: Callable[[list[Result]], float | None]
    goal: float
    at_most: bool = False  # True: the measured value must be <= goal
    # The same figure for the floor that bounds it in this run (bench/daphne_ceiling.py), if any.
    floor: Callable[[list[Result]], float | None] | None = None

    def meets(self, value: float | None) -> bool | None:
        return None if value is None else (value <= self.goal if self.at_most else value >= self.goal)

    def evaluate(self, results: list[Result]) -> dict[str, Any]:
        value = self.measure(results)
        floor = self.floor(results) if self.floor else None
        return {
            "target": self.text, "measured": value, "goal": self.goal, "met": self.meets(value),
            "floor": floor, "floor_meets": self.meets(floor),
        }  # fmt: skip


def _ratio(name: str, base: str, system: str = "pegasus") -> Callable[[list[Result]], float | None]:
    def measure(results: list[Result]) -> float | None:
        r, b = _pegasus(results, name, system), _baseline_rate(results, base)
        return r.rate / b if r and r.rate and b else None

    return measure


def _baselines_ratio(name: str, base: str) -> Callable[[list[Result]], float | None]:
    def measure(results: list[Result]) -> float | None:
        r, b = _baseline_rate(results, name), _baseline_rate(results, base)
        return r / b if r and b else None

    return measure


# A reliable consume's floor: raw psycopg acking the last 100 and leasing the next 100 in one
# statement and one commit, in-process (bench.baselines.raw_lease_and_ack), no HTTP.
_CONSUME_FLOOR = _baselines_ratio(PG_LEASE_ACK, RMQ_CONSUME)


def _pegasus_ratio(name: str, other: str) -> Callable[[list[Result]], float | None]:
    def measure(results: list[Result]) -> float | None:
        r, o = _pegasus(results, name), _pegasus(results, other)
        return r.rate / o.rate if r and o and r.rate and o.rate else None

    return measure


def _extra(name: str, key: str, system: str = "pegasus") -> Callable[[list[Result]], float | None]:
    def measure(results: list[Result]) -> float | None:
        r = _pegasus(results, name, system)
        return r.extra.get(key) if r and not r.error and not r.skipped else None

    return measure


def _max_rss(results: list[Result]) -> float | None:
    values = [r.extra["rss_mb"] for r in results if "rss_mb" in r.extra]
    return max(values) if values else None


LATENCY = "end-to-end latency at 500 msg/s"
TARGETS = [
    Target("durable batch publish / RabbitMQ tx-per-100", _ratio("durable publish, batch 100", RMQ_TX), 2.5,
           floor=_ratio(FLOOR_BATCH, RMQ_TX, "floor")),
    Target("durable batch publish / raw executemany", _ratio("durable publish, batch 100", PG_MANY), 0.4,
           floor=_ratio(FLOOR_BATCH, PG_MANY, "floor")),
    Target("durable 1-per-request publish, 8 clients / RabbitMQ confirm-each",
           _ratio("durable publish, 1 per request", RMQ_CONFIRM), 2.0,
           floor=_ratio(FLOOR_SINGLE, RMQ_CONFIRM, "floor")),
    Target("batched consume + ack (REST, acks on the next receive) / RabbitMQ prefetch 100",
           _ratio("consume, acks on the next receive, batch 100", RMQ_CONSUME), 1.0, floor=_CONSUME_FLOOR),
    Target("batched consume + ack (REST, a separate /ack per batch) / RabbitMQ prefetch 100",
           _ratio("consume + ack, batch 100", RMQ_CONSUME), 1.0, floor=_CONSUME_FLOOR),
    Target("push consume + ack (WebSocket) / RabbitMQ prefetch 100",
           _ratio("consume + ack, push prefetch 100", RMQ_CONSUME), 1.0, floor=_CONSUME_FLOOR),
    Target("non-durable batch publish / durable batch publish",
           _pegasus_ratio("non-durable publish, batch 100", "durable publish, batch 100"), 2.0),
    Target("end-to-end p50 at 500 msg/s (ms)", _extra(LATENCY, "p50_ms"), 2.0, at_most=True,
           floor=_extra(FLOOR_RELAY, "p50_ms", "floor")),
    Target("end-to-end p99 at 500 msg/s (ms)", _extra(LATENCY, "p99_ms"), 10.0, at_most=True,
           floor=_extra(FLOOR_RELAY, "p99_ms", "floor")),
    Target("publish with backlog / publish to an empty queue (measured just before the fill)",
           _extra("durable publish, batch 100, with backlog", "ratio_to_empty"), 0.8),
    Target("server RSS, largest at any stage (MB)", _max_rss, 200.0, at_most=True),
]  # fmt: skip


def targets(results: list[Result]) -> list[dict[str, Any]]:
    return [t.evaluate(results) for t in TARGETS]


def targets_table(evaluated: list[dict[str, Any]]) -> str:
    """The targets, each with its floor in this run where one bounds it: a target the floor
    misses too is out of reach on this machine for any broker on daphne and PostgreSQL."""
    lines = ["| target | measured | goal | floor here | met |", "|---|---:|---:|---:|---|"]
    for t in evaluated:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        floor = "" if t.get("floor") is None else f"{t['floor']:.2f}"
        sign = "<=" if "(ms)" in t["target"] or "(MB)" in t["target"] else ">="
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        if t["met"] is False and t.get("floor_meets") is False:
            met = "no: the floor misses it too"
        lines.append(f"| {t['target']} | {value} | {sign} {t['goal']:g} | {floor} | {met} |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], results: list[Result], evaluated: list[dict[str, Any]]) -> None:
    data = {"meta": meta, "results": [r.as_json() for r in results], "targets": evaluated}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def chart(path: Path, results: list[Result], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.rate and "p50_ms" not in r.extra]
    if not shown:  # a partial run of, say, the latency stage alone: nothing to draw
        return
    colors = {"postgres": "#336791", "rabbitmq": "#ff6600", "pegasus": "#2ca02c", "floor": "#999999"}
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(shown) + 1.6))
    labels = [f"{r.system}: {r.name}" for r in shown]
    values = [r.rate or 0 for r in shown]
    ax.barh(range(len(shown)), values, color=[colors.get(r.system, "grey") for r in shown])
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("messages per second (log scale)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
