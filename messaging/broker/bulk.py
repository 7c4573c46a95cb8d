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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from django.db import connection

from messaging import events, filters, jsontext
from messaging.broker.common import OutgoingMessage, Store
from messaging.models import Delivery, State, TransientDelivery

# One statement inserts the messages and their deliveries. The batch travels as ONE json
# parameter that PostgreSQL unpacks in C (json_to_recordset): binding arrays instead made psycopg
# quote every element in Python, a fifth of a 100-message publish's CPU. Each row carries the
# queue ids it is routed to (q), so one row can become several deliveries (a topic's fan-out).
# Message ids come from the identity sequence in the order the rows are inserted (ORDER BY ord),
# so numbering the returned ids gives each input row its id (Django's bulk_create relies on the
# same ordering). Ids taken in advance (`i`, messaging/write_behind.py) are inserted as given and
# matched by value instead. Data-modifying CTEs always run to completion, whether the final
# SELECT reads them or not. A row leaves out the fields that have their usual value (no content
# type, no headers, no delay, no TTL, routed to every unfiltered target): unpacking a field costs
# PostgreSQL a conversion per row, and leaving them out took json_to_recordset from 10 to 4 ms
# for 2,000 messages, a seventh of the statement (docs/performance.md).
# The statement is prepared, and runs on its generic plan: parsing and planning it took ~0.5 ms
# of PostgreSQL's time per call, half of a one-message round (docs/performance.md, item 23).
_PUBLISH_SQL = """
WITH r AS (
  SELECT * FROM ROWS FROM (
    json_to_recordset(%(batch)s::json) AS (b text, ct text, h jsonb, p smallint, d float8, t float8, q bigint[],
                                           i bigint, l bigint[])
  ) WITH ORDINALITY AS r(b, ct, h, p, d, t, q, i, l, ord)
), u AS (
  SELECT r.b, COALESCE(r.ct, '') AS ct, COALESCE(r.h, '{{}}') AS h, r.p, COALESCE(r.d, 0) AS d, r.t,
         COALESCE(r.q, %(unfiltered)s::bigint[]) AS q, r.i, r.l, r.ord
  FROM r
), m AS (
  INSERT INTO {message} ({id_column}body, content_type, headers, priority, dedup_id, destination, published_at,
                         expires_at)
  SELECT {id_value}u.b, u.ct, u.h, u.p, '', %(destination)s, %(now)s, %(now)s + make_interval(secs => u.t)
  FROM u ORDER BY u.ord
  RETURNING id, expires_at
), n AS (
  {numbered}
), d AS (
  INSERT INTO {delivery} (message_id, queue_id, state, priority, visible_at, expires_at, delivery_count,
                          lease_token, transaction_id, dead_letter_reason)
  SELECT n.id, target.q, {state}, u.p, {visible_at}, n.expires_at, {delivery_count}, {lease_token},
         %(transaction)s, ''
  FROM u JOIN n ON n.ord = u.ord CROSS JOIN LATERAL unnest(u.q) AS target(q)
  {returning}
), notified AS MATERIALIZED (
  SELECT pg_notify(%(channel)s, %(notify)s) WHERE %(notify)s::text <> ''
)
{result}
"""

