"""pegasus_site.gc_tuning: the server process's garbage collector settings (called by asgi.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from pegasus_site.gc_tuning import YOUNG_THRESHOLD, settle_garbage_collector


@pytest.fixture
def settled() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        settle_garbage_collector()
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.enable()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_settle__freezes_what_start_up_left_and_raises_the_young_threshold(settled: None):
    assert gc.get_freeze_count() > 10_000  # Django and the apps are loaded in the test process
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD


def test_settle__garbage_made_afterwards_is_still_collected_on_its_own(settled: None):
    """A request's reference cycles are still freed, without anyone calling gc.collect(): only
    what existed at start-up is frozen, and the collector still runs."""
    assert gc.isenabled()
    node = _Node()
    alive = weakref.ref(node)
    del node
    kept: list[list[int]] = [[] for _ in range(2 * YOUNG_THRESHOLD)]  # allocations enough for a young collection
    assert alive() is None
    assert len(kept) == 2 * YOUNG_THRESHOLD
