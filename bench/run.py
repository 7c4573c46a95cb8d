"""Run the benchmark: `python -m bench.run` (full, `make bench`) or `--smoke` (`make bench-smoke`).

Starts from a fresh PostgreSQL database (pegasus_bench), migrates it, starts one daphne server on
a free port, measures the baselines (raw psycopg, RabbitMQ if reachable) and then Pegasus in the
same run, and writes a table, a chart and the raw figures to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

if __package__ in (None, ""):  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines, pegasus, report, server, trace
from bench import daphne_ceiling as floors
from bench.common import Result, Scale
from bench.http import HttpError

RESULTS = Path(__file__).resolve().parent / "results"
Stage = tuple[str, Callable[[], Any]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny counts (CI)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching stages")
    parser.add_argument("--seconds", type=float, help="override the duration of each throughput stage")
    parser.add_argument("--backlog", type=int, help="override the backlog size")
    parser.add_argument("--drain", type=int, help="override the messages filled before a consume stage")
    parser.add_argument(
        "--profile", action="store_true", help="run the server under py-spy (bench/results/profile.txt.tmp)"
    )
    parser.add_argument(
        "--trace", action="store_true",
        help="time each step of a latency-stage message in the server (bench/trace.py; bench/results/trace.tsv.tmp)",
    )  # fmt: skip
    return parser.parse_args()


async def main() -> int:
    args = parse_args()
    scale = Scale.smoke() if args.smoke else Scale.full()
    if args.seconds:
        scale.seconds = args.seconds
    if args.backlog:
        scale.backlog = args.backlog
    if args.drain:
        scale.drain_messages = args.drain
    RESULTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    server.recreate_database()
    token = server.migrate_and_token()
    baselines.create_raw_tables()
    trace_file = RESULTS / "trace.tsv.tmp" if args.trace else None
    srv = server.Server(profile=RESULTS / "profile.txt.tmp" if args.profile else None, trace=trace_file)
    results: list[Result] = []
    try:
        peg = pegasus.Pegasus(srv, token)
        results = await run_stages(stages(peg, scale, results), results, srv, args.only)
        if trace_file is not None:
            await asyncio.sleep(1.5)  # the server writes its timestamps once a second
    finally:
        srv.stop()
    status = finish(args, scale, results, time.perf_counter() - started)
    if trace_file is not None:
        where = trace_file.relative_to(RESULTS.parent.parent)
        print(f"\nWhere a latency-stage message's time went in the server ({where}):\n")
        print(trace.summary(trace.read(trace_file)))
    return status


def stages(peg: pegasus.Pegasus, scale: Scale, results: list[Result]) -> list[Stage]:
    rabbit = baselines.rabbit_reachable()
    no_rabbit = "RabbitMQ not reachable on 127.0.0.1:5672"

    def rmq(fn: Callable[[Scale], Result], name: str) -> Callable[[], Result]:
        return (lambda: fn(scale)) if rabbit else (lambda: Result(name, "rabbitmq", skipped=no_rabbit))

    def empty_rate() -> float | None:
        r = report._pegasus(results, "durable publish, batch 100")
        return r.rate if r else None

    return [
        ("postgres: one insert per commit", lambda: baselines.raw_single(scale)),
        ("postgres: executemany 100", lambda: baselines.raw_executemany(scale)),
        ("postgres: COPY 1000", lambda: baselines.raw_copy(scale)),
        ("postgres: drain", lambda: baselines.raw_drain(scale)),
        ("postgres: lease and ack", lambda: baselines.raw_lease_and_ack(scale)),
        ("rabbitmq: confirm each", rmq(baselines.rabbit_confirm_each, report.RMQ_CONFIRM)),
        ("rabbitmq: tx per 100", rmq(baselines.rabbit_tx100, report.RMQ_TX)),
        ("rabbitmq: consume", rmq(baselines.rabbit_consume, report.RMQ_CONSUME)),
        ("pegasus: single, 8 clients", lambda: pegasus.publish_single(peg, scale)),
        ("pegasus: batch 100", lambda: pegasus.publish_batch(peg, scale)),
        ("pegasus: non-durable batch 100", lambda: pegasus.publish_batch(peg, scale, durable=False)),
        ("pegasus: WebSocket publish", lambda: pegasus.ws_publish(peg, scale)),
        ("pegasus: consume REST", lambda: pegasus.consume_rest(peg, scale)),
        ("pegasus: consume REST, acks on receive", lambda: pegasus.consume_rest(peg, scale, ride_acks=True)),
        ("pegasus: consume WebSocket", lambda: pegasus.consume_ws(peg, scale)),
        ("pegasus: fan-out 10", lambda: pegasus.fan_out(peg, scale)),
        ("pegasus: latency", lambda: pegasus.latency(peg, scale)),
        # The floors (bench/daphne_ceiling.py), each in a daphne of its own while Pegasus idles:
        # what a bare app does under the same client loops, for the targets they bound. Each
        # runs its client loop on an event loop of its own, so on a thread.
        # The relays first, right after the latency stage: a p99 follows the machine's noise.
        ("floor: latency, ASGI relay", lambda: asyncio.to_thread(floors.relay_floor, scale)),
        (
            "floor: latency, channels relay",
            lambda: asyncio.to_thread(floors.relay_floor, scale, app=floors.CHANNELS_APP),
        ),
        # Pegasus's design for a WebSocket publish (group commit on a thread), and nothing else.
        (
            "floor: latency, ASGI relay, group commit on a thread",
            lambda: asyncio.to_thread(floors.relay_floor, scale, threaded=True),
        ),
        ("floor: 1 per request, no commit", lambda: asyncio.to_thread(floors.single_floor, scale, durable=False)),
        ("floor: 1 per request, group commit", lambda: asyncio.to_thread(floors.single_floor, scale, durable=True)),
        ("floor: batch 100", lambda: asyncio.to_thread(floors.batch_floor, scale)),
        ("pegasus: backlog", lambda: pegasus.backlog(peg, scale, empty_rate())),
    ]


async def run_stages(todo: list[Stage], results: list[Result], srv: server.Server, only: str) -> list[Result]:
    wanted = [s for s in todo if not only or any(part in s[0] for part in only.split(","))]
    bar = tqdm(wanted, unit="stage", file=sys.stderr, dynamic_ncols=True)
    for label, fn in bar:
        bar.set_description(label)
        system = label.split(":")[0]
        cpu_before, wall_before = srv.cpu_seconds(), time.perf_counter()
        try:
            outcome = fn()
            if isinstance(outcome, Awaitable):
                outcome = await outcome
            got = outcome if isinstance(outcome, list) else [outcome]
        except Exception as exc:  # one failed stage is reported, and the others still run
            got = [_failed(label, system, exc)]
        alive = srv.proc.poll() is None
        # Share of one core the server used during the stage: near 100% means CPU-bound.
        cpu = (srv.cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before) * 100 if alive else None
        for r in got:
            r.extra.setdefault("load_1m", os.getloadavg()[0])  # machine load: how noisy this figure is
            if system == "pegasus" and alive:
                r.extra.setdefault("rss_mb", srv.rss_mb())
                r.extra.setdefault("server_cpu_pct", cpu)
        results += got
    return results


def _failed(label: str, system: str, exc: Exception) -> Result:
    missing = _missing_interface(exc)
    if missing:
        return Result(label.split(": ", 1)[1], system, skipped=missing)
    traceback.print_exc()
    return Result(label.split(": ", 1)[1], system, error=f"{type(exc).__name__}: {exc}")


def _missing_interface(exc: Exception) -> str | None:
    """A stage whose interface this build does not have yet (404 on its URL) is skipped, not failed."""
    if isinstance(exc, HttpError) and exc.status == 404 and not isinstance(exc.body, dict):
        return "REST endpoint not in this build"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 404:
        return "WebSocket endpoint not in this build"
    return None


def finish(args: argparse.Namespace, scale: Scale, results: list[Result], elapsed: float) -> int:
    evaluated = report.targets(results)
    mode = "smoke" if args.smoke else "full"
    load = os.getloadavg()
    meta: dict[str, Any] = {
        "mode": mode, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "elapsed_s": round(elapsed, 1),
        "scale": scale.__dict__, "cpus": os.cpu_count(), "load_avg": load, "python": platform.python_version(),
        "command": "make bench-smoke" if args.smoke else "make bench",
    }  # fmt: skip
    # Smoke and partial (--only) runs write scratch files (*.tmp, ignored by git); only a full
    # run of every stage replaces latest.*.
    scratch = args.smoke or bool(args.only)
    stem = "smoke" if args.smoke else "partial"
    json_path = RESULTS / (f"{stem}.json.tmp" if scratch else "latest.json")
    png_path = RESULTS / (f"{stem}.png.tmp" if scratch else "latest.png")
    report.write_json(json_path, meta, results, evaluated)
    report.chart(png_path, results, f"Pegasus bench ({mode}, {meta['finished_at']}, load {load[0]:.1f})")
    text = f"{report.table(results)}\n\n{report.targets_table(evaluated)}\n"
    if not scratch:
        (RESULTS / "latest.md").write_text(text)
    print(text)
    print(f"{mode} run took {elapsed:.0f} s; results in {json_path.relative_to(RESULTS.parent.parent)}, chart in "
          f"{png_path.relative_to(RESULTS.parent.parent)}")  # fmt: skip
    failed = [r for r in results if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