_SEQUENCE_IDS = {
    "id_column": "", "id_value": "",
    "numbered": "SELECT id, expires_at, row_number() OVER (ORDER BY id) AS ord FROM m",
}  # fmt: skip
_GIVEN_IDS = {
    "id_column": "id, ", "id_value": "u.i, ",
    "numbered": "SELECT m.id, m.expires_at, u.ord FROM m JOIN u ON u.i = m.id",
}  # fmt: skip
_READY = {
    "state": "%(state)s", "visible_at": "%(now)s + make_interval(secs => u.d)", "delivery_count": "0",
    "lease_token": "''", "returning": "",
    "result": "SELECT n.id FROM n LEFT JOIN notified ON true ORDER BY n.ord",
}  # fmt: skip
# Deliveries to a queue named in the row's `l` are inserted leased, to a push consumer of this
# process waiting on that queue (LeaseAtInsert). The result then has two kinds of rows: (0,
# message pk, ord) for every message, in order, and (1, delivery pk, message pk, queue pk,
# expires_at) for every delivery leased.
_LEASED_HERE = "target.q = ANY(u.l)"
# ... and (2, queue pk) for each of those queues that holds an expired lease (in either store),
# which a claim must return first: the pusher is told to look (a hand-off's claim is gated on
# the same test, bulk.claim).
_EXPIRED_LEASE = (
    "SELECT 1 FROM {table} WHERE queue_id = lq.q AND state = "
    + str(State.LEASED.value)
    + " AND visible_at <= %(now)s AND transaction_id IS NULL"
)
_LEASING = {
    "state": f"CASE WHEN {_LEASED_HERE} THEN {State.LEASED.value} ELSE %(state)s END",
    "visible_at": f"CASE WHEN {_LEASED_HERE} THEN %(now)s + make_interval(secs => (%(visibility)s::jsonb"
                  " ->> target.q::text)::float8) ELSE %(now)s + make_interval(secs => u.d) END",
    "delivery_count": f"CASE WHEN {_LEASED_HERE} THEN 1 ELSE 0 END",
    "lease_token": f"CASE WHEN {_LEASED_HERE} THEN %(token)s ELSE '' END",
    "returning": "RETURNING id, message_id, queue_id, state, expires_at",
    "result": "SELECT 0, n.id, n.ord, NULL::bigint, NULL::timestamptz FROM n LEFT JOIN notified ON true"
              f" UNION ALL SELECT 1, d.id, d.message_id, d.queue_id, d.expires_at FROM d"
              f" WHERE d.state = {State.LEASED.value}"
              " UNION ALL SELECT 2, lq.q, NULL, NULL, NULL FROM unnest(%(lease_queues)s::bigint[]) AS lq(q)"
              f" WHERE EXISTS ({_EXPIRED_LEASE.format(table=Delivery._meta.db_table)})"
              f" OR EXISTS ({_EXPIRED_LEASE.format(table=TransientDelivery._meta.db_table)})"
              " ORDER BY 1, 3",
}  # fmt: skip


@dataclass(frozen=True)
class LeaseAtInsert:
    """Deliveries to lease as they are inserted (a waiting push consumer's, messaging/push.py):
    `rows` maps a message's index in the batch to the queue pks it is leased to; the lease of
    queue pk q lasts `visibility[q]` seconds and is held with `token`."""

    rows: dict[int, list[int]]
    visibility: dict[int, int]
    token: str

    @property
    def queues(self) -> list[int]:
        return sorted(self.visibility)


# A delivery leased at insert: (delivery pk, the message's index in the batch, queue pk, expires_at).
LeasedAtInsert = tuple[int, int, int, "datetime | None"]


@dataclass
class Inserted:
    pks: list[int]  # the message pks, in input order
    routed: Counter[int]  # deliveries per queue pk
    leased: list[LeasedAtInsert]
    expired_leases: set[int]  # queues leased to that hold an expired lease to return


