"""What the process-level fault scenarios share: daphne servers we can kill -9, REST and
WebSocket clients that record into a ledger, and the quick/full scale switch.

A server listens on a socket this test process binds (port 0) and hands over with `--fd`, and
keeps open across restarts: a restarted server comes back on the same port, and a client that
connects while no server runs waits in the listen backlog instead of being refused (socket
activation, as systemd does it). kill -9 is SIGKILL to the daphne process: no cleanup at all.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.faults.ledger import FAILED, OK, UNKNOWN, Ledger
from tests.servers import Daphne

FULL = os.environ.get("PEGASUS_FAULTS") == "full"


def scale(quick: int, full: int) -> int:
    """Counts for CI (quick) and for `make faults` (PEGASUS_FAULTS=full)."""
    return full if FULL else quick


def killer(
    server: Daphne, *, cycles: int, low: float, high: float, seed: int, stop: threading.Event
) -> threading.Thread:
    """A thread that kill -9s the server `cycles` times at random moments and restarts it."""
    rng = random.Random(seed)

    def run() -> None:
        for _ in range(cycles):
            if stop.wait(rng.uniform(low, high)):
                return
            server.kill9()
            server.start()

    thread = threading.Thread(target=run, name="killer", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- REST clients


class Rest:
    """A REST client that classifies every answer. Statuses seen are counted (500 must be 0)."""

    def __init__(self, base: str, token: str, *, timeout: float = 10) -> None:
        self.http = httpx.Client(
            base_url=base + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        self.statuses: dict[int, int] = {}
        self.missing_retry_after = 0
        self.errors = 0
        self.slowest = 0.0  # seconds, the longest request (a figure, never asserted)

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, body: Any) -> httpx.Response | None:
        """The response, or None when the connection failed (the outcome is unknown)."""
        started = time.monotonic()
        try:
            response = self.http.post(path, json=body)
        except httpx.HTTPError:
            self.errors += 1
            return None
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        if response.status_code == 503 and "Retry-After" not in response.headers:
            self.missing_retry_after += 1
        return response

    def get(self, path: str) -> httpx.Response | None:
        try:
            response = self.http.get(path)
        except httpx.HTTPError:
            self.errors += 1
            return None
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        return response

    def publish(self, path: str, key: str, ledger: Ledger, **extra: Any) -> str:
        """One publish attempt of `key` (its body and dedup_id), recorded in the ledger."""
        response = self.post(path, {"body": key, "dedup_id": key, **extra})
        if response is not None and response.status_code == 201:
            ledger.attempt(key, OK, response.json()["messages"][0]["id"])
            return OK
        if response is not None and 400 <= response.status_code < 500 and response.status_code not in (408, 409, 429):
            ledger.attempt(key, FAILED)
            return FAILED
        ledger.attempt(key, UNKNOWN)
        return UNKNOWN

    def publish_until_confirmed(self, path: str, key: str, ledger: Ledger, *, deadline: float) -> bool:
        """Retry with the same dedup_id until the broker answers for sure (or the deadline)."""
        while time.monotonic() < deadline:
            outcome = self.publish(path, key, ledger)
            if outcome != UNKNOWN:
                return outcome == OK
            time.sleep(0.05)
        return False

    def receive(
        self, path: str, ledger: Ledger, *, max_messages: int = 10, wait: float = 0.5, **extra: Any
    ) -> list[dict[str, Any]]:
        response = self.post(path, {"max_messages": max_messages, "wait_seconds": wait, **extra})
        if response is None or response.status_code != 200:
            return []
        messages: list[dict[str, Any]] = response.json()["messages"]
        for m in messages:
            ledger.delivered(m["body"], m["id"], m["delivery_count"], m["redelivered"])
        return messages

    def ack(self, messages: list[dict[str, Any]], ledger: Ledger) -> bool:
        """Ack a batch; True when the broker answered (ok or stale for each)."""
        if not messages:
            return True
        response = self.post("/ack", {"receipts": [m["receipt"] for m in messages]})
        if response is None or response.status_code not in (200, 409):
            return False
        if response.status_code == 200:
            for m, result in zip(messages, response.json()["results"], strict=True):
                if result["status"] == "ok":
                    ledger.acked(m["id"], m["delivery_count"])
        return True


def drain(rest: Rest, path: str, ledger: Ledger, *, expected: Callable[[], bool], deadline: float) -> None:
    """Receive and ack until `expected()` holds and the queue answers empty, or the deadline."""
    while time.monotonic() < deadline:
        messages = rest.receive(path, ledger, max_messages=100, wait=0.5)
        rest.ack(messages, ledger)
        if not messages and expected():
            return


# --------------------------------------------------------------------------- WebSocket consumer


class WsConsumer(threading.Thread):
    """A JSON-protocol consumer (`websockets`) that acks every message, reconnects after any
    failure and records deliveries and acks. Runs until `stop` is set."""

    def __init__(self, url: str, token: str, source: dict[str, Any], ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(name="ws-consumer", daemon=True)
        self.url, self.token, self.source, self.ledger, self.stop_event = url, token, source, ledger, stop
        self.connections = 0
        self.received = 0
        self.received_by_connection: list[int] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._session()
            except Exception:  # a killed server, a reset connection: reconnect
                time.sleep(0.1)

    def _session(self) -> None:
        from websockets.sync.client import connect

        with connect(f"{self.url}/ws/v1/?token={self.token}", open_timeout=10, close_timeout=1) as ws:
            self.connections += 1
            self.received_by_connection.append(0)
            ws.send(json.dumps({"op": "subscribe", "id": "s", "prefetch": 10, "ack": "client", **self.source}))
            pending: dict[str, dict[str, Any]] = {}
            corr = 0
            while not self.stop_event.is_set():
                try:
                    frame = json.loads(ws.recv(timeout=0.5))
                except TimeoutError:
                    continue
                if frame.get("op") == "message":
                    m = frame["message"]
                    self.received += 1
                    self.received_by_connection[-1] += 1
                    self.ledger.delivered(m["body"], m["id"], m["delivery_count"], m["redelivered"])
                    corr += 1
                    pending[str(corr)] = m
                    ws.send(json.dumps({"op": "ack", "corr": str(corr), "receipts": [m["receipt"]]}))
                elif frame.get("op") == "ok" and frame.get("corr") in pending:
                    m = pending.pop(frame["corr"])
                    if frame["results"][0]["status"] == "ok":
                        self.ledger.acked(m["id"], m["delivery_count"])
                elif frame.get("op") == "error":
                    pending.pop(str(frame.get("corr")), None)
