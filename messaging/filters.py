"""Subscription header filters.

A filter is a JSON object of header name to condition; a message matches when every condition
holds (AND). A condition is one of:
  "eu"            the header equals this string
  ["eu", "us"]    the header equals one of these strings
  true            the header is present (any value)
  false           the header is absent
An empty or missing filter matches every message. See docs/filters.md.
"""

from __future__ import annotations

from typing import Any

from messaging.exceptions import InvalidFilter

Filter = dict[str, Any]


def validate(raw: object) -> Filter | None:
    """Return the filter in canonical form, or raise InvalidFilter."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise InvalidFilter("A filter is a JSON object of header name to condition.")
    for key, cond in raw.items():
        if not isinstance(key, str) or not key:
            raise InvalidFilter("Filter keys are header names.")
        if isinstance(cond, bool | str):
            continue
        if isinstance(cond, list) and cond and all(isinstance(v, str) for v in cond):
            continue
        raise InvalidFilter(f"Condition for {key!r} must be a string, a list of strings, true or false.")
    return dict(raw)


def matches(flt: Filter | None, headers: dict[str, str]) -> bool:
    if not flt:
        return True
    for key, cond in flt.items():
        value = headers.get(key)
        if cond is True:
            ok = value is not None
        elif cond is False:
            ok = value is None
        elif isinstance(cond, list):
            ok = value in cond
        else:
            ok = value == cond
        if not ok:
            return False
    return True
