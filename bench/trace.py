"""Where a latency-stage message's time goes inside the server, step by step.

`python -m bench.run --trace --only "pegasus: latency"` serves Pegasus through this module's
`application` instead of pegasus_site.asgi's. It is the same application, with timestamps
(`time.perf_counter()`) taken as each published message passes the steps below, written to
bench/results/trace.tsv.tmp; the run then prints the median and 90th percentile of each step.
No server code is changed: the steps are wrappers put around the server's own functions at
start-up, and they find a message by the `t` header the latency stage's publisher sets. The
wrappers cost a few microseconds a step, so a traced run is a little slower than a plain one.

A sampling profiler (`--profile`) says where the CPU goes; this says where a message waits.
On 2026-12-07 it showed that most of a message's median latency was waiting for the previous
round of its connection's ordered publishes (docs/performance.md, "On the sixth machine").
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.common import percentile

ENV = "PEGASUS_BENCH_TRACE"  # the file the server writes its timestamps to

# The steps, in the order a message passes them (each a wrapper in `wrappers`).
FRAME = "publish frame received"
QUEUED = "into group commit"
HOP = "round handed to its thread"
ROUND = "round starts on its thread"
STATEMENT = "statement starts"
STATEMENT_DONE = "statement done (committed)"
ROUND_DONE = "round done on its thread"
BACK = "round's outcome back on the loop"
HANDED = "pusher handed the message"
PUSH = "push frame send starts"
PUSHED = "push frame sent"
# The report's rows: from one step to the next that the same message passes. The pusher is
# handed a message when its round commits (a lease at insert, or a hand-off's claim), so that
# branch starts at the statement; a message the pusher claims itself is never handed.
GAPS = (
    (FRAME, QUEUED), (QUEUED, HOP), (HOP, ROUND), (ROUND, STATEMENT), (STATEMENT, STATEMENT_DONE),
    (STATEMENT_DONE, ROUND_DONE), (ROUND_DONE, BACK), (STATEMENT_DONE, HANDED), (HANDED, PUSH), (PUSH, PUSHED),
)  # fmt: skip

_T_HEADER = re.compile(r'"t"\s*:\s*"([^"]+)"')

_rows: list[tuple[str, str, float]] = []  # (step, message key, perf_counter): list.append is atomic


def mark(step: str, keys: Iterable[Any]) -> None:
    now = time.perf_counter()
    for key in keys:
        if key is not None:
            _rows.append((step, str(key), now))


def _keys(messages: Iterable[Any]) -> list[Any]:
    """The `t` header of each message (OutgoingMessage or ReceivedMessage)."""
    return [(getattr(m, "headers", None) or {}).get("t") for m in messages]


def _publish_keys(publishes: Iterable[Any]) -> list[Any]:
    return [key for p in publishes for key in _keys(p.messages)]


def _around(owner: Any, name: str, before: Callable[..., None], after: Callable[..., None] | None = None) -> None:
    """Wrap `owner.name` (a function or a coroutine function) to call `before(*args, **kwargs)`
    on entry and `after(*args, **kwargs)` on exit."""
    original = getattr(owner, name)
    if getattr(original, "_traced", False):
        return
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            before(*args, **kwargs)
            try:
                return await original(*args, **kwargs)
            finally:
                if after is not None:
                    after(*args, **kwargs)

        wrapped: Any = wrapped_async
    else:

        @functools.wraps(original)
        def wrapped_sync(*args: Any, **kwargs: Any) -> Any:
            before(*args, **kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    after(*args, **kwargs)

        wrapped = wrapped_sync
    wrapped._traced = True  # installed once, however often install() runs
    setattr(owner, name, wrapped)


Wrapper = tuple[Any, str, Callable[..., None], Callable[..., None] | None]


def wrappers() -> list[Wrapper]:
    """(owner, attribute, on entry, on exit) for every server function a step wraps."""
    from messaging import group_commit, push
    from messaging.broker import bulk
    from messaging.consumers import JsonConsumer

    def frame_in(self: Any, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        found = _T_HEADER.search(text_data or "") if text_data and '"publish"' in text_data else None
        if found:
            mark(FRAME, [found.group(1)])

    def round_keys(round_: Any) -> list[Any]:
        return _publish_keys(p.publish for p in round_)

    committer = group_commit.GroupCommitter
    return [
        (JsonConsumer, "receive", frame_in, None),
        (committer, "publish", lambda self, publish: mark(QUEUED, _keys(publish.messages)), None),
        (
            committer, "_commit",
            lambda self, round_, **kw: mark(HOP, round_keys(round_)),
            lambda self, round_, **kw: mark(BACK, round_keys(round_)),
        ),
        (
            group_commit, "_run_round_on_its_thread",
            lambda publishes, *a, **kw: mark(ROUND, _publish_keys(publishes)),
            lambda publishes, *a, **kw: mark(ROUND_DONE, _publish_keys(publishes)),
        ),
        (
            bulk, "insert_messages",
            lambda **kw: mark(STATEMENT, _keys(kw["messages"])),
            lambda **kw: mark(STATEMENT_DONE, _keys(kw["messages"])),
        ),
        (push, "_settle", lambda handed, outcome: mark(HANDED, _keys(outcome[1]) if outcome else []), None),
        (
            JsonConsumer, "_deliver",
            lambda self, pusher, messages: mark(PUSH, _keys(messages)),
            lambda self, pusher, messages: mark(PUSHED, _keys(messages)),
        ),
    ]  # fmt: skip


def install(path: Path) -> None:
    """Put every wrapper in place and write the timestamps to `path` every second."""
    for owner, name, before, after in wrappers():
        _around(owner, name, before, after)
    threading.Thread(target=_write_every_second, args=(path,), name="bench-trace", daemon=True).start()


def _write_every_second(path: Path) -> None:
    written = 0
    path.write_text("")
    while True:
        time.sleep(1.0)
        rows = _rows[written:]
        written += len(rows)
        with path.open("a") as out:
            out.writelines(f"{step}\t{key}\t{at!r}\n" for step, key, at in rows)


# --------------------------------------------------------------------------- the report


def read(path: Path) -> dict[str, dict[str, float]]:
    """{message key: {step: first time it passed the step}}."""
    messages: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        step, key, at = line.split("\t")
        messages.setdefault(key, {}).setdefault(step, float(at))
    return messages


def summary(messages: dict[str, dict[str, float]]) -> str:
    """A table: for each step, the ms from the step before it (medians and 90th percentiles
    over the messages that passed both), then the wait behind the previous round."""
    lines = ["| step | messages | p50 ms | p90 ms |", "|---|---:|---:|---:|"]
    for before, step in GAPS:
        gaps = [(t[step] - t[before]) * 1000 for t in messages.values() if step in t and before in t]
        if gaps:
            gaps.sort()
            lines.append(f"| {before} → {step} | {len(gaps)} | {percentile(gaps, 50):.3f} | "
                         f"{percentile(gaps, 90):.3f} |")  # fmt: skip
    whole = sorted((t[PUSHED] - t[FRAME]) * 1000 for t in messages.values() if FRAME in t and PUSHED in t)
    if whole:
        lines.append(f"| **{FRAME} → {PUSHED}** | {len(whole)} | **{percentile(whole, 50):.3f}** | "
                     f"**{percentile(whole, 90):.3f}** |")  # fmt: skip
        claimed = sum(1 for t in messages.values() if PUSHED in t and HANDED not in t)
        lines.append("")
        lines.append(f"{claimed} of {len(whole)} messages were pushed by a claim of the pusher's own "
                     "(not handed over).")  # fmt: skip
    behind, free = waits_behind_previous_round(messages)
    if behind or free:
        share = len(behind) / (len(behind) + len(free))
        lines.append(
            f"{len(behind)} of {len(behind) + len(free)} messages ({share:.0%}) reached group commit while the "
            f"round before them was still out; they waited a median "
            f"{statistics.median(behind) if behind else 0:.3f} ms for their round, the others "
            f"{statistics.median(free) if free else 0:.3f} ms."
        )
    return "\n".join(lines)


def waits_behind_previous_round(messages: dict[str, dict[str, float]]) -> tuple[list[float], list[float]]:
    """The waits (ms, into group commit → round handed to its thread) of the messages that
    arrived while the previous message's round was out, and of the others. One publisher
    publishing in order, as the latency stage does."""
    timed = sorted((t for t in messages.values() if all(s in t for s in (QUEUED, HOP, BACK))), key=lambda t: t[QUEUED])
    behind: list[float] = []
    free: list[float] = []
    for previous, current in itertools.pairwise(timed):
        wait = (current[HOP] - current[QUEUED]) * 1000
        (behind if current[QUEUED] < previous[BACK] else free).append(wait)
    return behind, free


# --------------------------------------------------------------------------- the server


def _application() -> Any:
    from pegasus_site.asgi import application

    install(Path(os.environ[ENV]))
    return application


if os.environ.get(ENV):  # imported by daphne as bench.trace:application
    application = _application()
