"""Periodic work inside each server process: no extra daemon for the user to start."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.db import close_old_connections, connection

log = logging.getLogger("pegasus.background")
_started: set[str] = set()
_lock = threading.Lock()


def start_loop(*, name: str, interval: float, step: Callable[[], object]) -> None:
    """Run `step()` every `interval` seconds in a daemon thread, once per process per `name`.
    A failing step (the database is away, say) is logged and tried again next time."""
    with _lock:
        if name in _started:
            return
        _started.add(name)
    threading.Thread(target=_loop, args=(name, interval, step), name=name, daemon=True).start()


def _loop(name: str, interval: float, step: Callable[[], object]) -> None:
    while True:
        time.sleep(interval)
        try:
            close_old_connections()
            step()
        except Exception:  # keep the loop alive through database outages
            log.warning("%s failed", name, exc_info=True)
            connection.close()
