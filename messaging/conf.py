"""Typed access to the PEGASUS settings dict."""

from __future__ import annotations

from dataclasses import dataclass

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


def get() -> BrokerSettings:
    raw = settings.PEGASUS
    return BrokerSettings(**{key.lower(): value for key, value in raw.items() if key.lower() in _FIELDS})


_FIELDS = set(BrokerSettings.__dataclass_fields__)
