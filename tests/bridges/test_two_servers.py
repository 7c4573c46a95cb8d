"""The acceptance test of issue 8: two Pegasus servers (two databases; the source served by two
daphne processes, the target by one), a bridge between them through a TCP fault proxy that
refuses, drops, delays, stalls and cuts connections, and a kill -9 and restart of the source
process running the bridge in the middle of the run.

10,000 messages in batches of 100 (PEGASUS_BRIDGE_FAULT_MESSAGES to change the count): all of
them must arrive, once each, in order. The figures are printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from django.db import connection

from messaging import broker, queries
from messaging.bridges.models import Bridge, BridgeState

from .faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = str(Path(sys.executable).with_name("daphne"))
MESSAGES = int(os.environ.get("PEGASUS_BRIDGE_FAULT_MESSAGES", "10000"))
BATCH = 100
DEADLINE_SECONDS = 600  # the whole run; it normally takes a small fraction of this


@dataclass
class Server:
    """One daphne process on one database, restartable (on a new port: the proxy is told)."""

    name: str
    database_url: str
    env: dict[str, str]
    logs: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": self.database_url, **self.env}
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        # A socket bound to port 0 here and handed to daphne (--fd): no port races.
        with socket.socket() as sock, log.open("wb") as out:
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            self.process = subprocess.Popen(
                [DAPHNE, "--fd", str(sock.fileno()), "pegasus_site.asgi:application"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()],
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{log.read_text(errors='replace')[-3000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _source_database_url() -> str:
    sd = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{sd['NAME']}"
    return _pg_url(sd["NAME"])


def _pg_url(name: str) -> str:
    sd = connection.settings_dict
    return f"postgres://{sd.get('USER') or 'postgres'}@{sd.get('HOST') or '127.0.0.1'}:{sd.get('PORT') or 5432}/{name}"


@pytest.fixture
def target_database(tmp_path: Path) -> Iterator[str]:
    """A second, empty database for the target server, migrated."""
    if connection.vendor == "sqlite":
        url = f"sqlite:///{tmp_path / 'target.sqlite3'}"
        yield from _migrated(url)
        return
    sd = connection.settings_dict
    name = f"{sd['NAME']}_target"[:63]
    admin = f"host={sd.get('HOST') or '127.0.0.1'} port={sd.get('PORT') or 5432} user={sd.get('USER') or 'postgres'}"
    with psycopg.connect(f"{admin} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield from _migrated(_pg_url(name))
    finally:
        with psycopg.connect(f"{admin} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrated(url: str) -> Iterator[str]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    yield url


def _manage_token(database_url: str) -> str:
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "manage.py", "create_token", "bridge-admin", "--admin"], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


def _depth(server: Server, token: str) -> int:
    try:
        r = httpx.get(f"{server.url}/api/v1/queues/inbox", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        return int(r.json()["depth"]) if r.status_code == 200 else -1
    except httpx.HTTPError:
        return -1


def _receive_all(server: Server, token: str) -> list[str]:
    bodies: list[str] = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        while True:
            r = http.post(
                "/api/v1/queues/inbox/receive", json={"max_messages": 1000, "visibility_timeout_seconds": 3600}
            )
            assert r.status_code == 200, r.text
            batch = r.json()["messages"]
            if not batch:
                return bodies
            bodies += [m["body"] for m in batch]


@pytest.mark.timeout(DEADLINE_SECONDS + 120)
@pytest.mark.django_db(transaction=True)
def test_bridge__10000_messages_through_a_faulty_link_and_a_kill_9(tmp_path, target_database, alice, token_for, capsys):
    seed = int(os.environ.get("PEGASUS_BRIDGE_FAULT_SEED", secrets.randbelow(10**6)))
    target = Server("target", target_database, {"PEGASUS_BRIDGES_RUNNER": "off"}, tmp_path)
    proxy: FaultProxy | None = None
    # Two processes serve the source database, as in production: each runs a bridge supervisor,
    # and the lock lets exactly one of them forward the bridge at a time.
    sources = [Server(f"source{n}", _source_database_url(), {
        "PEGASUS_BRIDGES_RUNNER": "on", "PEGASUS_BRIDGE_TIMEOUT": "2", "PEGASUS_BRIDGE_BACKOFF_MAX": "1",
    }, tmp_path) for n in (1, 2)]  # fmt: skip
    try:
        target.start()
        target_token = _manage_token(target_database)
        proxy = FaultProxy(target.port, seed=seed).start()
        # The target queue keeps dedup records for an hour: far longer than any retry here.
        with httpx.Client(base_url=target.url, headers={"Authorization": f"Bearer {target_token}"}) as http:
            r = http.post("/api/v1/queues", json={"name": "inbox", "dedup_window_seconds": 3600})
            assert r.status_code in (200, 201), r.text
        # Generous max_deliveries: each kill -9 mid-batch costs that batch one delivery.
        outbox, _ = broker.create_queue(name="outbox", settings=broker.QueueSettings(max_deliveries=100))
        for source in sources:
            source.env["PEGASUS_BRIDGE_TARGETS"] = f"http://127.0.0.1:{proxy.port}"
            source.start()
        _create_bridge(sources[0], token_for(alice), proxy.port, target_token)

        started = time.monotonic()
        for start in range(0, MESSAGES, 1000):
            bodies = [f"{i:06d}" for i in range(start, min(start + 1000, MESSAGES))]
            broker.publish(queue=outbox, messages=[broker.OutgoingMessage(body=b) for b in bodies])

        killed_at = _wait_for(target, target_token, MESSAGES * 3 // 10, started)
        victim = _runner_process(sources)
        victim.kill9()
        # The other process takes the bridge over (within a scan); then the victim comes back.
        survivor = _runner_process([s for s in sources if s is not victim])
        victim.start()
        _wait_for(target, target_token, MESSAGES, started)
        seconds = time.monotonic() - started
        _wait_until_source_is_drained(outbox, started)
        for source in sources:
            source.stop()
        received = _receive_all(target, target_token)
    finally:
        for server in [*sources, target]:
            server.stop()
        if proxy is not None:
            proxy.stop()
    expected = [f"{i:06d}" for i in range(MESSAGES)]
    state = BridgeState.objects.get(bridge=Bridge.objects.get(name="to-target"))
    figures = {
        "messages": MESSAGES, "batch_size": BATCH, "seed": seed, "seconds": round(seconds, 1),
        "source_processes": len(sources), "killed_runner_after": killed_at,
        "runners": f"{victim.name}, killed -9 and restarted; {survivor.name} took over",
        "faults": dict(proxy.counts), "failed_attempts_retried": state.retry_count,
        "duplicates_answered_by_target": state.duplicate_count,
        "lost": len(set(expected) - set(received)), "duplicated": len(received) - len(set(received)),
        "in_order": received == expected,
    }  # fmt: skip
    with capsys.disabled():
        print(f"\nbridge fault run: {json.dumps(figures)}")
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and len(received) == MESSAGES
    assert received == expected
    assert victim.starts == 2 and sum(v for k, v in proxy.counts.items() if k != "connections") > 0


def _create_bridge(source: Server, admin_token: str, proxy_port: int, target_token: str) -> None:
    with httpx.Client(base_url=source.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        r = http.post("/api/v1/bridges", json={
            "name": "to-target", "source_queue": "outbox", "target_url": f"http://127.0.0.1:{proxy_port}",
            "target_queue": "inbox", "target_token": target_token, "batch_size": BATCH,
        })  # fmt: skip
    assert r.status_code == 201, r.text
    assert "target_token" not in r.json() and r.json()["token_set"] is True


def _runner_process(sources: list[Server]) -> Server:
    """The source process that holds the bridge's runner lock, by the pid it reports."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runner = BridgeState.objects.get(bridge__name="to-target").runner
        pid = int(runner.rsplit(":", 1)[1]) if runner else 0
        for source in sources:
            if source.process is not None and source.process.pid == pid and source.process.poll() is None:
                return source
        time.sleep(0.25)
    raise AssertionError(f"no live source process reports running the bridge (runner={runner!r})")


def _wait_for(target: Server, token: str, count: int, started: float) -> int:
    """Until the target queue holds `count` messages; returns how many it held then."""
    while time.monotonic() - started < DEADLINE_SECONDS:
        depth = _depth(target, token)
        if depth >= count:
            return depth
        time.sleep(0.25)
    raise AssertionError(f"the target holds {_depth(target, token)} of {count} messages after {DEADLINE_SECONDS} s")


def _wait_until_source_is_drained(outbox: Any, started: float) -> None:
    """Every message acked at the source (the last acks may trail the target's count)."""
    while time.monotonic() - started < DEADLINE_SECONDS:
        stats = queries.queue_stats(outbox)
        if stats["depth"] == 0 and stats["in_flight"] == 0:
            assert stats["dead_lettered"] == 0
            return
        time.sleep(0.25)
    raise AssertionError(f"the source still holds messages: {queries.queue_stats(outbox)}")
