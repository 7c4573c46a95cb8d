"""Exactly one active runner per bridge across all server processes.

PostgreSQL: a session-level advisory lock on the runner thread's own database connection. The
database drops it the moment that session ends, including when the process is killed with -9,
so a restarted or surviving process takes over at once. Because the runner's broker calls go
through the same session, a runner that lost its lock (its session died) cannot ack or extend
anything either: it fails and stops. A runner thread has a connection of its own, outside the
pool (use_own_connection), and closes it for real at the end (discard_connection).

SQLite: every process sharing the file runs on the same machine (SQLite requires that), so an
exclusive `flock` on a file next to the database does the same job, and the kernel drops it
when the process dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import IO, Protocol

from django.db import DEFAULT_DB_ALIAS, connection, connections

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


def use_own_connection() -> None:
    """Give the calling thread a PostgreSQL connection of its own, outside the connection pool.
    A runner keeps its session for as long as it runs (its advisory lock lives there): taken
    from the pool, it would hold a connection the web requests need. Call before any query."""
    if connection.vendor != "postgresql" or "pool" not in connection.settings_dict.get("OPTIONS", {}):
        return
    settings_dict = {**connection.settings_dict}
    settings_dict["OPTIONS"] = {k: v for k, v in settings_dict["OPTIONS"].items() if k != "pool"}
    connections[DEFAULT_DB_ALIAS] = type(connections[DEFAULT_DB_ALIAS])(settings_dict, DEFAULT_DB_ALIAS)


def locked_bridges() -> set[int]:
    """Bridges some session holds the advisory lock of (PostgreSQL; empty elsewhere): the
    supervisor starts no thread for those, so standby processes cost one query per scan."""
    if connection.vendor != "postgresql":
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted",
            [_PG_CLASS_ID],
        )
        return {int(row[0]) for row in cursor.fetchall()}


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


def advisory_key(bridge_id: int) -> int:
    return bridge_id & 0x7FFFFFFF  # the two-int form of the lock takes 32-bit keys


class AdvisoryLock:
    def __init__(self, bridge_id: int) -> None:
        self.key = advisory_key(bridge_id)

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