def insert_messages(
    *,
    store: Store,
    destination: str,
    targets: Sequence[Any],
    messages: Sequence[OutgoingMessage],
    state: int,
    transaction_id: str | None,
    now: datetime,
    ids: Sequence[int] | None = None,
    lease: LeaseAtInsert | None = None,
) -> Inserted:
    """Insert `messages` (all new: no dedup ids) and their deliveries to the matching `targets`,
    under the pks `ids` when given, leasing those `lease` names."""
    unfiltered = [t.pk for t in targets if t.filter is None]
    filtered = [t for t in targets if t.filter is not None]
    routed: Counter[int] = Counter({pk: len(messages) for pk in unfiltered})
    leasing = lease is not None and bool(lease.rows)
    batch = []
    for i, msg in enumerate(messages):
        queues = unfiltered
        if filtered:  # counted one by one only where a filter decides
            matched = [t.pk for t in filtered if filters.matches(t.filter, msg.headers)]
            routed.update(matched)
            queues = unfiltered + matched
        row = {"b": msg.body, "p": msg.priority}
        if msg.content_type:
            row["ct"] = msg.content_type
        if msg.headers:
            row["h"] = msg.headers
        if msg.delay_seconds:
            row["d"] = msg.delay_seconds
        if msg.ttl_seconds:
            row["t"] = msg.ttl_seconds
        if queues != unfiltered:
            row["q"] = queues
        if ids is not None:
            row["i"] = ids[i]
        if leasing and i in lease.rows:  # type: ignore[union-attr]
            row["l"] = lease.rows[i]  # type: ignore[union-attr]
        batch.append(row)
    sql = _PUBLISH_SQL.format(
        message=store.message._meta.db_table, delivery=store.delivery._meta.db_table,
        **(_GIVEN_IDS if ids is not None else _SEQUENCE_IDS), **(_LEASING if leasing else _READY),
    )  # fmt: skip
    # Outside a messaging transaction the waiting consumers of every process are notified by
    # this same statement, delivered by PostgreSQL when it commits (messaging/events.py), of
    # the queues it leaves something ready in: deliveries leased at insert are nobody else's,
    # and a notification of them would wake every listener (this process's own too) for
    # nothing, a third of a millisecond of a message's latency (docs/performance.md item 24).
    ready = routed
    if lease is not None:
        ready = routed - Counter(q for queues in lease.rows.values() for q in queues)
    notify = events.payload(ready) if transaction_id is None else ""
    params = {
        "batch": jsontext.dumps(batch), "unfiltered": unfiltered, "destination": destination,
        "now": now, "state": state, "transaction": transaction_id, "channel": events.CHANNEL, "notify": notify,
    }  # fmt: skip
    if not leasing:
        with server_cursor() as cursor:
            cursor.execute(sql, params, prepare=True)
            pks = [row[0] for row in cursor.fetchall()]
        return Inserted(pks, routed, [], set())
    assert lease is not None
    params.update(
        visibility=json.dumps({str(q): s for q, s in lease.visibility.items()}), token=lease.token,
        lease_queues=lease.queues,
    )  # fmt: skip
    with server_cursor() as cursor:
        cursor.execute(sql, params, binary=True, prepare=True)  # binary: expires_at (see server_cursor)
        rows = cursor.fetchall()
    pks = [row[1] for row in rows if row[0] == 0]
    index_of = {pk: i for i, pk in enumerate(pks)}
    leased = [(row[1], index_of[row[2]], row[3], row[4]) for row in rows if row[0] == 1]
    return Inserted(pks, routed, leased, {row[1] for row in rows if row[0] == 2})


# Statements that return timestamps ask for binary results (`execute(..., binary=True)`): Django
# registers a text loader for timestamptz written in Python (it subclasses psycopg's Python
# loader, bypassing the C one), and parsing the timestamps of 100 leased or acked rows that way
# was a quarter of a receive's and an ack's time. Binary timestamptz and jsonb come back through
# psycopg's own loaders: aware datetimes in the connection's time zone (UTC) and decoded JSON.
@contextmanager
def server_cursor() -> Iterator[psycopg.Cursor[Any]]:
    """A server-side-binding cursor on Django's connection (inside its transaction). Django's own
    cursors bind on the client: they quote every element of these 100-element arrays into the
    SQL text in Python, a tenth of a publish's CPU. Here parameters travel apart from the SQL.
    A statement is prepared where its execute says `prepare=True` (pegasus_site/settings.py
    makes that work, and runs prepared statements on their generic plan). Errors come out
    as Django's (OperationalError: 503 with Retry-After), and a broken connection is dropped,
    exactly as from Django's cursors."""
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


# --------------------------------------------------------------------------- receive

