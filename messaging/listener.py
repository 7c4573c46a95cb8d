"""Cross-process wake-ups: LISTEN on PostgreSQL, ring this process's doorbell.

The broker calls `pg_notify(messaging.events.CHANNEL, "12,34")` inside every transaction that
makes messages deliverable; PostgreSQL delivers it to every listening session exactly when that
transaction commits. One listener per server process turns those notifications into
`doorbell.ring([12, 34])`, so a long poll or a WebSocket pusher in this process wakes up when a
message was published through another process.

The listener owns a dedicated psycopg `AsyncConnection` (never a Django connection: Django's
connections are per thread and closed between requests, and a LISTEN lives as long as its
session). It runs in its own daemon thread with its own event loop, so it does not depend on
the lifetime of whichever event loop first asked for it (daphne's, or a test's), and can be
started from sync code too. It sends a `SELECT 1` after every quiet KEEPALIVE_SECONDS, so a dead
connection is noticed, and reconnects with exponential backoff.

Notifications are only a doorbell: one may be lost (while reconnecting, say), so every waiter
also re-checks the database on a timer. A lost notification can delay a receive, never lose a
message. On SQLite there is nothing to listen to; the broker's on_commit ring is enough there.

Public entry point: `ensure_started()` (idempotent, cheap, callable from sync or async code).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import psycopg
from django.db import connections
from psycopg import sql
from psycopg.conninfo import make_conninfo

from messaging import events
from messaging.doorbell import doorbell
from messaging.events import CHANNEL

log = logging.getLogger("pegasus.listener")

KEEPALIVE_SECONDS = 10.0
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5

# Connection OPTIONS that are libpq parameters (Django's own options, like isolation_level or
# pool, are not, and psycopg would reject them).
_LIBPQ_OPTIONS = {
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "application_name", "options",
    "target_session_attrs", "passfile", "service", "gssencmode", "channel_binding",
}  # fmt: skip


def parse_payload(payload: str) -> list[int]:
    """Queue ids from a notification payload ("12,34"); anything else is ignored."""
    return [int(part) for part in payload.split(",") if part.strip().isdigit()]


def conninfo_for(alias: str = "default") -> str:
    """A libpq connection string for the database Django's `alias` connection uses."""
    sd = connections[alias].settings_dict
    params: dict[str, Any] = {
        "dbname": sd.get("NAME") or None,
        "user": sd.get("USER") or None,
        "password": sd.get("PASSWORD") or None,
        "host": sd.get("HOST") or None,
        "port": str(sd["PORT"]) if sd.get("PORT") else None,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        # TCP keepalives notice a vanished server even while we are only reading.
        "keepalives": 1,
        "keepalives_idle": 30,
        "application_name": "pegasus-listener",
    }
    params.update({k: v for k, v in (sd.get("OPTIONS") or {}).items() if k in _LIBPQ_OPTIONS})
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


class Listener:
    """One LISTEN connection in a daemon thread with its own event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._conninfo = ""
        self._listening = threading.Event()
        self._ready_waiters: set[asyncio.Future[None]] = set()
        self.connections_made = 0  # how many times LISTEN was (re)established; for tests and stats
        self.backend_pid: int | None = None  # the LISTEN session's server pid (pg_stat_activity.pid)

    # ------------------------------------------------------------------ control

    def ensure_started(self) -> None:
        """Start listening unless already running for this database. A no-op off PostgreSQL."""
        if connections["default"].vendor != "postgresql":
            return
        conninfo = conninfo_for()
        with self._lock:
            if self._running() and conninfo == self._conninfo:
                return
        if self._running():  # the database changed (tests switch to the test database)
            self.stop()
        with self._lock:
            if self._running():
                return
            self._start(conninfo)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close the connection (tests; process shutdown)."""
        with self._lock:
            loop, task, thread = self._loop, self._task, self._thread
            self._thread = self._loop = self._task = None
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._listening.clear()

    @property
    def is_listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, timeout: float) -> bool:
        """Wait (without blocking the loop) until LISTEN is established; False on timeout."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._listening.is_set():
                return True
            if not self._running():
                return False
            self._ready_waiters.add(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return self._listening.is_set()
        finally:
            with self._lock:
                self._ready_waiters.discard(future)

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self, conninfo: str) -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(self._main(conninfo))
        thread = threading.Thread(target=_run_loop, args=(loop, task), name="pegasus-listener", daemon=True)
        self._loop, self._task, self._thread, self._conninfo = loop, task, thread, conninfo
        thread.start()

    # ------------------------------------------------------------------ the loop

    async def _main(self, conninfo: str) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    self.backend_pid = conn.info.backend_pid
                    self._now_listening()
                    backoff = FIRST_BACKOFF_SECONDS
                    await self._pump(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("listener: connection lost (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                self._listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _pump(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for note in conn.notifies(timeout=KEEPALIVE_SECONDS):
                if not events.sent_here(note.pid):  # ours were rung on commit (events.py)
                    doorbell.ring(parse_payload(note.payload))
            # Quiet for a while: prove the connection still works, so a dead one gets replaced.
            await asyncio.wait_for(conn.execute("SELECT 1"), KEEPALIVE_SECONDS)

    def _now_listening(self) -> None:
        self.connections_made += 1
        with self._lock:
            self._listening.set()
            waiters = list(self._ready_waiters)
        for future in waiters:
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)


def _run_loop(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass  # stopped
    except Exception:  # pragma: no cover - _main only ends by cancellation
        log.exception("listener: stopped unexpectedly")
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


listener = Listener()
ensure_started = listener.ensure_started
stop = listener.stop
wait_listening = listener.wait_listening
