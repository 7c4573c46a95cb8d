"""Cross-process wake-ups: LISTEN on PostgreSQL, ring this process's doorbell.

The broker calls `pg_notify(messaging.events.CHANNEL, "12,34")` inside every transaction that
makes messages deliverable; PostgreSQL delivers it to every listening session exactly when that
transaction commits. One listener per server process turns those notifications into
`doorbell.ring([12, 34])`, so a long poll or a WebSocket pusher in this process wakes up when a
message was published through another process.

The listener owns a dedicated psycopg connection (never a Django connection: Django's
connections are per thread and closed between requests, and a LISTEN lives as long as its
session). It runs in a daemon thread of its own, which waits in `poll()` on the connection's
socket and on a socketpair that `stop()` writes to, and reads what arrives with libpq's own
calls (psycopg.pq); so it does not depend on the lifetime of whichever event loop first asked
for it (daphne's, or a test's), and can be started from sync code too. After every quiet
KEEPALIVE_SECONDS it sends a `SELECT 1` and gives it as long again to be answered, so a dead
connection is noticed, and it reconnects with exponential backoff.

Why not psycopg's `notifies()`: each publishing transaction's notification reaches every
process, this one's too (which skips it), so the listener wakes once per publishing
transaction. As an `AsyncConnection` on an event loop in its own thread it took 190-280 us of
CPU per notification (timers, reader callbacks, the GIL taken on each); blocked in `poll()`
it takes 60-115 us, most of it the thread's wake-up itself (docs/performance.md, item 28).

Notifications are only a doorbell: one may be lost (while reconnecting, say), so every waiter
also re-checks the database on a timer. A lost notification can delay a receive, never lose a
message. On SQLite there is nothing to listen to; the broker's on_commit ring is enough there.

Public entry point: `ensure_started()` (idempotent, cheap, callable from sync or async code).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
from typing import Any

import psycopg
from django.db import connections
from psycopg import pq, sql
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
        self._stopping: threading.Event | None = None  # the running thread's
        self._wake: socket.socket | None = None  # stop() writes to it: the thread stops waiting
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
            thread, stopping, wake = self._thread, self._stopping, self._wake
            self._thread = self._stopping = self._wake = None
        if stopping is not None:
            stopping.set()
        if wake is not None:
            try:
                wake.send(b"x")
            except OSError:  # the thread has ended and closed its end
                pass
            wake.close()
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
        stopping = threading.Event()
        wake, woken = socket.socketpair()
        thread = threading.Thread(
            target=self._main, args=(conninfo, stopping, woken), name="pegasus-listener", daemon=True
        )
        self._thread, self._stopping, self._wake, self._conninfo = thread, stopping, wake, conninfo
        thread.start()

    # ------------------------------------------------------------------ the thread

    def _main(self, conninfo: str, stopping: threading.Event, woken: socket.socket) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        try:
            while not stopping.is_set():
                try:
                    with psycopg.connect(conninfo, autocommit=True) as conn:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                        self.backend_pid = conn.info.backend_pid
                        self._now_listening()
                        backoff = FIRST_BACKOFF_SECONDS
                        _Pump(conn.pgconn, woken).run()
                except _Stopped:
                    return
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    if stopping.is_set():
                        return
                    log.warning("listener: connection lost (%s); reconnecting in %.1fs", exc, backoff)
                finally:
                    self._listening.clear()
                if stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        except Exception:  # pragma: no cover - the loop above ends only when stopped
            log.exception("listener: stopped unexpectedly")
        finally:
            woken.close()

    def _now_listening(self) -> None:
        self.connections_made += 1
        with self._lock:
            self._listening.set()
            waiters = list(self._ready_waiters)
        for future in waiters:
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)


class _Stopped(Exception):
    """stop() was called."""


class _Pump:
    """Ring the doorbell for every notification on one LISTEN connection, until stop() (raises
    _Stopped) or the connection fails (raises psycopg.Error, OSError or TimeoutError).

    It waits with poll(), not select(): a server holding a thousand WebSocket connections may
    give a listener that reconnects a descriptor past select()'s limit (FD_SETSIZE, 1024)."""

    def __init__(self, pgconn: pq.abc.PGconn, woken: socket.socket) -> None:
        self.pgconn = pgconn
        self.socket = pgconn.socket
        self.woken = woken.fileno()
        self.poller = select.poll()
        self.poller.register(self.socket, select.POLLIN)
        self.poller.register(self.woken, select.POLLIN)

    def run(self) -> None:
        while True:
            if self._wait(KEEPALIVE_SECONDS):
                self._read()
            else:  # quiet for a while: prove the connection still works, so a dead one gets replaced
                self._keepalive()

    def _wait(self, seconds: float) -> bool:
        """Until the connection has something to read, or has failed (True: reading tells
        which), or `seconds` have passed (False)."""
        ready = self.poller.poll(max(seconds, 0.0) * 1000)
        if any(fd == self.woken for fd, _ in ready):
            raise _Stopped
        return bool(ready)

    def _read(self) -> None:
        self.pgconn.consume_input()  # raises OperationalError once the connection is gone
        while (note := self.pgconn.notifies()) is not None:
            if not events.sent_here(note.be_pid):  # ours were rung on commit (events.py)
                doorbell.ring(parse_payload(note.extra.decode()))

    def _keepalive(self) -> None:
        """SELECT 1, answered within KEEPALIVE_SECONDS or TimeoutError; notifications that
        arrive meanwhile are rung as usual."""
        deadline = time.monotonic() + KEEPALIVE_SECONDS
        self.pgconn.send_query(b"SELECT 1")
        while self.pgconn.flush():  # not all sent yet (psycopg's connections are non-blocking)
            writable = select.poll()
            writable.register(self.socket, select.POLLOUT)
            if not writable.poll(max(deadline - time.monotonic(), 0.0) * 1000):
                raise TimeoutError("keepalive not sent")
        while self.pgconn.is_busy():
            if not self._wait(deadline - time.monotonic()):
                raise TimeoutError("keepalive not answered")
            self._read()
        while (result := self.pgconn.get_result()) is not None:
            if result.status != pq.ExecStatus.TUPLES_OK:
                raise psycopg.OperationalError("keepalive failed")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


listener = Listener()
ensure_started = listener.ensure_started
stop = listener.stop
wait_listening = listener.wait_listening