LeasedRow = tuple[int, int, str, str, "int | None", int, str, str, Any, int, datetime, "datetime | None"]


# choose + lease in ONE statement: lock the best `limit` deliverable rows of each store (skipping
# rows other consumers hold), keep the best `limit` across both (priority, then visible_at,
# durable first, then id: the order _choose sorts by), lease them and read their messages.
#
# The claim is gated on the queue having no expired leases (the `gate` CTE): those must go back
# to the queue (or to the dead-letter queue) before anything is chosen, and that takes Python
# (delivery._return_to_queue). When one exists, the statement claims nothing and returns a single
# row with s = -1; the caller returns the leases and claims again without the gate. Folding the
# check in saves receive a round trip on every call, when leases almost never expired.
#
# Each UPDATE joins `chosen` in its FROM and returns the chosen row's sort keys with the leased
# row. Joining `chosen` back after the update instead made PostgreSQL compare every leased row
# with every chosen one (it expects one row from a CTE, so it picks a nested loop): 9,900
# comparisons for a claim of 100, a quarter of the statement (docs/performance.md, item 26).
_CLAIM_SQL = """
WITH gate AS (
  SELECT {gated} AND (
    EXISTS (SELECT 1 FROM {durable} WHERE queue_id = %(queue)s AND state = {leased} AND visible_at <= %(now)s
            AND transaction_id IS NULL)
    OR EXISTS (SELECT 1 FROM {transient} WHERE queue_id = %(queue)s AND state = {leased} AND visible_at <= %(now)s
               AND transaction_id IS NULL)
  ) AS closed
), d AS (
  SELECT 0 AS s, id, priority, visible_at FROM {durable}
  WHERE queue_id = %(queue)s AND state = {ready} AND visible_at <= %(now)s
    AND (expires_at IS NULL OR expires_at > %(now)s) AND NOT (SELECT closed FROM gate)
  ORDER BY priority DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), t AS (
  SELECT 1 AS s, id, priority, visible_at FROM {transient}
  WHERE queue_id = %(queue)s AND state = {ready} AND visible_at <= %(now)s
    AND (expires_at IS NULL OR expires_at > %(now)s) AND NOT (SELECT closed FROM gate)
  ORDER BY priority DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), chosen AS (
  SELECT * FROM (SELECT * FROM d UNION ALL SELECT * FROM t) AS c
  ORDER BY priority DESC, visible_at, s, id LIMIT %(limit)s
), ud AS (
  UPDATE {durable} AS target SET state = {leased}, visible_at = %(deadline)s, lease_token = %(token)s,
                                 delivery_count = target.delivery_count + 1
  FROM chosen c WHERE c.s = 0 AND target.id = c.id
  RETURNING target.id, target.message_id, target.delivery_count, target.lease_token, target.dead_letter_reason,
            target.origin_queue_id, c.priority, c.visible_at
), ut AS (
  UPDATE {transient} AS target SET state = {leased}, visible_at = %(deadline)s, lease_token = %(token)s,
                                   delivery_count = target.delivery_count + 1
  FROM chosen c WHERE c.s = 1 AND target.id = c.id
  RETURNING target.id, target.message_id, target.delivery_count, target.lease_token, target.dead_letter_reason,
            target.origin_queue_id, c.priority, c.visible_at
)
SELECT 0 AS s, u.id AS delivery, u.delivery_count, u.lease_token, u.dead_letter_reason, u.origin_queue_id,
       m.id, m.body, m.content_type, m.headers, m.priority, m.published_at, m.expires_at,
       u.priority AS chosen_priority, u.visible_at AS chosen_visible_at
FROM ud u JOIN {durable_message} m ON m.id = u.message_id
UNION ALL
SELECT 1, u.id, u.delivery_count, u.lease_token, u.dead_letter_reason, u.origin_queue_id,
       m.id, m.body, m.content_type, m.headers, m.priority, m.published_at, m.expires_at,
       u.priority, u.visible_at
FROM ut u JOIN {transient_message} m ON m.id = u.message_id
UNION ALL
SELECT -1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM gate WHERE closed
ORDER BY chosen_priority DESC, chosen_visible_at, s, delivery
"""


