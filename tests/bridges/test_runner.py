"""Where bridges run: one runner per bridge across processes (locks), and the supervisor."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from django.db import connection

from messaging import broker
from messaging.bridges import link, locks, runner
from messaging.bridges.models import BridgeState, LinkStatus

from .conftest import FakeTarget


def test_file_lock__exclusive_until_released(tmp_path):
    path = str(tmp_path / "db.sqlite3.bridge-1.lock")
    first, second = locks.FileLock(path), locks.FileLock(path)
    assert first.acquire() and first.held()
    assert not second.acquire() and not second.held()
    first.release()
    assert second.acquire()
    second.release()


def _in_thread(fn: Any) -> Any:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        finally:
            locks.discard_connection()  # a pooled close() would keep the thread's locks alive

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_advisory_lock__one_session_at_a_time_and_fenced():
    mine = locks.for_bridge(42)
    assert isinstance(mine, locks.AdvisoryLock)
    assert mine.acquire() and mine.held()
    assert _in_thread(lambda: locks.for_bridge(42).acquire()) is False
    assert _in_thread(lambda: locks.for_bridge(43).acquire()) is True  # other bridges are independent
    mine.release()
    assert not mine.held()
    assert _in_thread(lambda: locks.for_bridge(42).acquire()) is True
    assert _eventually(lambda: _bridge_locks_held() == [])  # none left behind in a pooled connection


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_use_own_connection__a_runner_session_is_outside_the_pool_and_really_closes():
    def run() -> tuple[Any, int, bool]:
        locks.use_own_connection()
        lock = locks.for_bridge(9)
        assert lock.acquire()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        held = 9 in locks.locked_bridges()
        return getattr(connection, "pool", None), pid, held

    pool, pid, held = _in_thread(run)
    assert pool is None and held
    # The session ends with the thread (the server notices the close a moment later), and its
    # lock with it; a pooled connection would have lived on.
    assert _eventually(lambda: locks.locked_bridges() == set())
    assert _eventually(lambda: _backend_gone(pid))


def _backend_gone(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return bool(cursor.fetchone()[0] == 0)


def _eventually(check: Any) -> bool:
    """Poll `check` for up to 10 s: a closed session leaves the server asynchronously."""
    deadline = time.monotonic() + 10
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _bridge_locks_held() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s", [locks._PG_CLASS_ID])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_advisory_lock__dies_with_its_session():
    mine = locks.for_bridge(7)
    assert mine.acquire()
    locks.discard_connection()  # what kill -9 does to the session, as far as the database can tell
    assert not mine.held()
    assert _eventually(lambda: _in_thread(lambda: locks.for_bridge(7).acquire()))


@pytest.mark.django_db(transaction=True)
def test_supervisors__forward_each_bridge_from_exactly_one_runner(
    bridge_factory, queue_factory, publish, settings, monkeypatch
):
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "SCAN_SECONDS": 0.1, "IDLE_POLL_SECONDS": 0.1}
    target = FakeTarget()
    senders: set[int] = set()

    def handle(request: httpx.Request) -> httpx.Response:
        senders.add(threading.get_ident())
        return target.handle(request)

    monkeypatch.setattr(link, "new_client", lambda: httpx.Client(transport=httpx.MockTransport(handle)))
    queue = queue_factory(name="src")
    bridge = bridge_factory(queue, batch_size=7)
    publish(queue, *[f"m{i}" for i in range(30)])
    # Two supervisors stand for two server processes: their runner threads have their own
    # database connections (PostgreSQL sessions) and their own lock-file handles (SQLite).
    stop = threading.Event()
    supervisors = [threading.Thread(target=runner.Supervisor(stop).run_forever) for _ in range(2)]
    for s in supervisors:
        s.start()
    try:
        deadline = time.monotonic() + 60
        while len(target.messages) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for s in supervisors:
            s.join()
    assert target.bodies == [f"m{i}" for i in range(30)]
    assert len(senders) == 1
    state = BridgeState.objects.get(pk=bridge.pk)
    assert state.forwarded_count == 30 and state.status == LinkStatus.CONNECTED and state.runner
    assert broker.receive(queue=queue) == []


def test_start_in_background__respects_pegasus_bridges_runner_off(monkeypatch):
    monkeypatch.setenv("PEGASUS_BRIDGES_RUNNER", "off")
    started = []
    monkeypatch.setattr(threading, "Thread", lambda *a, **k: started.append(1))
    runner.start_in_background()
    assert started == []
