"""Where bridges run: inside every server process, with no extra daemon to remember.

Each daphne process (pegasus_site/asgi.py) starts one supervisor thread. Every SCAN_SECONDS it
lists the enabled bridges and, for each one it is not already running, starts a thread that tries
to take the bridge's runner lock (locks.py). The process that gets it forwards that bridge; the
others keep trying on their next scan, so when that process dies another one (or the same one,
restarted) takes over within a scan. `manage.py run_bridges` runs the same supervisor in the
foreground, for setups that keep it out of the web processes (PEGASUS_BRIDGES_RUNNER=off there).
"""

from __future__ import annotations

import logging
import threading

from django.db import close_old_connections, connection

from messaging.bridges import conf, link, locks
from messaging.bridges.bridge import Forwarder, Stopped
from messaging.bridges.models import Bridge

log = logging.getLogger("pegasus.bridges")
_started = False
_start_lock = threading.Lock()


class Supervisor:
    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.workers: dict[int, threading.Thread] = {}

    def run_forever(self) -> None:
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception:  # the database may be down: try again next scan
                log.warning("bridge scan failed", exc_info=True)
                connection.close()
            self.stop.wait(conf.get().scan_seconds)
        for worker in self.workers.values():
            worker.join()
        connection.close()

    def scan(self) -> None:
        """Start a worker for every enabled bridge that has none alive in this process."""
        close_old_connections()
        enabled = list(Bridge.objects.filter(enabled=True).order_by("pk").values_list("pk", flat=True))
        locked = locks.locked_bridges()  # by another process, or by our own live worker
        for bridge_id in enabled:
            worker = self.workers.get(bridge_id)
            if (worker is None or not worker.is_alive()) and locks.advisory_key(bridge_id) not in locked:
                worker = threading.Thread(
                    target=run_bridge, args=(bridge_id, self.stop), name=f"pegasus-bridge-{bridge_id}", daemon=True
                )
                self.workers[bridge_id] = worker
                worker.start()


def run_bridge(bridge_id: int, stop: threading.Event) -> None:
    """Forward one bridge in this thread for as long as this process holds its lock."""
    try:
        locks.use_own_connection()
        lock = locks.for_bridge(bridge_id)
        if lock.acquire():
            try:
                _forward(bridge_id, lock, stop)
            finally:
                lock.release()
    except Exception:  # a database outage or a bug: drop the lock; the next scan starts afresh
        log.warning("bridge %s: runner stopped", bridge_id, exc_info=True)
    finally:
        locks.discard_connection()  # also drops the advisory lock if release failed


def _forward(bridge_id: int, lock: locks.RunnerLock, stop: threading.Event) -> None:
    with link.new_client() as client:
        forwarder = Forwarder(bridge_id, client=client, lock=lock, sleep=stop.wait)
        try:
            forwarder.take_over()
            while not stop.is_set():
                if not forwarder.step():
                    forwarder.wait_for_messages()
            forwarder.release()
        except Stopped as why:
            log.info("bridge %s: runner stopping: %s", bridge_id, why)
            if lock.held():
                forwarder.release()
        finally:
            forwarder.close()


def start_in_background() -> None:
    """Start this process's supervisor once (unless PEGASUS_BRIDGES_RUNNER=off)."""
    global _started
    if not conf.runner_enabled():
        return
    with _start_lock:
        if _started:
            return
        _started = True
    threading.Thread(target=Supervisor().run_forever, name="pegasus-bridges", daemon=True).start()
