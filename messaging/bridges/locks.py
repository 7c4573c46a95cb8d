"""Exactly one active runner per bridge across all server processes.

PostgreSQL: a session-level advisory lock on the runner thread's own database connection. The
database drops it the moment that session ends, including when the process is killed with -9,
so a restarted or surviving process takes over at once. Because the runner's broker calls go
through the same session, a runner that lost its lock (its session died) cannot ack or extend
anything either: it fails and stops. A runner thread keeps its connection for its whole life
and discards it at the end (discard_connection), so the session never goes back to the pool.

SQLite: every process sharing the file runs on the same machine (SQLite requires that), so an
exclusive `flock` on a file next to the database does the same job, and the kernel drops it
when the process dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import IO, Protocol

from django.db import connection

_PG_CLASS_ID = 0x50475342  # "PGSB": keeps bridge locks apart from other advisory locks


class RunnerLock(Protocol):
    def acquire(self) -> bool: ...
    def held(self) -> bool: ...
    def release(self) -> None: ...


def for_bridge(bridge_id: int) -> RunnerLock:
    """The lock for this bridge, for use by the calling thread only."""
    if connection.vendor == "postgresql":
        return AdvisoryLock(bridge_id)
    name = str(connection.settings_dict["NAME"])
    if name == ":memory:" or name.startswith("file:"):
        return ProcessLock(bridge_id)
    return FileLock(f"{name}.bridge-{bridge_id}.lock")


def discard_connection() -> None:
    """Close this thread's database connection for real. With the connection pool, a plain
    close() hands the session back to the pool, and a session-level advisory lock with it: the
    next borrower would hold our bridge without knowing. A closed connection the pool discards."""
    raw = connection.connection
    if raw is not None:
        try:
            raw.close()
        except Exception:  # already broken: nothing left to close
            pass
    connection.close()


class AdvisoryLock:
    def __init__(self, bridge_id: int) -> None:
        self.key = bridge_id & 0x7FFFFFFF

    def acquire(self) -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [_PG_CLASS_ID, self.key])
            return bool(cursor.fetchone()[0])

    def held(self) -> bool:
        """Still ours: this very session holds it (a silently replaced session would not)."""
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND classid = %s AND objid = %s AND objsubid = 2 AND granted",
                [_PG_CLASS_ID, self.key],
            )
            return bool(cursor.fetchone()[0])

    def release(self) -> None:
        if connection.connection is None:
            return  # the session is gone and took the lock with it
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [_PG_CLASS_ID, self.key])


class FileLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def acquire(self) -> bool:
        handle = open(self.path, "ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        return True

    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


_process_locks: set[int] = set()
_process_guard = threading.Lock()


class ProcessLock:
    """In-memory databases live in one process: a set of bridge ids is enough."""

    def __init__(self, bridge_id: int) -> None:
        self.bridge_id = bridge_id
        self._held = False

    def acquire(self) -> bool:
        with _process_guard:
            if self.bridge_id in _process_locks:
                return False
            _process_locks.add(self.bridge_id)
            self._held = True
            return True

    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        with _process_guard:
            if self._held:
                _process_locks.discard(self.bridge_id)
                self._held = False
