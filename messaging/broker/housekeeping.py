"""Housekeeping that no request does on the way: idle transactions, expired subscriptions, old rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from messaging import clock, conf
from messaging.broker.common import STORES, atomic
from messaging.broker.consumers import unregister_consumers
from messaging.broker.delivery import _delete_deliveries
from messaging.broker.destinations import delete_queue
from messaging.broker.transactions import _rollback_locked
from messaging.models import (
    DedupRecord,
    Queue,
    State,
    Transaction,
    TxState,
)

# --------------------------------------------------------------------------- housekeeping


@dataclass
class MaintenanceReport:
    transactions_rolled_back: int = 0
    subscriptions_expired: int = 0
    acked_removed: int = 0
    dedup_removed: int = 0
    transactions_removed: int = 0


def run_maintenance(*, batch: int = 10_000) -> MaintenanceReport:
    """One round of housekeeping. Safe to run from several processes at once."""
    report = MaintenanceReport()
    limits = conf.get()
    now = clock.now()
    idle_before = now - timedelta(seconds=limits.transaction_timeout_seconds)
    for txn_id in Transaction.objects.filter(state=TxState.OPEN, last_activity_at__lt=idle_before).values_list(
        "pk", flat=True
    )[:100]:
        with atomic():
            txn = Transaction.objects.select_for_update(skip_locked=True).filter(pk=txn_id).first()
            if txn is not None and txn.state == TxState.OPEN and txn.last_activity_at < idle_before:
                _rollback_locked(txn)
                report.transactions_rolled_back += 1
    for sub in Queue.objects.filter(topic__isnull=False, durable=False, expires_at__lte=now)[:100]:
        delete_queue(queue=sub)
        report.subscriptions_expired += 1
    for store in STORES:
        with atomic():
            report.acked_removed += _delete_deliveries(
                store, store.deliveries().filter(state=State.ACKED, visible_at__lte=now)
            )
    longest = max(
        [limits.default_dedup_window_seconds, *Queue.objects.values_list("dedup_window_seconds", flat=True)[:10000]]
    )
    report.dedup_removed, _ = DedupRecord.objects.filter(created_at__lt=now - timedelta(seconds=longest)).delete()
    report.transactions_removed, _ = Transaction.objects.filter(
        state__in=[TxState.COMMITTED, TxState.ROLLED_BACK], finished_at__lt=now - timedelta(hours=1)
    ).delete()
    # Live consumers left by a server process that died (connected ones refresh every few seconds).
    unregister_consumers(stale_before=now - timedelta(minutes=10))
    return report
