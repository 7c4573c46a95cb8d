"""Baselines measured in the same run: raw psycopg on the same PostgreSQL and the same row shape
as Pegasus (a message row plus a delivery row per message), and RabbitMQ through pika.

The raw tables are copies of Pegasus's own (`CREATE TABLE ... (LIKE ... INCLUDING ALL)`: same
columns, defaults and indexes), created in the bench database after Pegasus's migrations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench.common import BODY, RABBIT_HOST, Result, Scale, run_for
from bench.server import bench_url

QUEUE_ID = 1  # the raw tables have no foreign key to a queue; one fixed id, as one queue
MSG_COLS = "body, content_type, headers, priority, dedup_id, destination, published_at, expires_at"
DLV_COLS = (
    "message_id, queue_id, state, priority, visible_at, expires_at, delivery_count, lease_token, "
    "transaction_id, dead_letter_reason"
)
INSERT_ONE = f"""
WITH m AS (
  INSERT INTO bench_message ({MSG_COLS}) VALUES (%s, '', '{{}}', 4, '', 'queue:raw', now(), NULL) RETURNING id
)
INSERT INTO bench_delivery ({DLV_COLS}) SELECT id, {QUEUE_ID}, 1, 4, now(), NULL, 0, '', NULL, '' FROM m
"""
DRAIN = f"""
WITH c AS (
  SELECT id FROM bench_delivery WHERE queue_id = {QUEUE_ID} AND state = 1 AND visible_at <= now()
  ORDER BY priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED
), d AS (
  DELETE FROM bench_delivery b USING c WHERE b.id = c.id RETURNING b.message_id
)
DELETE FROM bench_message m USING d WHERE m.id = d.message_id RETURNING m.id, m.body
"""


def create_raw_tables() -> None:
    with psycopg.connect(bench_url(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_delivery, bench_message")
        conn.execute("CREATE TABLE bench_message (LIKE messaging_message INCLUDING ALL)")
        conn.execute("CREATE TABLE bench_delivery (LIKE messaging_delivery INCLUDING ALL)")
        conn.execute(
            "ALTER TABLE bench_delivery ADD FOREIGN KEY (message_id) REFERENCES bench_message (id) "
            "DEFERRABLE INITIALLY DEFERRED"  # as Django creates its foreign keys
        )


# A reliable consume's least work per round, as a REST receive carrying the last batch's acks or
# a push consumer's ack-and-refill does it: ack (delete) the rows leased last round and lease the
# next ones (state 2, a visibility deadline), with their bodies, in one statement and one commit.
LEASE_AND_ACK = f"""
WITH acked AS (
  DELETE FROM bench_delivery WHERE id = ANY(%s::bigint[]) RETURNING message_id
), gone AS (
  DELETE FROM bench_message m USING acked WHERE m.id = acked.message_id
), c AS (
  SELECT id FROM bench_delivery WHERE queue_id = {QUEUE_ID} AND state = 1 AND visible_at <= now()
  ORDER BY priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED
)
UPDATE bench_delivery b
SET state = 2, visible_at = now() + interval '30 seconds', delivery_count = b.delivery_count + 1, lease_token = 'l'
FROM c, bench_message m WHERE b.id = c.id AND m.id = b.message_id
RETURNING b.id, m.body
"""


def truncate_raw_tables() -> None:
    with psycopg.connect(bench_url()) as conn:
        _truncate(conn)


def _truncate(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE bench_delivery, bench_message")
    conn.commit()


def raw_single(scale: Scale) -> Result:
    """One INSERT (message + delivery) and one COMMIT per message."""
    with psycopg.connect(bench_url()) as conn:
        _truncate(conn)

        def step() -> int:
            conn.execute(INSERT_ONE, (BODY,), prepare=True)
            conn.commit()
            return 1

        n, secs = run_for(scale.seconds, step)
    return Result("publish, one per commit", "postgres", n, secs, {"clients": 1})


def raw_executemany(scale: Scale) -> Result:
    """executemany of 100 messages (psycopg pipelines it), one COMMIT per 100."""
    params = [(BODY,)] * 100
    with psycopg.connect(bench_url()) as conn:
        _truncate(conn)

        def step() -> int:
            with conn.cursor() as cur:
                cur.executemany(INSERT_ONE, params)
            conn.commit()
            return 100

        n, secs = run_for(scale.seconds, step)
    return Result("publish, executemany 100 per commit", "postgres", n, secs, {"clients": 1, "batch": 100})


def copy_batch(conn: psycopg.Connection, count: int) -> None:
    """COPY `count` messages and their deliveries (ids taken from the sequence first)."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT nextval(pg_get_serial_sequence('bench_message', 'id')) FROM generate_series(1, %s)", (count,)
        )
    ]
    with conn.cursor() as cur:
        with cur.copy(f"COPY bench_message (id, {MSG_COLS}) FROM STDIN") as copy:
            for pk in ids:
                copy.write_row((pk, BODY, "", "{}", 4, "", "queue:raw", "now", None))
        with cur.copy(f"COPY bench_delivery ({DLV_COLS}) FROM STDIN") as copy:
            for pk in ids:
                copy.write_row((pk, QUEUE_ID, 1, 4, "now", None, 0, "", None, ""))


