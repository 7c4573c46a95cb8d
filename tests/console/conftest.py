"""A real daphne server on the test database for the browser tests (tests/console/test_browser.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = str(Path(sys.executable).with_name("daphne"))


@dataclass
class ConsoleServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _database_url() -> str:
    sd = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{sd['NAME']}"
    password = f":{sd['PASSWORD']}" if sd.get("PASSWORD") else ""
    host, port = sd.get("HOST") or "127.0.0.1", sd.get("PORT") or 5432
    return f"postgres://{sd.get('USER') or 'postgres'}{password}@{host}:{port}/{sd['NAME']}"


def _start(log: Path) -> ConsoleServer:
    """daphne on a socket bound to port 0 here and handed over with --fd: no port races."""
    env = {**os.environ, "DATABASE_URL": _database_url(), "PYTHONPATH": str(ROOT), "PEGASUS_DEBUG": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [DAPHNE, "--fd", str(sock.fileno()), "pegasus_site.asgi:application"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()],
            )  # fmt: skip
    server = ConsoleServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                if conn.recv(12).startswith(b"HTTP/1."):
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"daphne did not start:\n{log.read_text(errors='replace')[-3000:]}")


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
        server = _start(tmp_path_factory.mktemp("console-daphne") / "daphne.log")
    yield server
    server.stop()
