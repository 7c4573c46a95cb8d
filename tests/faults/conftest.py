"""Fixtures of the fault-injection suite (docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.ledger import NOTES, REPORTED
from tests.servers import Daphne, test_database_url


@pytest.fixture
def daphne(tmp_path: Path) -> Iterator[Callable[..., Daphne]]:
    """Start daphne servers on the test database; all are stopped before the database is flushed."""
    servers: list[Daphne] = []

    def start(**settings: str) -> Daphne:
        server = Daphne(tmp_path / f"daphne-{len(servers)}.log", test_database_url(), **settings)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def admin_token(alice: Any, token_for: Callable[[Any], str]) -> str:
    return str(token_for(alice))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORTED or NOTES:
        terminalreporter.section("fault-injection figures")
        for figures in REPORTED:
            terminalreporter.write_line(figures.line())
        for line in NOTES:
            terminalreporter.write_line(line)
