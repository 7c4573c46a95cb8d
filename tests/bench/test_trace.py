"""bench/trace.py: the steps it wraps exist, its wrappers keep what they wrap working, and its
report measures each step and the wait behind the previous round."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from bench import trace


def test_every_function_a_step_wraps_exists() -> None:
    """A renamed server function must fail here, not leave `--trace` silently empty."""
    for owner, name, _, _ in trace.wrappers():
        assert callable(getattr(owner, name)), f"{owner}.{name}"


def test_wrappers_call_around_sync_and_async_functions_and_install_once() -> None:
    calls: list[str] = []

    def add(a: int, b: int) -> int:
        calls.append("add")
        return a + b

    async def later(x: int) -> int:
        calls.append("later")
        return x * 2

    owner = SimpleNamespace(add=add, later=later)
    for _ in range(2):  # a second install wraps nothing more
        trace._around(owner, "add", lambda a, b: calls.append("before add"), lambda a, b: calls.append("after add"))
        trace._around(owner, "later", lambda x: calls.append("before later"), lambda x: calls.append("after later"))
    assert owner.add(2, 3) == 5
    assert asyncio.run(owner.later(4)) == 8
    assert calls == ["before add", "add", "after add", "before later", "later", "after later"]


def _message(start: float, *, wait: float, handed: bool = True) -> dict[str, float]:
    """A traced message: each step 1 ms after the one before, waiting `wait` ms for its round."""
    ms = 0.001
    t = {trace.FRAME: start, trace.QUEUED: start + ms}
    t[trace.HOP] = t[trace.QUEUED] + wait * ms
    t[trace.ROUND] = t[trace.HOP] + ms
    t[trace.STATEMENT] = t[trace.ROUND] + ms
    t[trace.STATEMENT_DONE] = t[trace.STATEMENT] + 2 * ms
    t[trace.ROUND_DONE] = t[trace.STATEMENT_DONE] + ms
    t[trace.BACK] = t[trace.ROUND_DONE] + ms
    if handed:
        t[trace.HANDED] = t[trace.STATEMENT_DONE] + ms
    t[trace.PUSH] = t[trace.STATEMENT_DONE] + 2 * ms
    t[trace.PUSHED] = t[trace.PUSH] + ms
    return t


def test_summary_times_each_step_and_the_wait_behind_the_previous_round() -> None:
    messages: dict[str, Any] = {
        "a": _message(0.000, wait=0),
        "b": _message(0.003, wait=4),  # reached group commit (0.004) before a's round came back (0.008)
        "c": _message(0.100, wait=0, handed=False),  # long after: nothing to wait for; claimed by the pusher
    }
    behind, free = trace.waits_behind_previous_round(messages)
    assert [round(w, 3) for w in behind] == [4.0]
    assert [round(w, 3) for w in free] == [0.0]
    text = trace.summary(messages)
    assert f"| {trace.STATEMENT} → {trace.STATEMENT_DONE} | 3 | 2.000 | 2.000 |" in text
    assert f"| {trace.STATEMENT_DONE} → {trace.HANDED} | 2 | 1.000 | 1.000 |" in text
    assert "1 of 3 messages were pushed by a claim of the pusher's own" in text
    assert "1 of 2 messages (50%) reached group commit while the round before them was still out" in text


def test_read_keeps_the_first_time_a_message_passes_a_step(tmp_path) -> None:
    path = tmp_path / "trace.tsv"
    path.write_text(f"{trace.FRAME}\t1.5\t10.0\n{trace.PUSH}\t1.5\t10.2\n{trace.PUSH}\t1.5\t10.4\n")
    assert trace.read(path) == {"1.5": {trace.FRAME: 10.0, trace.PUSH: 10.2}}
