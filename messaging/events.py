"""Live events: tell waiting consumers that a queue may have new messages, after commit.

On PostgreSQL, `pg_notify` inside the transaction is delivered to every server process's
listener (messaging/listener.py) exactly when the transaction commits, and never if it rolls
back. In this process the doorbell is rung by an on_commit callback as well, so a local waiter
does not depend on the listener at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import connection, transaction

from messaging.doorbell import doorbell

CHANNEL = "pegasus_queues"


def notify_on_commit(queue_ids: Iterable[int]) -> None:
    ids = sorted(set(queue_ids))
    if not ids:
        return
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, ",".join(map(str, ids))])
    transaction.on_commit(lambda: doorbell.ring(ids))
