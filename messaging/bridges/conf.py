"""Bridge settings, and the operator's list of servers a bridge may contact.

Nothing leaves the process unless its base URL is in PEGASUS_BRIDGE_TARGETS: an admin API call
can configure a bridge, but cannot make this server send requests to an arbitrary address.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from messaging.bridges.exceptions import TargetNotAllowed


@dataclass(frozen=True)
class BridgeSettings:
    targets: tuple[str, ...]  # normalized allowed base URLs
    connect_timeout_seconds: float
    request_timeout_seconds: float
    backoff_base_seconds: float
    backoff_max_seconds: float
    lease_seconds: int  # the lease on a batch; extended while retrying it
    max_request_bytes: int  # a batch bigger than this goes out as several requests
    scan_seconds: float  # how often a process looks for bridges to run
    idle_poll_seconds: float  # longest wait for new messages without a doorbell ring


def get() -> BridgeSettings:
    raw = getattr(settings, "PEGASUS_BRIDGES", {})
    return BridgeSettings(
        targets=tuple(normalize_url(u) for u in raw.get("TARGETS", ())),
        connect_timeout_seconds=float(raw.get("CONNECT_TIMEOUT_SECONDS", 5)),
        request_timeout_seconds=float(raw.get("REQUEST_TIMEOUT_SECONDS", 15)),
        backoff_base_seconds=float(raw.get("BACKOFF_BASE_SECONDS", 0.2)),
        backoff_max_seconds=float(raw.get("BACKOFF_MAX_SECONDS", 30)),
        lease_seconds=int(raw.get("LEASE_SECONDS", 60)),
        # Half the default request limit of a Pegasus server (PEGASUS_MAX_REQUEST_BYTES, 16 MiB).
        max_request_bytes=int(raw.get("MAX_REQUEST_BYTES", 8 * 1024 * 1024)),
        scan_seconds=float(raw.get("SCAN_SECONDS", 5)),
        idle_poll_seconds=float(raw.get("IDLE_POLL_SECONDS", 1)),
    )


def runner_enabled() -> bool:
    """Read at start-up from the environment: PEGASUS_BRIDGES_RUNNER=off keeps runners out of
    this process (for example when `manage.py run_bridges` runs them elsewhere)."""
    return os.environ.get("PEGASUS_BRIDGES_RUNNER", "on").strip().lower() not in {"0", "off", "false", "no"}


def normalize_url(url: str) -> str:
    """scheme://host[:port][/path] in lower case, default ports and trailing slashes removed."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetNotAllowed(f"Not an http(s) base URL: {str(url)[:100]!r}.")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise TargetNotAllowed("A target URL has no credentials, query or fragment (the token goes in its own field).")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise TargetNotAllowed(f"Invalid port in {str(url)[:100]!r}.") from None
    default = {"http": 80, "https": 443}[parts.scheme]
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def check_target(url: str) -> str:
    """The normalized URL if the operator allows it; TargetNotAllowed otherwise."""
    normalized = normalize_url(url)
    if normalized not in get().targets:
        raise TargetNotAllowed(
            f"{normalized} is not in PEGASUS_BRIDGE_TARGETS: the operator allows a server before bridges use it."
        )
    return normalized
