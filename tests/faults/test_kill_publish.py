"""Scenario 1: kill -9 of the server while producers publish, retrying with the same dedup_id.

Two producer threads publish keys one by one over REST; a publish that gets no definite answer
(connection reset, server gone, 5xx) is retried with the same dedup_id until one comes. A killer
thread kill -9s daphne at random moments and restarts it. At the end one consumer drains the
queue. Confirmed messages lost = 0, duplicates enqueued = 0.
"""

from __future__ import annotations

import threading
import time

import pytest

from messaging import broker
from tests.faults.harness import Rest, drain, killer, scale
from tests.faults.ledger import Ledger, assert_clean

pytestmark = pytest.mark.django_db(transaction=True)

PRODUCERS = 2


def test_kill9_while_publishing__nothing_confirmed_is_lost_or_duplicated(daphne, admin_token):
    broker.create_queue(name="s1")
    server = daphne()
    ledger = Ledger("1 kill -9 while publishing")
    cycles = scale(3, 20)
    stop = threading.Event()
    deadline = time.monotonic() + scale(60, 600)
    clients = [Rest(server.url, admin_token) for _ in range(PRODUCERS + 1)]

    def produce(n: int) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            clients[n].publish_until_confirmed("/queues/s1/messages", f"p{n}-{i}", ledger, deadline=deadline)
            i += 1

    producers = [threading.Thread(target=produce, args=(n,), daemon=True) for n in range(PRODUCERS)]
    for t in producers:
        t.start()
    kill = killer(server, cycles=cycles, low=0.3, high=1.5, seed=1, stop=threading.Event())
    kill.join()
    time.sleep(0.5)  # a little traffic after the last restart
    stop.set()
    for t in producers:
        t.join()
    consumer = clients[-1]
    drain(consumer, "/queues/s1/receive", ledger, expected=lambda: ledger.confirmed_keys() <= ledger.delivered_keys(),
          deadline=time.monotonic() + 60)  # fmt: skip
    ledger.extra.update(kills=server.kills, http_500=sum(c.statuses.get(500, 0) for c in clients))
    figures = ledger.report()
    for c in clients:
        c.close()
    assert server.kills == cycles
    assert figures.confirmed > 0
    assert_clean(figures)
    assert figures.extra["http_500"] == 0
