"""The broker's one source of time.

Every timestamp the broker writes or compares comes from `now()`, never from the database's
clock, so that tests (and the hypothesis state machine) can move time forward with `advance()`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone

_offset = timedelta(0)


def now() -> datetime:
    return timezone.now() + _offset


def advance(seconds: float) -> None:
    """Move the broker's clock forward (tests only)."""
    global _offset
    _offset += timedelta(seconds=seconds)


def reset() -> None:
    global _offset
    _offset = timedelta(0)