def raw_copy(scale: Scale) -> Result:
    """COPY 1,000 messages (and their deliveries) per COMMIT."""
    with psycopg.connect(bench_url()) as conn:
        _truncate(conn)

        def step() -> int:
            copy_batch(conn, 1000)
            conn.commit()
            return 1000

        n, secs = run_for(scale.seconds, step)
    return Result("publish, COPY 1,000 per commit", "postgres", n, secs, {"clients": 1, "batch": 1000})


def _fill(conn: psycopg.Connection, messages: int) -> None:
    """The raw tables holding `messages` ready messages and nothing else, analyzed."""
    _truncate(conn)
    for _ in range(0, messages, 1000):
        copy_batch(conn, 1000)
    conn.commit()
    conn.execute("ANALYZE bench_message, bench_delivery")
    conn.commit()


def raw_drain(scale: Scale) -> Result:
    """DELETE ... FOR UPDATE SKIP LOCKED in batches of 100, one COMMIT per batch."""
    with psycopg.connect(bench_url()) as conn:
        _fill(conn, scale.drain_messages)
        total = 0
        start = time.perf_counter()
        while True:
            got = len(conn.execute(DRAIN, (100,), prepare=True).fetchall())
            conn.commit()
            if not got:
                break
            total += got
        secs = time.perf_counter() - start
    return Result("consume, DELETE SKIP LOCKED 100 per commit", "postgres", total, secs, {"batch": 100})


def raw_lease_and_ack(scale: Scale) -> Result:
    """Lease 100 and ack the 100 leased before, one statement and one COMMIT per round, until
    the queue is empty (the last round only acks)."""
    with psycopg.connect(bench_url()) as conn:
        _fill(conn, scale.drain_messages)
        total = 0
        held: list[int] = []
        start = time.perf_counter()
        while True:
            rows = conn.execute(LEASE_AND_ACK, (held, 100), prepare=True).fetchall()
            conn.commit()
            total += len(held)
            held = [row[0] for row in rows]
            if not held:
                break
        secs = time.perf_counter() - start
    return Result("consume, lease 100 + ack 100 per commit", "postgres", total, secs, {"batch": 100})


# --------------------------------------------------------------------------- RabbitMQ

RABBIT_QUEUE = "pegasus-bench"


def rabbit_reachable() -> bool:
    try:
        with _rabbit() as _:
            return True
    except Exception:  # any failure to connect means "not reachable": the stage is skipped
        return False


@contextmanager
def _rabbit() -> Iterator[Any]:
    import pika  # imported here: only the RabbitMQ stages need it

    params = pika.ConnectionParameters(
        host=RABBIT_HOST, port=5672, credentials=pika.PlainCredentials("guest", "guest"), connection_attempts=1,
        socket_timeout=3, blocked_connection_timeout=30,
    )  # fmt: skip
    conn = pika.BlockingConnection(params)
    try:
        channel = conn.channel()
        channel.queue_declare(RABBIT_QUEUE, durable=True)
        channel.queue_purge(RABBIT_QUEUE)
        yield channel
    finally:
        conn.close()


def _persistent() -> object:
    import pika

    return pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


def rabbit_confirm_each(scale: Scale) -> Result:
    """Persistent messages to a durable queue, waiting for the publisher confirm of each."""
    props = _persistent()
    with _rabbit() as ch:
        ch.confirm_delivery()

        def step() -> int:
            ch.basic_publish("", RABBIT_QUEUE, BODY.encode(), props, mandatory=False)
            return 1

        n, secs = run_for(scale.seconds, step)
    return Result("publish, confirm each", "rabbitmq", n, secs, {"clients": 1})


def rabbit_tx100(scale: Scale) -> Result:
    """Persistent messages, one AMQP transaction (tx.select/tx.commit) per 100."""
    props = _persistent()
    body = BODY.encode()
    with _rabbit() as ch:
        ch.tx_select()

        def step() -> int:
            for _ in range(100):
                ch.basic_publish("", RABBIT_QUEUE, body, props)
            ch.tx_commit()
            return 100

        n, secs = run_for(scale.seconds, step)
    return Result("publish, transaction per 100", "rabbitmq", n, secs, {"clients": 1, "batch": 100})


def rabbit_consume(scale: Scale) -> Result:
    """Consume with prefetch 100, acking with multiple=True every 50 (half the prefetch window,
    so the broker keeps sending while acks travel: the usual way to run it fast)."""
    props = _persistent()
    body = BODY.encode()
    with _rabbit() as ch:
        ch.tx_select()
        for i in range(scale.drain_messages):
            ch.basic_publish("", RABBIT_QUEUE, body, props)
            if i % 1000 == 999:
                ch.tx_commit()
        ch.tx_commit()
        # Acks on a transactional channel wait for tx.commit: consume on a channel of its own.
        ch = ch.connection.channel()
        ch.basic_qos(prefetch_count=100)
        total = 0
        start = time.perf_counter()
        for method, _props, _body in ch.consume(RABBIT_QUEUE, inactivity_timeout=2):
            if method is None:
                break
            total += 1
            if total % 50 == 0 or total == scale.drain_messages:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if total == scale.drain_messages:
                break
        secs = time.perf_counter() - start
        ch.cancel()
    return Result("consume, prefetch 100, ack multiple", "rabbitmq", total, secs, {"prefetch": 100})
