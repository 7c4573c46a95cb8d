"""The bench report's verdicts: a target Pegasus misses is "out of reach" only when the floor
measured in the same run (bench/daphne_ceiling.py) misses it too."""

from __future__ import annotations

from bench import report
from bench.common import Result


def _latency(system: str, name: str, p50: float, p99: float) -> Result:
    return Result(name, system, 5000, 10.0, {"p50_ms": p50, "p99_ms": p99})


def _verdicts(results: list[Result]) -> dict[str, str]:
    rows = report.targets_table(report.targets(results)).splitlines()[2:]
    return {row.split(" | ")[0].lstrip("| "): row.rsplit(" | ", 1)[1].rstrip(" |") for row in rows}


def test_a_missed_target_whose_floor_misses_it_too_is_out_of_reach() -> None:
    verdicts = _verdicts(
        [_latency("pegasus", report.LATENCY, 8.0, 30.0), _latency("floor", report.FLOOR_RELAY, 2.4, 9.0)]
    )
    assert verdicts["end-to-end p50 at 500 msg/s (ms)"] == "no: the floor misses it too"
    assert verdicts["end-to-end p99 at 500 msg/s (ms)"] == "**no**"  # the floor meets it: Pegasus could


def test_ratio_floors_come_from_the_same_run() -> None:
    results = [
        Result(report.RMQ_TX, "rabbitmq", 5000, 1.0),
        Result(report.RMQ_CONSUME, "rabbitmq", 10000, 1.0),
        Result(report.PG_LEASE_ACK, "postgres", 8000, 1.0),
        Result("durable publish, batch 100", "pegasus", 9000, 1.0),
        Result(report.FLOOR_BATCH, "floor", 11000, 1.0),
        Result("consume + ack, batch 100", "pegasus", 3000, 1.0),
    ]
    evaluated = {t["target"]: t for t in report.targets(results)}
    batch = evaluated["durable batch publish / RabbitMQ tx-per-100"]
    assert (batch["measured"], batch["floor"], batch["met"], batch["floor_meets"]) == (1.8, 2.2, False, False)
    consume = evaluated["batched consume + ack (REST, a separate /ack per batch) / RabbitMQ prefetch 100"]
    assert (consume["floor"], consume["floor_meets"]) == (0.8, False)
    verdicts = _verdicts(results)
    assert verdicts["durable batch publish / RabbitMQ tx-per-100"] == "no: the floor misses it too"
    assert verdicts["end-to-end p50 at 500 msg/s (ms)"] == "not measured"
