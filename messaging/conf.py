"""Typed access to the PEGASUS settings dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings


@dataclass(frozen=True)
class BrokerSettings:
    default_visibility_timeout_seconds: int
    default_max_deliveries: int
    default_dedup_window_seconds: int
    default_max_message_bytes: int
    max_batch_messages: int
    max_request_bytes: int
    transaction_timeout_seconds: int
    ack_retention_seconds: int
    maintenance_interval_seconds: int
    publish_rate_per_token: float = 2000.0
    publish_burst_per_token: int = 5000
    rate_limit_admins: bool = False
    max_connections_per_user: int = 100
    max_destinations_per_user: int = 1000


def get() -> BrokerSettings:
    """The settings, built once per PEGASUS dict: every request asks, and building them each time
    was 4-5% of a one-message publish's server CPU (py-spy). Replacing the dict, as
    override_settings and pytest-django's `settings` fixture do, is seen at once; changing
    the dict in place is not."""
    global _cached
    raw: dict[str, Any] = settings.PEGASUS
    cached = _cached
    if cached is not None and cached[0] is raw:
        return cached[1]
    built = BrokerSettings(**{key.lower(): value for key, value in raw.items() if key.lower() in _FIELDS})
    _cached = (raw, built)
    return built


_FIELDS = set(BrokerSettings.__dataclass_fields__)
_cached: tuple[dict[str, Any], BrokerSettings] | None = None
