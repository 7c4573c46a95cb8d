"""Scenario 4: PostgreSQL restarted with `-m immediate` (a crash, as far as PostgreSQL knows) and
backends killed with pg_terminate_backend, during steady REST and WebSocket traffic.

The whole team shares the PostgreSQL on 5432, so this test starts its OWN throwaway PostgreSQL
15 cluster (initdb as the postgres OS user, a free port, a socket directory of its own) and
crashes only that one. One daphne server runs on it throughout and is never restarted.

Lost = 0; HTTP 500 answers = 0 (a failure is 503 with Retry-After); the server serves again on
its own (/readyz 200); the WebSocket consumer goes on consuming (reconnecting if its connection
drops; the server keeps it open through database outages).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.harness import Rest, WsConsumer, scale
from tests.faults.ledger import Ledger, assert_clean
from tests.servers import ROOT, Daphne

pytestmark = pytest.mark.postgres
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DB = "pegasus_faults"


class Cluster:
    """A throwaway PostgreSQL cluster owned by the postgres OS user."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pegasus-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/{DB}"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, cwd=self.dir)

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), *args
        )

    def create(self) -> None:
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.pg_ctl("-w", "start")
        self.sql("postgres", f"CREATE DATABASE {DB}")

    def sql(self, database: str, statement: str) -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-Atc", statement],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout

    def crash_restart(self) -> None:
        """Immediate shutdown (no checkpoint: recovery from WAL at start), then start."""
        self.pg_ctl("-w", "-m", "immediate", "restart")

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every connection to OUR test database (never anyone else's)."""
        mine = f"datname = '{DB}' AND pid <> pg_backend_pid()"
        got = self.sql("postgres", f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {mine}")
        return int(got.strip() or 0)

    def destroy(self) -> None:
        try:
            self.pg_ctl("-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _manage(url: str, *args: str) -> str:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.fail("needs PostgreSQL 15 binaries in /usr/lib/postgresql/15/bin and runuser")
    c = Cluster()
    try:
        c.create()
        _manage(c.url, "migrate", "--noinput")
        yield c
    finally:
        c.destroy()


def test_postgres_crash_restarts_and_killed_backends__nothing_lost_no_500(cluster, tmp_path):
    token = _manage(cluster.url, "create_token", "faults", "--admin").strip().splitlines()[-1]
    server = Daphne(tmp_path / "daphne.log", cluster.url)
    server.start()
    ledger = Ledger("4 PostgreSQL immediate restarts + pg_terminate_backend")
    stop = threading.Event()
    rests = [Rest(server.url, token) for _ in range(3)]
    try:
        created = rests[0].post("/queues", {"name": "s4", "visibility_timeout_seconds": 3, "max_deliveries": 100})
        assert created is not None and created.status_code in (200, 201), created
        deadline = time.monotonic() + scale(120, 900)
        ws = WsConsumer(server.ws, token, {"queue": "s4"}, ledger, stop)
        producing, consuming = threading.Event(), threading.Event()
        threads = _traffic(rests, ledger, producing, consuming, deadline)
        ws.start()
        restarts, terminated = _faults(cluster, seed=4)
        # After the faults the WebSocket consumer alone must take what is published.
        consuming.set()
        threads[1].join(30)
        after_faults = ws.received
        time.sleep(1)
        producing.set()
        threads[0].join(30)
        _wait_for_all(ledger, time.monotonic() + 60)  # an upper bound, not a timing check
        if ledger.lost_keys():  # not yet delivered: say where they are while it is so
            print("not delivered after the faults:", _explain_lost(cluster, ledger), flush=True)
        ws_after = ws.received - after_faults
        before_drain = ledger.check().deliveries
        _drain_all(rests[2], ledger, deadline)  # whatever the WebSocket consumer did not take
        drained_over_rest = ledger.check().deliveries - before_drain
        stop.set()
        ws.join(15)
        ready = httpx.get(server.url + "/readyz", timeout=10).status_code
        statuses: dict[int, int] = {}
        for r in rests:
            for status, n in r.statuses.items():
                statuses[status] = statuses.get(status, 0) + n
        ledger.extra.update(
            pg_restarts=restarts, backends_terminated=terminated, statuses=statuses,
            missing_retry_after=sum(r.missing_retry_after for r in rests), server_starts=server.starts,
            ws_connections=ws.connections, ws_received_after_faults=ws_after,
            drained_over_rest=drained_over_rest, readyz=ready,
            slowest_request_s=round(max(r.slowest for r in rests), 1),
        )  # fmt: skip
        figures = ledger.report()
        if figures.lost:
            print(_explain_lost(cluster, ledger), flush=True)
    finally:
        stop.set()
        for r in rests:
            r.close()
        server.close()
    assert statuses.get(500, 0) == 0, server.log_text()[-3000:]
    assert figures.extra["missing_retry_after"] == 0
    assert ready == 200 and server.starts == 1, "the server serves again without its own restart"
    # The server keeps WebSocket connections open through database outages; if one drops, the
    # consumer reconnects. Either way it alone consumes everything published after the faults.
    assert figures.extra["ws_received_after_faults"] > 0, "the WebSocket consumer continued"
    assert figures.extra["drained_over_rest"] == 0, "the WebSocket consumer took everything after the faults"
    assert figures.confirmed > 0
    assert_clean(figures)


def _traffic(
    rests: list[Rest], ledger: Ledger, producing: threading.Event, consuming: threading.Event, deadline: float
) -> list[threading.Thread]:
    """One REST producer (retrying with the same dedup_id) and one REST consumer, each running
    until its event is set."""

    def produce() -> None:
        i = 0
        while not producing.is_set():
            rests[0].publish_until_confirmed("/queues/s4/messages", f"k{i}", ledger, deadline=deadline)
            i += 1

    def consume() -> None:
        while not consuming.is_set():
            got = rests[1].receive("/queues/s4/receive", ledger, max_messages=5, wait=0.5)
            rests[1].ack(got, ledger)
            if not got:
                time.sleep(0.05)

    threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
    for t in threads:
        t.start()
    return threads


def _faults(cluster: Cluster, *, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    restarts = terminated = 0
    for _ in range(scale(2, 5)):
        time.sleep(rng.uniform(0.5, 2.0))
        cluster.crash_restart()
        restarts += 1
        time.sleep(rng.uniform(0.5, 2.0))
        terminated += cluster.terminate_backends()
    return restarts, terminated


def _wait_for_all(ledger: Ledger, deadline: float) -> None:
    while time.monotonic() < deadline and not ledger.confirmed_keys() <= ledger.delivered_keys():
        time.sleep(0.1)


def _drain_all(rest: Rest, ledger: Ledger, deadline: float) -> None:
    """Consume until every confirmed message was delivered (the WebSocket consumer helps)."""
    while time.monotonic() < deadline and not ledger.confirmed_keys() <= ledger.delivered_keys():
        rest.ack(rest.receive("/queues/s4/receive", ledger, max_messages=50, wait=0.5), ledger)


def _explain_lost(cluster: Cluster, ledger: Ledger) -> str:
    """What the database holds for each lost key (its body and dedup_id), and the sessions and
    locks on the messaging tables, to say where it went."""
    import psycopg

    lines = []
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        for key in sorted(ledger.lost_keys()):
            lines.append(f"lost {key}: attempts {ledger.outcomes(key)}")
            rows = conn.execute(
                "SELECT m.id, d.id, d.state, d.visible_at, d.delivery_count, d.lease_token, d.transaction_id, "
                "now() FROM messaging_message m LEFT JOIN messaging_delivery d ON d.message_id = m.id "
                "WHERE m.body = %s",
                [key],
            ).fetchall()
            lines += [f"  row {r}" for r in rows] or ["  no message row"]
            dedup = conn.execute("SELECT * FROM messaging_deduprecord WHERE dedup_id = %s", [key]).fetchall()
            lines.append(f"  dedup {dedup}")
        for row in conn.execute(
            "SELECT pid, application_name, state, xact_start, now() - xact_start, left(query, 300) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall():
            lines.append(f"  session {row}")
        for row in conn.execute(
            "SELECT l.pid, l.locktype, l.mode, l.granted, c.relname, l.page, l.tuple FROM pg_locks l "
            "LEFT JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid <> pg_backend_pid() AND c.relname LIKE 'messaging%%'"
        ).fetchall():
            lines.append(f"  lock {row}")
    return "\n".join(lines)
