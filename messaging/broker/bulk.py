"""Hot-path SQL for PostgreSQL: whole batches in one statement, no per-message ORM objects.

The ORM paths in publishing.py and delivery.py say what each operation does and serve SQLite;
these functions do the same thing on PostgreSQL in fewer round trips and far less Python. The
broker's tests run on both databases, so each fast path is checked against the same contract.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from django.db import connection

from messaging import events, filters
from messaging.broker.common import OutgoingMessage, Store

# One statement inserts the messages and their deliveries. The batch travels as ONE json
# parameter that PostgreSQL unpacks in C (json_to_recordset): binding arrays instead made psycopg
# quote every element in Python, a fifth of a 100-message publish's CPU. Each row carries the
# queue ids it is routed to (q), so one row can become several deliveries (a topic's fan-out).
# Message ids come from the identity sequence in the order the rows are inserted (ORDER BY ord),
# so numbering the returned ids gives each input row its id (Django's bulk_create relies on the
# same ordering). Data-modifying CTEs always run to completion, whether the final SELECT reads
# them or not.
_PUBLISH_SQL = """
WITH u AS (
  SELECT * FROM ROWS FROM (
    json_to_recordset(%(batch)s::json) AS (b text, ct text, h jsonb, p smallint, d float8, t float8, q bigint[])
  ) WITH ORDINALITY AS u(b, ct, h, p, d, t, q, ord)
), m AS (
  INSERT INTO {message} (body, content_type, headers, priority, dedup_id, destination, published_at, expires_at)
  SELECT u.b, u.ct, u.h, u.p, '', %(destination)s, %(now)s, %(now)s + make_interval(secs => u.t)
  FROM u ORDER BY u.ord
  RETURNING id, expires_at
), n AS (
  SELECT id, expires_at, row_number() OVER (ORDER BY id) AS ord FROM m
), d AS (
  INSERT INTO {delivery} (message_id, queue_id, state, priority, visible_at, expires_at, delivery_count,
                          lease_token, transaction_id, dead_letter_reason)
  SELECT n.id, target.q, %(state)s, u.p, %(now)s + make_interval(secs => u.d), n.expires_at, 0, '',
         %(transaction)s, ''
  FROM u JOIN n ON n.ord = u.ord CROSS JOIN LATERAL unnest(u.q) AS target(q)
), notified AS MATERIALIZED (
  SELECT pg_notify(%(channel)s, %(notify)s) WHERE %(notify)s::text <> ''
)
SELECT n.id FROM n LEFT JOIN notified ON true ORDER BY n.ord
"""


def insert_messages(
    *,
    store: Store,
    destination: str,
    targets: Sequence[Any],
    messages: Sequence[OutgoingMessage],
    state: int,
    transaction_id: str | None,
    now: datetime,
) -> tuple[list[int], Counter[int]]:
    """Insert `messages` (all new: no dedup ids) and their deliveries to the matching `targets`.
    Returns the message pks in input order and the number of deliveries per queue pk."""
    routed: Counter[int] = Counter()
    unfiltered = [t.pk for t in targets if t.filter is None]
    filtered = [t for t in targets if t.filter is not None]
    batch = []
    for msg in messages:
        queues = unfiltered + [t.pk for t in filtered if filters.matches(t.filter, msg.headers)]
        routed.update(queues)
        batch.append(
            {"b": msg.body, "ct": msg.content_type, "h": msg.headers, "p": msg.priority,
             "d": msg.delay_seconds, "t": msg.ttl_seconds or None, "q": queues}
        )  # fmt: skip
    sql = _PUBLISH_SQL.format(message=store.message._meta.db_table, delivery=store.delivery._meta.db_table)
    # Outside a messaging transaction the waiting consumers of every process are notified by
    # this same statement, delivered by PostgreSQL when it commits (messaging/events.py).
    notify = events.payload(routed) if transaction_id is None else ""
    params = {
        "batch": json.dumps(batch, separators=(",", ":")), "destination": destination, "now": now,
        "state": state, "transaction": transaction_id, "channel": events.CHANNEL, "notify": notify,
    }  # fmt: skip
    with server_cursor() as cursor:
        cursor.execute(sql, params)
        pks = [row[0] for row in cursor.fetchall()]
    return pks, routed


@contextmanager
def server_cursor() -> Iterator[psycopg.Cursor[Any]]:
    """A server-side-binding cursor on Django's connection (inside its transaction). Django's own
    cursors bind on the client: they quote every element of these 100-element arrays into the
    SQL text in Python, a tenth of a publish's CPU. Here parameters travel apart from the SQL,
    and psycopg prepares a statement it has run a few times on this connection. Errors come out
    as Django's (OperationalError: 503 with Retry-After), and a broken connection is dropped,
    exactly as from Django's cursors."""
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


# --------------------------------------------------------------------------- receive

# Lock the best `limit` deliverable rows of each store (skipping rows other consumers hold).
_CHOOSE_SQL = """
WITH d AS (
  SELECT id, priority, visible_at FROM {durable}
  WHERE queue_id = %s AND state = 1 AND visible_at <= %s AND (expires_at IS NULL OR expires_at > %s)
  ORDER BY priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED
), t AS (
  SELECT id, priority, visible_at FROM {transient}
  WHERE queue_id = %s AND state = 1 AND visible_at <= %s AND (expires_at IS NULL OR expires_at > %s)
  ORDER BY priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED
)
SELECT 0, id, priority, visible_at FROM d UNION ALL SELECT 1, id, priority, visible_at FROM t
"""

# Lease the chosen rows of one store and read them with their messages, in one round trip.
_LEASE_SQL = """
WITH u AS (
  UPDATE {delivery} SET state = 2, visible_at = %s, lease_token = %s, delivery_count = delivery_count + 1
  WHERE id = ANY(%s)
  RETURNING id, message_id, delivery_count, lease_token, dead_letter_reason, origin_queue_id
)
SELECT u.id, u.delivery_count, u.lease_token, u.dead_letter_reason, u.origin_queue_id,
       m.id, m.body, m.content_type, m.headers, m.priority, m.published_at, m.expires_at
FROM u JOIN {message} m ON m.id = u.message_id
"""

LeasedRow = tuple[int, int, str, str, "int | None", int, str, str, Any, int, datetime, "datetime | None"]


def choose(
    *, stores: Sequence[Store], queue_id: int, limit: int, now: datetime
) -> list[tuple[int, int, int, datetime]]:
    """Lock up to `limit` deliverable rows per store: (store index, pk, priority, visible_at)."""
    durable, transient = stores
    sql = _CHOOSE_SQL.format(durable=durable.delivery._meta.db_table, transient=transient.delivery._meta.db_table)
    with server_cursor() as cursor:
        cursor.execute(sql, [queue_id, now, now, limit] * 2)
        return [(int(s), int(pk), int(p), v) for s, pk, p, v in cursor.fetchall()]


def lease(*, store: Store, ids: list[int], deadline: datetime, token: str) -> list[LeasedRow]:
    """Lease rows already locked by `choose`; each row with its message's columns."""
    sql = _LEASE_SQL.format(delivery=store.delivery._meta.db_table, message=store.message._meta.db_table)
    with server_cursor() as cursor:
        cursor.execute(sql, [deadline, token, ids])
        rows: list[LeasedRow] = cursor.fetchall()
    return rows


def json_value(value: Any) -> Any:
    """A jsonb column as psycopg hands it over through Django (text, or already decoded)."""
    return json.loads(value) if isinstance(value, str | bytes) else value
