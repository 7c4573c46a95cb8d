"""Real daphne servers for the WebSocket and STOMP tests, on the test database.

Each server is a separate process (`daphne -p 0`, the port it got read from its log), pointed at
the test database through DATABASE_URL. Tests that use one are `django_db(transaction=True)`, so
what they create is committed and visible to the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = str(Path(sys.executable).with_name("daphne"))
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # daphne's WebSocket message limit; the app's frame limit is lower
DAPHNE_LIMITS = [
    "--websocket-max-message-size",
    str(MAX_MESSAGE_BYTES),
    "--websocket-max-frame-size",
    str(MAX_MESSAGE_BYTES),
]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def database_url() -> str:
    sd = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{sd['NAME']}"
    host, port = sd.get("HOST") or "127.0.0.1", sd.get("PORT") or 5432
    password = f":{sd['PASSWORD']}" if sd.get("PASSWORD") else ""
    return f"postgres://{sd.get('USER') or 'postgres'}{password}@{host}:{port}/{sd['NAME']}"


def start_server(log: Path, **settings: str) -> Server:
    """daphne on a listening socket we bound to port 0 and hand over (`--fd`): no port races."""
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONPATH": str(ROOT), **settings}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [DAPHNE, "--fd", str(sock.fileno()), *DAPHNE_LIMITS,
                 "pegasus_site.asgi:application"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()],
            )  # fmt: skip
    server = Server(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if _answers(port):
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"daphne did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _answers(port: int) -> bool:
    """True once the application is loaded and answers HTTP (the socket accepts before that)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return conn.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


WAIT = 20  # seconds to wait for something expected (an upper bound, never a timing assertion)


def eventually(check: Callable[[], Any]) -> Any:
    """Poll until `check()` is truthy: the server cleans up after the client has gone."""
    deadline = time.monotonic() + WAIT
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return result


def settle() -> None:
    """Wait until the servers finished closing the test's connections (their last step removes
    the consumer rows), so the test database can be flushed without racing them."""
    from messaging.models import Consumer

    eventually(lambda: not Consumer.objects.exists())


@pytest.fixture(scope="session")
def daphne_factory(
    django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Start daphne servers on the test database; all are stopped at the end of the session,
    before the test database is dropped."""
    servers: list[Server] = []
    logs = tmp_path_factory.mktemp("daphne")

    def start(**settings: str) -> Server:
        with django_db_blocker.unblock():
            server = start_server(logs / f"daphne-{len(servers)}.log", **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(daphne_factory: Callable[..., Server]) -> Server:
    # Heart-beats every second (when a client asks for them), so the heart-beat test is quick.
    return daphne_factory(PEGASUS_STOMP_HEARTBEAT_MS="1000")


@pytest.fixture
def admin_token(alice: Any, token_for: Callable[[Any], str]) -> str:
    return token_for(alice)
