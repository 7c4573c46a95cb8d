"""Live events: tell waiting consumers that a queue may have new messages, after commit.

On PostgreSQL, `pg_notify` inside the transaction is delivered to every server process's
listener (messaging/listener.py) exactly when the transaction commits, and never if it rolls
back. In this process the doorbell is rung by an on_commit callback as well, so a local waiter
does not depend on the listener at all, and a WebSocket pusher waiting on the queue has its
messages claimed inside the transaction itself and pushed the moment it commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connection, transaction

from messaging.doorbell import doorbell

CHANNEL = "pegasus_queues"


# PostgreSQL backend pids of this process's connections that have sent notifications. The
# listener skips notifications from them: this process rang its own doorbell when it committed
# (on_commit below), and a second ring would only make its pushers look again for nothing.
# (A pid PostgreSQL reuses for another process's connection would make this process miss that
# ring: its waiters then look at their next recheck, within a second; nothing is lost.)
_own_backends: set[int] = set()


def remember_sender() -> None:
    """This connection sends notifications from this process (PostgreSQL)."""
    if connection.vendor == "postgresql" and connection.connection is not None:
        if len(_own_backends) > 1000:  # connections come and go: forget old pids now and then
            _own_backends.clear()
        _own_backends.add(connection.connection.info.backend_pid)


def sent_here(pid: int) -> bool:
    return pid in _own_backends


def payload(queue_ids: Iterable[int]) -> str:
    """The notification's text: the queue ids, sorted, comma-separated (messaging/listener.py)."""
    return ",".join(map(str, sorted(set(queue_ids))))


def notify_on_commit(queue_ids: Iterable[int], *, pg_notified: bool = False, served: Iterable[Any] = ()) -> None:
    """`pg_notified`: the caller's own statement already ran pg_notify(CHANNEL, payload(ids))
    in this transaction (the bulk publish does: a round trip fewer per publish). `served`:
    pushers this transaction already leased messages to (broker.publishing), not rung."""
    ids = sorted(set(queue_ids))
    if not ids:
        return
    if connection.vendor == "postgresql":
        if not pg_notified:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload(ids)])
        remember_sender()
    # A push consumer of this process waiting on one of these queues gets its messages claimed
    # in this transaction and pushed when it commits (messaging/push.py, hand_off); the ring
    # would only make it look again for nothing.
    from messaging.push import hand_off

    bells = {p.bell for p in (*served, *hand_off(ids)) if p.bell is not None}
    transaction.on_commit(lambda: doorbell.ring(ids, skip=bells))
