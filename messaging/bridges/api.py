"""REST: /api/v1/bridges (admins only). Mounted by pegasus_site/api.py.

The source is `source_queue`, or `source_topic` + `source_subscription` (durable); the target is
`target_url` (allowed by PEGASUS_BRIDGE_TARGETS) with `target_queue` or `target_topic`, and
`target_token`, which is write-only: answers only say `token_set`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema, Status

from messaging import access
from messaging.bridges import services
from messaging.bridges.models import Bridge, TargetKind
from messaging.exceptions import InvalidRequest
from messaging.schemas import ErrorOut

router = Router(tags=["bridges"])


class BridgeIn(Schema):
    name: str
    source_queue: str | None = None
    source_topic: str | None = None
    source_subscription: str | None = None
    target_url: str
    target_queue: str | None = None
    target_topic: str | None = None
    target_token: str
    batch_size: int = 100
    enabled: bool = True


class BridgePatchIn(Schema):
    source_queue: str | None = None
    source_topic: str | None = None
    source_subscription: str | None = None
    target_url: str | None = None
    target_queue: str | None = None
    target_topic: str | None = None
    target_token: str | None = None
    batch_size: int | None = None
    enabled: bool | None = None


class BridgeStateOut(Schema):
    status: str
    forwarded: int
    duplicates: int
    retries: int
    lag: int | None
    last_error: str
    last_error_at: datetime | None
    last_success_at: datetime | None
    runner: str
    heartbeat_at: datetime | None


class BridgeOut(Schema):
    name: str
    enabled: bool
    source_queue: str | None
    source_topic: str | None
    source_subscription: str | None
    target_url: str
    target_queue: str | None
    target_topic: str | None
    token_set: bool
    batch_size: int
    created_at: datetime
    updated_at: datetime
    state: BridgeStateOut


class BridgeListOut(Schema):
    bridges: list[BridgeOut]


ERRORS: dict[int, Any] = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut}


@router.get("", response={200: BridgeListOut, **ERRORS})
def list_bridges(request: HttpRequest) -> dict[str, Any]:
    """Every bridge with its state (status, forwarded, lag, last error, ...)."""
    access.require_admin(request.auth)  # type: ignore[attr-defined]
    return {"bridges": [render(b) for b in services.list_bridges()]}


@router.post("", response={201: BridgeOut, **ERRORS})
def create_bridge(request: HttpRequest, body: BridgeIn) -> Status[dict[str, Any]]:
    """Create a bridge (201). target_url must be allowed by the operator (PEGASUS_BRIDGE_TARGETS)."""
    access.require_admin(request.auth)  # type: ignore[attr-defined]
    fields = _fields(body.model_dump(exclude={"name"}))
    bridge = services.create_bridge(name=body.name, **fields)
    return Status(201, render(bridge))


@router.get("/{name}", response={200: BridgeOut, **ERRORS})
def get_bridge(request: HttpRequest, name: str) -> dict[str, Any]:
    """One bridge with its state."""
    access.require_admin(request.auth)  # type: ignore[attr-defined]
    return render(services.get_bridge(name=name))


@router.patch("/{name}", response={200: BridgeOut, **ERRORS})
def update_bridge(request: HttpRequest, name: str, body: BridgePatchIn) -> dict[str, Any]:
    """Change fields; a missing or empty target_token keeps the stored one."""
    access.require_admin(request.auth)  # type: ignore[attr-defined]
    bridge = services.get_bridge(name=name)
    given = body.model_dump(exclude_unset=True)
    if any(k.startswith("source_") for k in given):
        given = {"source_queue": None, "source_topic": None, "source_subscription": None, **given}
    if any(k in given for k in ("target_queue", "target_topic")):
        given = {"target_queue": None, "target_topic": None, **given}
    changes = _fields(given, partial=True)
    return render(services.update_bridge(bridge=bridge, changes=changes))


@router.delete("/{name}", response={204: None, **ERRORS})
def delete_bridge(request: HttpRequest, name: str) -> Status[None]:
    """Delete a bridge (204); its messages stay in the source."""
    access.require_admin(request.auth)  # type: ignore[attr-defined]
    services.delete_bridge(bridge=services.get_bridge(name=name))
    return Status(204, None)


def _fields(given: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """API field names to the model's: source_* and target_* pairs become name + kind."""
    fields = {k: v for k, v in given.items() if not k.startswith(("source_", "target_queue", "target_topic"))}
    if not partial or any(k.startswith("source_") for k in given):
        fields.update(_source(given.get("source_queue"), given.get("source_topic"), given.get("source_subscription")))
    if not partial or "target_queue" in given or "target_topic" in given:
        fields.update(_target(given.get("target_queue"), given.get("target_topic")))
    if partial:
        fields = {k: v for k, v in fields.items() if v is not None or k == "source_topic"}
    return fields


def _source(queue: str | None, topic: str | None, subscription: str | None) -> dict[str, Any]:
    if queue and not (topic or subscription):
        return {"source_topic": "", "source_name": queue}
    if topic and subscription and not queue:
        return {"source_topic": topic, "source_name": subscription}
    raise InvalidRequest("Give source_queue, or source_topic with source_subscription.")


def _target(queue: str | None, topic: str | None) -> dict[str, Any]:
    if bool(queue) == bool(topic):
        raise InvalidRequest("Give exactly one of target_queue and target_topic.")
    return {"target_kind": TargetKind.QUEUE if queue else TargetKind.TOPIC, "target_name": queue or topic}


def render(bridge: Bridge) -> dict[str, Any]:
    is_queue = bridge.target_kind == TargetKind.QUEUE
    return {
        "name": bridge.name,
        "enabled": bridge.enabled,
        "source_queue": None if bridge.source_topic else bridge.source_name,
        "source_topic": bridge.source_topic or None,
        "source_subscription": bridge.source_name if bridge.source_topic else None,
        "target_url": bridge.target_url,
        "target_queue": bridge.target_name if is_queue else None,
        "target_topic": None if is_queue else bridge.target_name,
        "token_set": bool(bridge.target_token),
        "batch_size": bridge.batch_size,
        "created_at": bridge.created_at,
        "updated_at": bridge.updated_at,
        "state": vars(services.bridge_status(bridge)),
    }
