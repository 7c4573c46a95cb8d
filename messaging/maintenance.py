"""Housekeeping in every server process: no extra daemon for the user to start.

A daemon thread calls broker.run_maintenance() every MAINTENANCE_INTERVAL_SECONDS. On
PostgreSQL an advisory lock lets one process at a time do the round; the others skip it.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import close_old_connections, connection

from messaging import broker, conf

log = logging.getLogger("pegasus.maintenance")
_ADVISORY_KEY = 7_041_999_001
_started = False
_start_lock = threading.Lock()


def run_once() -> broker.MaintenanceReport | None:
    """One round, unless another process is doing one right now (PostgreSQL)."""
    if connection.vendor != "postgresql":
        return broker.run_maintenance()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_ADVISORY_KEY])
        if not cursor.fetchone()[0]:
            return None
        try:
            return broker.run_maintenance()
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [_ADVISORY_KEY])


def _loop() -> None:
    interval = conf.get().maintenance_interval_seconds
    while True:
        time.sleep(interval)
        try:
            close_old_connections()
            run_once()
        except Exception:  # keep the loop alive through database outages
            log.warning("maintenance round failed", exc_info=True)
            connection.close()


def start_in_background() -> None:
    global _started
    with _start_lock:
        if _started:
            return
        _started = True
    threading.Thread(target=_loop, name="pegasus-maintenance", daemon=True).start()