def claim(
    *, stores: Sequence[Store], queue_id: int, limit: int, now: datetime, deadline: datetime, token: str, gated: bool
) -> list[tuple[int, LeasedRow]] | None:
    """Choose and lease up to `limit` messages of the queue in one round trip: (store index,
    the row `lease` would give) in delivery order. With `gated`, None (and nothing claimed) if
    the queue has an expired lease to return first."""
    durable, transient = stores
    sql = _CLAIM_SQL.format(
        durable=durable.delivery._meta.db_table, transient=transient.delivery._meta.db_table,
        durable_message=durable.message._meta.db_table, transient_message=transient.message._meta.db_table,
        gated="true" if gated else "false", ready=State.READY.value, leased=State.LEASED.value,
    )  # fmt: skip
    params = {"queue": queue_id, "now": now, "limit": limit, "deadline": deadline, "token": token}
    with server_cursor() as cursor:
        # Prepared: a statement bound on the server runs on the generic plan whether prepared or
        # not (plan_cache_mode, pegasus_site/settings.py), so preparing it only saves parsing and
        # planning it at every call: 0.8-1.0 ms of a claim of 50 or 100 (docs/performance.md,
        # item 26).
        cursor.execute(sql, params, binary=True, prepare=True)
        rows = cursor.fetchall()
    if rows and rows[0][0] == -1:
        return None
    return [(int(row[0]), tuple(row[1:13])) for row in rows]


# --------------------------------------------------------------------------- ack

# Lock the rows the receipts name (in id order) and ack those whose lease the receipt holds, in
# ONE statement; it returns every locked row as it was before the ack, which is what the caller
# decides each receipt's status on (delivery._holds_lease is the same test in Python).
#
# Each receipt's token is paired with its row where the row is found, by the primary key. The
# statement runs on a generic plan (pegasus_site/settings.py), which expects ten rows from the
# receipts' arrays; matching the tokens to the locked rows in a join of their own made it compare
# every receipt with every row: a million comparisons for an ack of 1,000, which took 155 ms
# (21 ms now; docs/performance.md, item 26).
_ACK_SQL = """
WITH held AS (
  SELECT d.id, d.state, d.lease_token, d.transaction_id, d.visible_at, d.queue_id, r.token
  FROM unnest(%(ids)s::bigint[], %(tokens)s::text[]) AS r(id, token) JOIN {table} AS d ON d.id = r.id
  ORDER BY d.id FOR UPDATE OF d
), acked AS (
  UPDATE {table} AS target SET state = {acked}, visible_at = %(retain_until)s
  FROM held
  WHERE target.id = held.id AND held.state = {leased} AND held.lease_token = held.token
    AND held.transaction_id IS NULL AND held.visible_at > %(now)s
)
SELECT id, state, lease_token, transaction_id, visible_at, queue_id FROM held
"""


def ack(
    *, store: Store, receipts: Sequence[tuple[int, str]], now: datetime, retain_until: datetime
) -> list[tuple[int, int, str, str | None, datetime, int]]:
    """Ack the (pk, lease token) pairs of `store` that hold their lease; returns the rows as they
    were, locked."""
    sql = _ACK_SQL.format(table=store.delivery._meta.db_table, acked=State.ACKED.value, leased=State.LEASED.value)
    params = {
        "ids": [pk for pk, _ in receipts], "tokens": [token for _, token in receipts],
        "now": now, "retain_until": retain_until,
    }  # fmt: skip
    with server_cursor() as cursor:
        cursor.execute(sql, params, binary=True, prepare=True)  # planning was a third of a small ack
        return cursor.fetchall()


def json_value(value: Any) -> Any:
    """A jsonb column as psycopg hands it over through Django (text, or already decoded)."""
    return json.loads(value) if isinstance(value, str | bytes) else value
