"""console/overview.py: slow stats reads are reused for a while; operator actions forget them."""

from __future__ import annotations

import pytest

from console import overview

pytestmark = pytest.mark.django_db


def test_adaptive__reuses_only_slow_reads(monkeypatch):
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    monkeypatch.setattr(overview, "SLOW_SECONDS", -1.0)  # every read counts as slow
    # ... and is kept for a while: compute() takes microseconds, which a busy machine can outlast
    # between two calls at the usual REUSE_FACTOR.
    monkeypatch.setattr(overview, "REUSE_FACTOR", 1e9)
    assert overview._adaptive(("t",), compute) == 1
    assert overview._adaptive(("t",), compute) == 1  # reused
    overview.forget()
    assert overview._adaptive(("t",), compute) == 2
    monkeypatch.setattr(overview, "SLOW_SECONDS", float("inf"))
    overview.forget()
    assert overview._adaptive(("t",), compute) == 3
    assert overview._adaptive(("t",), compute) == 4  # fast reads are never cached


def test_forget__one_queue_drops_it_and_the_overview(monkeypatch, queue_factory, publish):
    monkeypatch.setattr(overview, "SLOW_SECONDS", -1.0)
    q = queue_factory()
    assert overview.destination_row(q).stats["depth"] == 0
    assert overview.overview().queues[0].stats["depth"] == 0
    publish(q, "a")
    assert overview.destination_row(q).stats["depth"] == 0  # cached
    overview.forget(q.pk)
    assert overview.destination_row(q).stats["depth"] == 1
    assert overview.overview().queues[0].stats["depth"] == 1
