"""Real daphne servers for tests: on the test database, on a socket bound here.

The test binds a listening socket to port 0 and hands it to daphne with `--fd`: no port races,
and a server that is killed and restarted comes back on the same port while clients wait in the
listen backlog (socket activation, as systemd does it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parents[1]
DAPHNE = str(Path(sys.executable).with_name("daphne"))
# Settings tests/conftest.py makes for the test process itself: the servers run as in production.
TEST_PROCESS_ONLY = {"PEGASUS_GROUP_COMMIT_THREAD"}


def test_database_url() -> str:
    """The URL of the database this test run uses, for the servers it starts."""
    sd = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{sd['NAME']}"
    host, port = sd.get("HOST") or "127.0.0.1", sd.get("PORT") or 5432
    password = f":{sd['PASSWORD']}" if sd.get("PASSWORD") else ""
    return f"postgres://{sd.get('USER') or 'postgres'}{password}@{host}:{port}/{sd['NAME']}"


test_database_url.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name


class Daphne:
    """One daphne server that can be started, killed (-9) and restarted on the same socket."""

    def __init__(
        self, log: Path, database_url: str | None = None, *, args: Sequence[str] = (), **settings: str
    ) -> None:
        self.log = log
        self.args = list(args)
        env = {k: v for k, v in os.environ.items() if k not in TEST_PROCESS_ONLY}
        url = database_url or test_database_url()
        self.env = {**env, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), **settings}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Daphne:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [DAPHNE, "--fd", str(self.sock.fileno()), *self.args, "pegasus_site.asgi:application"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[self.sock.fileno()],
            )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            if answers(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daphne did not start:\n{self.log_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        self.sock.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def answers(port: int) -> bool:
    """True once the application is loaded and answers HTTP (the socket accepts before that)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return conn.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False
