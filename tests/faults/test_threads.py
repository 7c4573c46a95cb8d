"""Scenario 6: 8 producer and 4 consumer threads on one queue, in the embedded mode (SQLite; the
same test runs on PostgreSQL too).

First against the core in this process (each thread has its own database connection), then
over REST against one daphne server. SQLite allows one writer at a time: every writer must wait
its turn (WAL, BEGIN IMMEDIATE, busy timeout) instead of failing. "database is locked" surfacing
as an error = 0; any other error = 0; lost = 0; duplicated = 0.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection

from messaging import broker
from tests.faults.harness import Rest, scale
from tests.faults.ledger import OK, UNKNOWN, Ledger, assert_clean

pytestmark = pytest.mark.django_db(transaction=True)
PRODUCERS, CONSUMERS = 8, 4


class Errors:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locked = 0
        self.other: list[str] = []

    def add(self, exc: BaseException) -> None:
        with self.lock:
            if "locked" in str(exc).lower():
                self.locked += 1
            else:
                self.other.append(f"{type(exc).__name__}: {exc}"[:200])


def _in_thread(target: Callable[[], None], errors: Errors) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as exc:  # a thread's failure must reach the test
            errors.add(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _run(ledger: Ledger, produce: Callable[[int], None], consume: Callable[[threading.Event], None], errors: Errors):
    done = threading.Event()
    consumers = [_in_thread(lambda: consume(done), errors) for _ in range(CONSUMERS)]
    producers = [_in_thread(functools.partial(produce, n), errors) for n in range(PRODUCERS)]
    for t in producers:
        t.join()
    done.set()
    for t in consumers:
        t.join()


def test_threads_on_the_core__no_locked_errors_nothing_lost():
    queue, _ = broker.create_queue(name="s6")
    ledger = Ledger(f"6 threads on the core ({connection.vendor})")
    errors = Errors()
    per_producer = scale(100, 2000)

    def produce(n: int) -> None:
        for i in range(per_producer):
            key = f"p{n}-{i}"
            while True:
                try:
                    [result] = broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=key, dedup_id=key)])
                except Exception as exc:
                    errors.add(exc)
                    ledger.attempt(key, UNKNOWN)
                    continue
                ledger.attempt(key, OK, result.id)
                break

    def consume(done: threading.Event) -> None:
        while True:
            try:
                got = broker.receive(queue=queue, max_messages=10)
                for m in got:
                    ledger.delivered(m.body, m.id, m.delivery_count, m.redelivered)
                if got:
                    for m, status in zip(got, broker.ack(receipts=[m.receipt for m in got]), strict=True):
                        if status == broker.ACK_OK:
                            ledger.acked(m.id, m.delivery_count)
            except Exception as exc:
                errors.add(exc)
                continue
            if not got:
                if done.is_set():
                    return
                time.sleep(0.01)

    _run(ledger, produce, consume, errors)
    ledger.extra.update(locked_errors=errors.locked, other_errors=len(errors.other))
    figures = ledger.report()
    assert errors.locked == 0 and not errors.other, errors.other[:5]
    assert figures.confirmed == PRODUCERS * per_producer
    assert_clean(figures)


def test_threads_over_rest__no_locked_errors_nothing_lost(daphne, admin_token):
    broker.create_queue(name="s6r")
    server = daphne()
    ledger = Ledger(f"6 threads over REST ({connection.vendor})")
    errors = Errors()
    per_producer = scale(50, 1000)
    clients: list[Rest] = []

    def client() -> Rest:
        rest = Rest(server.url, admin_token, timeout=60)
        clients.append(rest)
        return rest

    def produce(n: int) -> None:
        rest = client()
        for i in range(per_producer):
            outcome = rest.publish("/queues/s6r/messages", f"p{n}-{i}", ledger)
            assert outcome == OK, f"publish answered {outcome}: {rest.statuses}"

    def consume(done: threading.Event) -> None:
        rest = client()
        while True:
            got = rest.receive("/queues/s6r/receive", ledger, max_messages=10, wait=0.2)
            assert rest.ack(got, ledger)
            if not got and done.is_set():
                return

    _run(ledger, produce, consume, errors)
    statuses: dict[int, int] = {}
    for rest in clients:
        for status, n in rest.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
        rest.close()
    locked = server.log_text().lower().count("database is locked")
    ledger.extra.update(locked_in_log=locked, statuses=statuses, other_errors=len(errors.other))
    figures = ledger.report()
    assert not errors.other and errors.locked == 0, errors.other[:5]
    assert locked == 0
    assert set(statuses) <= {200, 201}
    assert figures.confirmed == PRODUCERS * per_producer
    assert_clean(figures)
