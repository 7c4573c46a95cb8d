"""Managing bridges: create, update, delete, look up, and the status shown to operators.

The console and the REST API both call these; neither validates on its own. Permission checks
(admins only) happen in the interfaces through messaging.access before calling here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction

from messaging import broker, clock, queries
from messaging.bridges import conf
from messaging.bridges.exceptions import BridgeNameTaken, BridgeNotFound, InvalidSource
from messaging.bridges.models import Bridge, BridgeState, LinkStatus, TargetKind
from messaging.exceptions import InvalidRequest, NotFound
from messaging.models import Queue

MAX_BATCH_SIZE = 1000
# Fields an update may change; anything else is fixed at creation.
EDITABLE = ("source_topic", "source_name", "target_url", "target_kind", "target_name", "target_token",
            "batch_size", "enabled")  # fmt: skip


def create_bridge(
    *,
    name: str,
    source_name: str,
    target_url: str,
    target_name: str,
    target_token: str,
    source_topic: str = "",
    target_kind: str = TargetKind.QUEUE,
    batch_size: int = 100,
    enabled: bool = True,
) -> Bridge:
    """Validate and store a new bridge; its runner picks it up within PEGASUS_BRIDGES SCAN_SECONDS."""
    broker.validate_name(name)
    bridge = Bridge(name=name)
    _apply(bridge, {
        "source_topic": source_topic, "source_name": source_name, "target_url": target_url,
        "target_kind": target_kind, "target_name": target_name, "target_token": target_token,
        "batch_size": batch_size, "enabled": enabled,
    })  # fmt: skip
    try:
        with transaction.atomic():
            bridge.save()
            BridgeState.objects.create(bridge=bridge)
    except IntegrityError:
        raise BridgeNameTaken(f"Bridge {name!r} exists.") from None
    return bridge


def update_bridge(*, bridge: Bridge, changes: dict[str, Any]) -> Bridge:
    """Change some fields (EDITABLE). A blank or missing target_token keeps the stored one."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise InvalidRequest(f"Cannot change {', '.join(sorted(unknown))}.")
    if not changes.get("target_token"):
        changes = {k: v for k, v in changes.items() if k != "target_token"}
    if changes == {"enabled": False}:
        # Stopping always works, even when the source is gone or the target no longer allowed.
        bridge.enabled = False
    else:
        _apply(bridge, {**{f: getattr(bridge, f) for f in EDITABLE}, **changes})
    bridge.save()
    return bridge


def delete_bridge(*, bridge: Bridge) -> None:
    """Delete a bridge. Its runner notices within a batch and stops; messages stay in the source."""
    Bridge.objects.filter(pk=bridge.pk).delete()


def get_bridge(*, name: str) -> Bridge:
    bridge = Bridge.objects.filter(name=name).first()
    if bridge is None:
        raise BridgeNotFound(f"Bridge {str(name)[:200]!r} does not exist.")
    return bridge


def list_bridges() -> list[Bridge]:
    return list(Bridge.objects.select_related("state").order_by("name"))


def source_queue(bridge: Bridge) -> Queue:
    """The local queue or durable subscription the bridge consumes from."""
    if not bridge.source_topic:
        return broker.get_queue(name=bridge.source_name)
    sub = broker.get_subscription(topic=bridge.source_topic, name=bridge.source_name)
    if not sub.durable:
        # A non-durable subscription vanishes with its owner, taking unforwarded messages along.
        raise InvalidSource("A bridge's source subscription must be durable.")
    return sub


def _apply(bridge: Bridge, values: dict[str, Any]) -> None:
    for field, value in validated(values).items():
        setattr(bridge, field, value)


def validated(values: dict[str, Any]) -> dict[str, Any]:
    """Check every EDITABLE field of a bridge (all of them given); return them normalized."""
    source_topic = values["source_topic"] or ""
    for name in filter(None, (source_topic, values["source_name"], values["target_name"])):
        broker.validate_name(name)
    if not values["source_name"] or not values["target_name"]:
        raise InvalidRequest("A bridge needs a source and a target destination.")
    if values["target_kind"] not in TargetKind.values:
        raise InvalidRequest("target_kind is queue or topic.")
    _check_batch_size(values["batch_size"])
    _check_token(values["target_token"])
    values = {**values, "source_topic": source_topic, "target_url": conf.check_target(values["target_url"])}
    probe = Bridge(source_topic=source_topic, source_name=values["source_name"])
    source_queue(probe)  # raises QueueNotFound / SubscriptionNotFound / InvalidSource
    return values


def _check_batch_size(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise InvalidRequest(f"batch_size is an integer from 1 to {MAX_BATCH_SIZE}.")


def _check_token(token: Any) -> None:
    # Printable ASCII only: it goes into an HTTP header, and a stray newline must not split it.
    if not isinstance(token, str) or not 0 < len(token) <= 500 or not all(" " < c < "\x7f" for c in token):
        raise InvalidRequest("target_token is 1 to 500 printable characters without spaces.")


# --------------------------------------------------------------------------- status


@dataclass
class BridgeStatus:
    """What operators see: the runner's state plus the live lag of the source."""

    status: str
    forwarded: int
    duplicates: int
    retries: int
    lag: int | None  # messages waiting in the source (None: the source is missing)
    last_error: str
    last_error_at: datetime | None
    last_success_at: datetime | None
    runner: str
    heartbeat_at: datetime | None


def bridge_status(bridge: Bridge) -> BridgeStatus:
    state = BridgeState.objects.filter(bridge=bridge).first() or BridgeState(bridge=bridge)
    return BridgeStatus(
        status=_effective_status(bridge, state),
        forwarded=state.forwarded_count,
        duplicates=state.duplicate_count,
        retries=state.retry_count,
        lag=_lag(bridge),
        last_error=state.last_error,
        last_error_at=state.last_error_at,
        last_success_at=state.last_success_at,
        runner=state.runner,
        heartbeat_at=state.heartbeat_at,
    )


def _effective_status(bridge: Bridge, state: BridgeState) -> str:
    if not bridge.enabled:
        return LinkStatus.STOPPED
    # A runner writes a heartbeat at least every few seconds; silence means nobody runs it.
    stale_after = timedelta(seconds=max(90.0, 3 * conf.get().scan_seconds))
    if state.heartbeat_at is None or clock.now() - state.heartbeat_at > stale_after:
        return LinkStatus.WAITING
    return state.status


def _lag(bridge: Bridge) -> int | None:
    try:
        stats = queries.queue_stats(source_queue(bridge))
    except NotFound:
        return None
    return int(stats["depth"]) + int(stats["in_flight"])
