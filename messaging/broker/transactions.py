"""Transactions: staged publishes and acks, two-phase prepare, commit, rollback."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from messaging import clock, conf, events
from messaging.broker.common import STORES, _lock_transaction, _may_use, _user_or_none, atomic
from messaging.broker.delivery import _delete_deliveries, _return_to_queue
from messaging.exceptions import (
    InvalidRequest,
    TransactionNotFound,
)
from messaging.models import (
    DedupRecord,
    Queue,
    State,
    Transaction,
    TxState,
)

# --------------------------------------------------------------------------- transactions


def begin(*, user: Any = None) -> Transaction:
    now = clock.now()
    return Transaction.objects.create(
        id=secrets.token_hex(16), owner=_user_or_none(user), state=TxState.OPEN, created_at=now, last_activity_at=now
    )


def get_transaction(*, transaction_id: str, user: Any = None) -> Transaction:
    txn = Transaction.objects.filter(pk=str(transaction_id)[:40]).first()
    if txn is None or not _may_use(txn, user):
        raise TransactionNotFound(f"Transaction {str(transaction_id)[:40]!r} does not exist.")
    return txn


def prepare(*, transaction_id: str, user: Any = None) -> Transaction:
    """Phase one: the staged work is already in the database; from now on it survives restarts
    and timeouts until commit or rollback (listed by list_transactions(state="prepared"))."""
    with atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED))
        if txn.state == TxState.OPEN:
            txn.state = TxState.PREPARED
            txn.prepared_at = clock.now()
            txn.save(update_fields=["state", "prepared_at"])
        return txn


def commit(*, transaction_id: str, user: Any = None) -> Transaction:
    """Apply all staged publishes and acks at once. Committing again answers the same."""
    retention = timedelta(seconds=conf.get().ack_retention_seconds)
    with atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED, TxState.COMMITTED))
        if txn.state == TxState.COMMITTED:
            return txn
        now = clock.now()
        touched: set[int] = set()
        for store in STORES:
            staged = store.deliveries().filter(transaction_id=txn.pk)
            touched |= set(staged.filter(state=State.STAGED).values_list("queue_id", flat=True).distinct())
            staged.filter(state=State.STAGED).update(state=State.READY, transaction_id=None)
            staged.filter(state=State.LEASED).update(state=State.ACKED, visible_at=now + retention, transaction_id=None)
        _finish(txn, TxState.COMMITTED, now)
        events.notify_on_commit(touched)
        return txn


def rollback(*, transaction_id: str, user: Any = None) -> Transaction:
    """Discard staged publishes (and their dedup records) and release the transaction's acked
    messages for redelivery. Rolling back again answers the same."""
    with atomic():
        txn = _lock_transaction(transaction_id, user=user, states=(TxState.OPEN, TxState.PREPARED, TxState.ROLLED_BACK))
        if txn.state == TxState.ROLLED_BACK:
            return txn
        _rollback_locked(txn)
        return txn


def _rollback_locked(txn: Transaction) -> None:
    now = clock.now()
    for store in STORES:
        staged = store.deliveries().filter(transaction_id=txn.pk, state=State.STAGED)
        message_ids = list(staged.values_list("message_id", flat=True).distinct())
        if message_ids:
            public = [store.public_id(pk) for pk in message_ids]
            DedupRecord.objects.filter(message_id__in=public).delete()
            _delete_deliveries(store, staged)
        acked = store.deliveries().filter(transaction_id=txn.pk, state=State.LEASED)
        by_queue: dict[int, list[int]] = {}
        for pk, queue_id in acked.order_by("id").values_list("id", "queue_id"):
            by_queue.setdefault(queue_id, []).append(pk)
        for queue_id, ids in by_queue.items():
            queue = Queue.objects.get(pk=queue_id)
            _return_to_queue(store, queue, ids, visible_at=now, reason="max_deliveries")
    _finish(txn, TxState.ROLLED_BACK, now)


def _finish(txn: Transaction, state: str, now: datetime) -> None:
    txn.state = state
    txn.finished_at = now
    txn.save(update_fields=["state", "finished_at"])


def list_transactions(*, state: str | None = None, user: Any = None) -> list[Transaction]:
    if state is not None and state not in TxState.values:
        raise InvalidRequest(f"state is one of {', '.join(TxState.values)}.")
    qs = Transaction.objects.order_by("created_at")
    if state is not None:
        qs = qs.filter(state=state)
    if user is not None and not getattr(user, "is_superuser", False):
        qs = qs.filter(owner=user)
    return list(qs[:1000])
