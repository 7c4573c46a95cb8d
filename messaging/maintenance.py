"""Housekeeping in every server process: no extra daemon for the user to start.

A daemon thread calls broker.run_maintenance() every MAINTENANCE_INTERVAL_SECONDS. On
PostgreSQL an advisory lock lets one process at a time do the round; the others skip it.
"""

from __future__ import annotations

from django.db import connection

from messaging import background, broker, conf

_ADVISORY_KEY = 7_041_999_001


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


def start_in_background() -> None:
    background.start_loop(name="pegasus-maintenance", interval=conf.get().maintenance_interval_seconds, step=run_once)
