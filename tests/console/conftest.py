"""A real daphne server on the test database for the browser tests (tests/console/test_browser.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import Daphne

ConsoleServer = Daphne


@pytest.fixture(autouse=True)
def _no_stats_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Console stats are cached only when a read is slow; a slow CI machine must not make the
    tests see stale numbers (test_overview_cache.py tests the cache itself)."""
    from console import overview

    overview.forget()
    monkeypatch.setattr(overview, "SLOW_SECONDS", float("inf"))
    yield
    overview.forget()


@pytest.fixture(scope="session")
def console_server(
    django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleServer]:
    """One daphne for the session, stopped before the test database is dropped."""
    with django_db_blocker.unblock():
        server = Daphne(tmp_path_factory.mktemp("console-daphne") / "daphne.log", PEGASUS_DEBUG="1").start()
    yield server
    server.stop()


@pytest.fixture
def empty_counters() -> Iterator[None]:
    """The in-process publish/deliver/ack counters start and end empty."""
    from messaging import metrics

    metrics.drain()
    yield
    metrics.drain()
