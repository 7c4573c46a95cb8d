"""The only thing that leaves the process: one batch publish to the target's public REST API.

`POST {base}/api/v1/{queues|topics}/{name}/messages {"messages": [...]}` is all or nothing on the
target and answers 201 only once the batch is durable there. Anything else (no answer, a cut
answer, 4xx, 5xx) is a LinkError: the caller retries the same batch, which the target's
duplicate detection makes harmless.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from messaging import broker, clock
from messaging.bridges import conf
from messaging.bridges.models import Bridge


class LinkError(Exception):
    """A failed attempt. The message names the failure, never the token or the body."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # the target's Retry-After (429, 503), in seconds


@dataclass(frozen=True)
class Published:
    count: int
    duplicates: int


def new_client(settings: conf.BridgeSettings | None = None, **options: Any) -> httpx.Client:
    """An HTTP client with a timeout on every phase of every call, and no redirects (a redirect
    could lead outside PEGASUS_BRIDGE_TARGETS)."""
    s = settings or conf.get()
    timeout = httpx.Timeout(s.request_timeout_seconds, connect=s.connect_timeout_seconds)
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, **options)


def dedup_id(bridge: Bridge, msg: broker.ReceivedMessage) -> str:
    """Stable across retries and restarts, unique across bridges and source servers (the uid).
    Transient ids may restart after a crash (UNLOGGED tables), so they also carry the publish time."""
    base = f"bridge:{bridge.uid.hex}:{msg.id}"
    return base if msg.durable else f"{base}:{msg.published_at.timestamp():.6f}"


def payload(bridge: Bridge, batch: list[broker.ReceivedMessage], *, now: datetime | None = None) -> dict[str, Any]:
    return {"messages": [_outgoing(bridge, msg, now or clock.now()) for msg in batch]}


def chunks(batch: list[broker.ReceivedMessage], *, max_bytes: int) -> list[list[broker.ReceivedMessage]]:
    """Split a batch, in order, into runs whose JSON stays under `max_bytes` (below the target's
    request size limit); a message bigger than that on its own goes alone."""
    runs: list[list[broker.ReceivedMessage]] = [[]]
    size = 0
    for msg in batch:
        # An upper bound: the body and headers as JSON, plus room for the other fields.
        cost = len(json.dumps([msg.body, msg.headers]).encode()) + 512
        if runs[-1] and size + cost > max_bytes:
            runs.append([])
            size = 0
        runs[-1].append(msg)
        size += cost
    return runs


def _outgoing(bridge: Bridge, msg: broker.ReceivedMessage, now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "body": msg.body,
        "headers": msg.headers,
        "priority": msg.priority,
        "durable": msg.durable,
        "dedup_id": dedup_id(bridge, msg),
    }
    if msg.content_type:
        out["content_type"] = msg.content_type
    if msg.expires_at is not None:
        # What is left of its TTL; at least a second, since the target wants a positive TTL.
        out["ttl_seconds"] = max(1, math.ceil((msg.expires_at - now).total_seconds()))
    return out


def publish(client: httpx.Client, bridge: Bridge, body: dict[str, Any]) -> Published:
    """Publish one batch; raise LinkError unless the target confirmed all of it (201)."""
    base = conf.check_target(bridge.target_url)  # re-checked on every call: the operator may revoke
    url = f"{base}/api/v1/{bridge.target_kind}s/{bridge.target_name}/messages"
    try:
        response = client.post(url, json=body, headers={"Authorization": f"Bearer {bridge.target_token}"})
        content = response.read()
    except httpx.TimeoutException as exc:
        raise LinkError(f"timeout ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise LinkError(f"connection failed ({type(exc).__name__})") from None
    if response.status_code != 201:
        raise LinkError(
            f"target answered {response.status_code}{_error_code(response)}", retry_after=_retry_after(response)
        )
    return _confirmed(content, expected=len(body["messages"]))


def _confirmed(content: bytes, *, expected: int) -> Published:
    try:
        results = httpx.Response(201, content=content).json()["messages"]
        duplicates = sum(1 for r in results if r["duplicate"])
    except (ValueError, KeyError, TypeError):
        raise LinkError("target sent an unreadable confirmation") from None
    if len(results) != expected:
        raise LinkError(f"target confirmed {len(results)} of {expected} messages")
    return Published(count=expected, duplicates=duplicates)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _error_code(response: httpx.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" {str(code)[:60]}" if isinstance(code, str) else ""
