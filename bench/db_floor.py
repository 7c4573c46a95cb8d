"""The database's share of a publish: `python -m bench.db_floor` (after `make bench`, which
leaves its database behind).

Runs Pegasus's own publish SQL (messaging/broker/bulk.py) in-process against the bench
database, 100 messages of 256 bytes per transaction, without HTTP, daphne or group commit, and
prints the wall time and client CPU per batch for the durable and the non-durable store, for
broker.publish (the same plus validation and bookkeeping; also of a single message, the
database's part of a latency round), for a receive + ack of 100, and for
the round of a consumer that acks and leases in one transaction (a push consumer with
prefetch 100 acking every 50; a REST receive carrying the previous batch's acks).
These are the floors a REST batch publish or consume cannot go under in this design
(docs/performance.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pegasus_site.settings")
os.environ["PEGASUS_DB_POOL"] = "0"

from bench.common import BODY
from bench.server import bench_url

os.environ["DATABASE_URL"] = bench_url()

import django

django.setup()

from django.db import transaction  # noqa: E402

from messaging import broker, clock  # noqa: E402
from messaging.broker import DURABLE, TRANSIENT, bulk  # noqa: E402

ROUNDS = 200


def measure(label: str, fn: Callable[[], object], messages: int = 100) -> float:
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(ROUNDS):
        fn()
    wall_ms = (time.perf_counter() - wall) / ROUNDS * 1000
    cpu_ms = (time.process_time() - cpu) / ROUNDS * 1000
    print(f"{label:<48} {wall_ms:6.2f} ms wall  {cpu_ms:5.2f} ms client CPU  ({messages * 1000 / wall_ms:,.0f} msg/s)")
    return wall_ms


def main() -> None:
    queue, _ = broker.create_queue(name="db-floor")
    for store in (DURABLE, TRANSIENT):
        durable = store is DURABLE
        messages = [broker.OutgoingMessage(body=BODY, durable=durable) for _ in range(100)]

        def insert(store: broker.Store = store, messages: list[broker.OutgoingMessage] = messages) -> None:
            with transaction.atomic():
                bulk.insert_messages(
                    store=store, destination="queue:db-floor", targets=[queue], messages=messages,
                    state=1, transaction_id=None, now=clock.now(),
                )  # fmt: skip

        kind = "durable" if durable else "non-durable"
        measure(f"{kind}: INSERT statement + COMMIT, 100 messages", insert)

        def publish(messages: list[broker.OutgoingMessage] = messages) -> None:
            broker.publish(queue=queue, messages=messages)

        measure(f"{kind}: broker.publish, 100 messages", publish)
    # The database's part of a latency round: one message, its own flushed commit.
    one = [broker.OutgoingMessage(body=BODY)]
    measure("durable: broker.publish, 1 message", lambda: broker.publish(queue=queue, messages=one), 1)
    # Consume: a receive of 100 (a lease, committed) and the ack of those 100 (committed), from a
    # queue of its own holding only what it consumes (the one above holds 80,000 messages of
    # both stores, which made this figure swing with their vacuum).
    broker.delete_queue(queue=queue)
    queue, _ = broker.create_queue(name="db-floor-consume")
    fill = [broker.OutgoingMessage(body=BODY) for _ in range(1000)]
    for _ in range(ROUNDS + 1):
        broker.publish(queue=queue, messages=fill[:100])

    def consume() -> None:
        got = broker.receive(queue=queue, max_messages=100)
        broker.ack(receipts=[m.receipt for m in got])

    measure("durable: receive 100 + ack 100, two commits", consume)
    broker.delete_queue(queue=queue)
    for size in (50, 100):
        measure_window(fill, size)


def measure_window(fill: list[broker.OutgoingMessage], size: int) -> None:
    """Rounds of a consumer that holds leased messages and, each round, acks the oldest `size`
    and leases `size` more in one transaction (broker.ack_and_receive): a push consumer with
    prefetch 100 acking every 50 (size 50), or a REST consumer whose receive of 100 carries the
    previous batch's acks (size 100)."""
    queue, _ = broker.create_queue(name=f"db-floor-window-{size}")
    for _ in range((ROUNDS + 3) * size // 100 + 1):
        broker.publish(queue=queue, messages=fill[:100])
    held = [m.receipt for m in broker.receive(queue=queue, max_messages=2 * size)]

    def round_trip() -> None:
        nonlocal held
        _, got = broker.ack_and_receive(receipts=held[:size], queue=queue, max_messages=size)
        held = held[size:] + [m.receipt for m in got]

    measure(f"durable: ack {size} + receive {size}, one commit", round_trip, size)
    broker.delete_queue(queue=queue)


if __name__ == "__main__":
    main()
