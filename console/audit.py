"""The audit log: every operator action, who, what, when and how many messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django.db import transaction

from console.models import AuditEntry
from messaging import clock
from messaging.exceptions import BrokerError

T = TypeVar("T")


def record(
    *,
    user: Any,
    action: str,
    target: str = "",
    messages: int | None = None,
    outcome: str = "ok",
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    return AuditEntry.objects.create(
        at=clock.now(),
        user=user if getattr(user, "pk", None) is not None else None,
        username=getattr(user, "username", "") or "",
        action=action,
        target=target[:420],
        messages=messages,
        outcome=outcome[:40],
        details=details or {},
    )


def audited(
    *,
    user: Any,
    action: str,
    target: str,
    operation: Callable[[], T],
    count: Callable[[T], int | None] = lambda _: None,
    details: dict[str, Any] | None = None,
) -> T:
    """Run one broker operation and record it in the same database transaction, so the log
    holds exactly the actions that happened. A refused operation (BrokerError) is logged too,
    with its error code, and re-raised."""
    try:
        with transaction.atomic():
            result = operation()
            record(user=user, action=action, target=target, messages=count(result), details=details)
    except BrokerError as error:
        record(user=user, action=action, target=target, outcome=error.code, details=details)
        raise
    return result
