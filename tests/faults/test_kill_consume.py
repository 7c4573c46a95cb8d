"""Scenario 2: kill -9 of the server while REST and WebSocket consumers receive and ack.

The queue is filled first (through the core); two REST consumers and one WebSocket consumer
(JSON protocol, client acks, prefetch 10) take and ack messages while a killer thread kill -9s
daphne at random moments. An ack whose answer is lost is simply not counted as acked: its
message comes back after the lease (2 s here) and must say `redelivered`, or the ack was
applied just before the kill and it never comes back (counted as ack_answer_lost). Messages lost = 0;
deliveries after a successful ack = 0; every redelivery flagged.
"""

from __future__ import annotations

import threading
import time

import pytest

from messaging import broker
from messaging.models import Delivery, State
from tests.faults.harness import Rest, WsConsumer, killer, scale
from tests.faults.ledger import OK, Ledger, assert_clean

pytestmark = pytest.mark.django_db(transaction=True)


def _fill(queue: str, count: int, ledger: Ledger) -> None:
    q = broker.get_queue(name=queue)
    for start in range(0, count, 500):
        keys = [f"c{i}" for i in range(start, min(count, start + 500))]
        results = broker.publish(queue=q, messages=[broker.OutgoingMessage(body=k, dedup_id=k) for k in keys])
        for key, result in zip(keys, results, strict=True):
            ledger.attempt(key, OK, result.id)


def _unacked(queue: str) -> int:
    """Deliveries of the queue not acked yet, from the database: an ack whose answer a kill
    took away may still have been applied, and the ledger cannot know that."""
    return Delivery.objects.filter(queue__name=queue).exclude(state=State.ACKED).count()


def test_kill9_while_consuming__nothing_lost_nothing_after_ack(daphne, admin_token):
    broker.create_queue(name="s2", settings=broker.QueueSettings(visibility_timeout_seconds=2, max_deliveries=100))
    ledger = Ledger("2 kill -9 while consuming (REST + WebSocket)")
    total = scale(1500, 15000)
    _fill("s2", total, ledger)
    server = daphne()
    stop = threading.Event()
    rests = [Rest(server.url, admin_token) for _ in range(2)]

    def consume(rest: Rest) -> None:
        while not stop.is_set():
            messages = rest.receive("/queues/s2/receive", ledger, max_messages=5, wait=0.5)
            time.sleep(0.01)  # "work"
            rest.ack(messages, ledger)

    threads = [threading.Thread(target=consume, args=(r,), daemon=True) for r in rests]
    ws = WsConsumer(server.ws, admin_token, {"queue": "s2"}, ledger, stop)
    for t in [*threads, ws]:
        t.start()
    killer(server, cycles=scale(3, 20), low=0.5, high=1.5, seed=2, stop=threading.Event()).join()
    deadline = time.monotonic() + scale(90, 600)
    while _unacked("s2") and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in [*threads, ws]:
        t.join(15)
    ledger.extra.update(
        kills=server.kills, unacked=_unacked("s2"), ack_answer_lost=total - len(ledger.acked_keys()),
        ws_connections=ws.connections, ws_received=ws.received,
        rest_received=ledger.check().deliveries - ws.received, http_500=sum(r.statuses.get(500, 0) for r in rests),
    )  # fmt: skip
    figures = ledger.report()
    for r in rests:
        r.close()
    assert figures.extra["unacked"] == 0, "every message is eventually acked"
    assert_clean(figures)
    assert ws.connections > 1 and ws.received > 0, "the WebSocket consumer reconnected and consumed"
    assert figures.extra["http_500"] == 0
