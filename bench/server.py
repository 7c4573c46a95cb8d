"""The bench's own PostgreSQL database and the Pegasus server (daphne) it measures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from bench import trace as trace_module
from bench.common import BENCH_DB, PG_ADMIN_URL

ROOT = Path(__file__).resolve().parent.parent


def bench_url() -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + BENCH_DB


def recreate_database() -> None:
    """Drop and create the bench database, so every run starts from empty tables."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        name = sql.Identifier(BENCH_DB)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=bench_url(),
        PEGASUS_DEBUG="0",  # DEBUG keeps every query in memory: slower, and RSS would grow
        PEGASUS_SECRET_KEY="pegasus-bench-secret-key-not-for-production-0123456789abcdef",
        PEGASUS_ALLOWED_HOSTS="127.0.0.1,localhost",
        PEGASUS_SSL_REDIRECT="0",  # plain HTTP on loopback
    )
    return env


def manage(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=server_env(), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def migrate_and_token() -> str:
    manage("migrate", "--noinput")
    return manage("create_token", "bench", "--admin").strip().splitlines()[-1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One daphne process on a free port, serving the bench database."""

    def __init__(self, *, profile: Path | None = None, trace: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.log = open(ROOT / "bench" / "results" / "server.log.tmp", "w")
        bin_dir = Path(sys.executable).parent
        env = server_env()
        app = "pegasus_site.asgi:application"
        if trace is not None:  # the same application, with timestamps at each step (bench/trace.py)
            env[trace_module.ENV] = str(trace)
            app = "bench.trace:application"
        command = [str(bin_dir / "daphne"), "-b", "127.0.0.1", "-p", str(self.port), app]
        if profile is not None:  # sample the server with py-spy; collapsed stacks go to `profile`
            extra = os.environ.get("PEGASUS_BENCH_PYSPY_ARGS", "").split()  # e.g. --gil: CPU, not waits
            command = [
                str(bin_dir / "py-spy"),
                "record",
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(profile),
                *extra,
                "--",
                *command,
            ]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        self.pid = self._server_pid(profile is not None)

    def _server_pid(self, profiled: bool) -> int:
        if not profiled:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daphne exited with {self.proc.returncode}; see bench/results/server.log.tmp")
            try:
                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("daphne did not become ready in 60 s")

    def rss_mb(self) -> float:
        """Resident set size of the server process, in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.pid != self.proc.pid:  # py-spy writes its profile once the server exits
                os.kill(self.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pid != self.proc.pid:
            # py-spy, not daphne, is our child: a SIGTERM that arrives while py-spy has the server
            # paused can be lost, and a server left running would load every later run (seen
            # once: 40 minutes of console-rate queries on the bench database).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.log.close()
