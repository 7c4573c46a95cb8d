"""Scenario 5: a durable subscription keeps collecting while its consumer is away, across a
kill -9 of the server.

A WebSocket consumer subscribes durably to topic t5 as `d5` and consumes; it goes away; a
producer publishes over REST (retrying with the same dedup_id) while the server is killed and
restarted in the middle; then the consumer comes back under the same name and must get every
message confirmed while it was away. Repeated for a few cycles. Missed = 0.
"""

from __future__ import annotations

import threading
import time

import pytest

from messaging import broker
from tests.faults.harness import Rest, WsConsumer, killer, scale
from tests.faults.ledger import Ledger, assert_clean

pytestmark = pytest.mark.django_db(transaction=True)
SOURCE = {"topic": "t5", "subscription": "d5", "durable": True}


def test_durable_subscription_misses_nothing_while_away_and_killed(daphne, admin_token):
    topic, _ = broker.create_topic(name="t5")
    # A short lease: messages leased to a consumer that a kill cut off come back quickly.
    lease = broker.QueueSettings(visibility_timeout_seconds=3)
    broker.create_subscription(topic=topic, name="d5", durable=True, settings=lease)
    server = daphne()
    ledger = Ledger("5 durable subscription away + kill -9")
    producer = Rest(server.url, admin_token)
    deadline = time.monotonic() + scale(90, 900)
    per_phase = scale(40, 300)
    consumers: list[WsConsumer] = []
    key = 0

    def publish(count: int) -> None:
        nonlocal key
        for _ in range(count):
            producer.publish_until_confirmed("/topics/t5/messages", f"d{key}", ledger, deadline=deadline)
            key += 1

    for _cycle in range(scale(2, 10)):
        stop = threading.Event()
        consumer = WsConsumer(server.ws, admin_token, SOURCE, ledger, stop)
        consumers.append(consumer)
        consumer.start()
        _wait(lambda c=consumer: c.connections > 0, deadline)
        publish(per_phase)  # while the consumer is there
        _wait(lambda: ledger.confirmed_keys() <= ledger.delivered_keys(), deadline)
        stop.set()
        consumer.join(15)
        # While it is away: the server is killed at a random moment of the publishing.
        kill = killer(server, cycles=1, low=0.1, high=0.6, seed=_cycle, stop=threading.Event())
        publish(per_phase)
        kill.join()
        publish(per_phase)  # still away, after the restart
    stop = threading.Event()
    last = WsConsumer(server.ws, admin_token, SOURCE, ledger, stop)
    last.start()
    _wait(lambda: ledger.confirmed_keys() <= ledger.delivered_keys(), deadline)
    stop.set()
    last.join(15)
    confirmed, delivered = ledger.confirmed_keys(), ledger.delivered_keys()
    ledger.extra.update(kills=server.kills, missed=len(confirmed - delivered), http_500=producer.statuses.get(500, 0))
    figures = ledger.report()
    producer.close()
    assert figures.extra["missed"] == 0
    assert figures.extra["http_500"] == 0
    assert_clean(figures)


def _wait(condition, deadline: float) -> None:
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
