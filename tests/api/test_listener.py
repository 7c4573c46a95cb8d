"""The LISTEN/NOTIFY listener: notifications from other sessions ring this process's doorbell."""

from __future__ import annotations

import asyncio
import os
import resource
import time

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from messaging import events, listener
from messaging.doorbell import doorbell
from messaging.events import CHANNEL


@pytest.fixture(autouse=True)
def _no_own_senders() -> None:
    """Earlier tests' publishes made their connections this process's own senders, whose
    notifications the listener skips (messaging/events.py); these tests notify by hand."""
    events._own_backends.clear()


def test_parse_payload__keeps_ids_and_ignores_junk():
    assert listener.parse_payload("12,34") == [12, 34]
    assert listener.parse_payload("") == []
    assert listener.parse_payload("7,x, 8 ,-1") == [7, 8]


@pytest.mark.django_db
async def test_ensure_started__listens_only_on_postgres():
    listener.ensure_started()
    assert await listener.wait_listening(5) == (connection.vendor == "postgresql")


def _notify(payload: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


def _kill_our_listener_session() -> int:
    """Terminate this process's LISTEN session; other servers' (session-scoped daphnes that other
    test modules started) are left alone."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pegasus-listener' AND datname = current_database() AND pid = %s",
            [listener.listener.backend_pid],
        )
        return int(cursor.fetchone()[0])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
async def test_listener__rings_the_doorbell_on_notify():
    listener.ensure_started()
    listener.ensure_started()  # idempotent
    assert await listener.wait_listening(10)
    waiter = asyncio.ensure_future(doorbell.wait([424242], timeout=10))
    await asyncio.sleep(0)
    await database_sync_to_async(_notify)("1,424242")
    assert await waiter


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
async def test_listener__reconnects_after_its_session_is_killed():
    listener.ensure_started()
    assert await listener.wait_listening(10)
    before = listener.listener.connections_made
    assert await database_sync_to_async(_kill_our_listener_session)() == 1
    for _ in range(100):  # reconnects after a short backoff
        if listener.listener.connections_made > before and listener.listener.is_listening:
            break
        await asyncio.sleep(0.05)
    assert listener.listener.connections_made == before + 1
    waiter = asyncio.ensure_future(doorbell.wait([515151], timeout=10))
    await asyncio.sleep(0)
    await database_sync_to_async(_notify)("515151")
    assert await waiter


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_stop__closes_the_connection():
    listener.ensure_started()
    assert asyncio.run(listener.wait_listening(10))
    ours = listener.listener.backend_pid
    listener.stop()
    # The client's close is not the backend's exit: PostgreSQL lists the session until its
    # process has ended, a few milliseconds later (seen once in CI: still listed right after).
    for _ in range(100):
        with connection.cursor() as cursor:  # other servers' listeners (tests/ws) may be there too
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pegasus-listener' "
                "AND datname = current_database() AND pid = %s",
                [ours],
            )
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the listener's session was still open 5 s after stop()")


def _notify_as_this_process(payload: str) -> None:
    connection.ensure_connection()
    events.remember_sender()
    _notify(payload)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
async def test_listener__skips_what_this_process_sent_but_rings_for_others():
    """A notification from one of this process's connections was already rung on commit
    (events.notify_on_commit); one from any other connection rings."""
    listener.ensure_started()
    assert await listener.wait_listening(10)
    own = asyncio.ensure_future(doorbell.wait([616161], timeout=1))
    await asyncio.sleep(0)
    await database_sync_to_async(_notify_as_this_process)("616161")
    assert not await own  # timed out: not rung
    events._own_backends.clear()  # the same connection, now as if another process's
    other = asyncio.ensure_future(doorbell.wait([616162], timeout=10))
    await asyncio.sleep(0)
    await database_sync_to_async(_notify)("616162")
    assert await other


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_stop__is_prompt_while_waiting():
    """stop() wakes the thread waiting in poll() at once, not at its next keepalive."""
    listener.ensure_started()
    assert asyncio.run(listener.wait_listening(10))
    thread = listener.listener._thread
    assert thread is not None
    started = time.monotonic()
    listener.stop()
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
async def test_keepalive__a_quiet_connection_stays_and_still_rings(monkeypatch: pytest.MonkeyPatch):
    """After each quiet KEEPALIVE_SECONDS the listener sends SELECT 1 on its own connection,
    and keeps listening on it: no reconnect, and a notification afterwards still rings."""
    monkeypatch.setattr(listener, "KEEPALIVE_SECONDS", 0.1)
    listener.ensure_started()
    assert await listener.wait_listening(10)
    before = listener.listener.connections_made
    pid = listener.listener.backend_pid
    await asyncio.sleep(0.2)
    for _ in range(100):  # the keepalive shows in pg_stat_activity as the session's last query
        if await database_sync_to_async(_last_query)(pid) == "SELECT 1":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("no keepalive seen")
    await asyncio.sleep(0.5)  # a few more keepalives
    assert listener.listener.connections_made == before and listener.listener.is_listening
    waiter = asyncio.ensure_future(doorbell.wait([717171], timeout=10))
    await asyncio.sleep(0)
    await database_sync_to_async(_notify)("717171")
    assert await waiter


def _last_query(pid: int | None) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row[0] if row else None


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
async def test_listener__rings_when_its_socket_is_past_1024():
    """A long-running server may hold a thousand sockets when its listener (re)connects: the
    listener waits with poll(), which select()'s FD_SETSIZE limit (1024) does not bind."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1300:
        pytest.skip(f"this process may open only {soft} files")
    base = os.open(os.devnull, os.O_RDONLY)
    filler = [os.dup(base) for _ in range(1100)]  # descriptors are given lowest first
    try:
        probe = os.dup(base)
        os.close(probe)
        assert probe > 1024  # so the listener's new socket will be past it too
        listener.stop()
        listener.ensure_started()
        assert await listener.wait_listening(10)
        waiter = asyncio.ensure_future(doorbell.wait([818181], timeout=10))
        await asyncio.sleep(0)
        await database_sync_to_async(_notify)("818181")
        assert await waiter
    finally:
        listener.stop()
        for fd in (base, *filler):
            os.close(fd)
