"""The REST API's JSON renderer (pegasus_site/api.py FastJSONRenderer) writes what ninja's own
JSONRenderer wrote: the same values, timestamps in Django's format, and anything orjson cannot
write at all still written."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.utils.translation import gettext_lazy
from ninja.renderers import JSONRenderer

from messaging.models import TxState
from pegasus_site.api import FastJSONRenderer, api

MOMENT = datetime(2026, 12, 7, 20, 15, 1, 123456, tzinfo=UTC)


def _both(data: Any) -> tuple[Any, Any]:
    fast = FastJSONRenderer().render(None, data, response_status=200)
    ninja = JSONRenderer().render(None, data, response_status=200)  # type: ignore[arg-type]
    return json.loads(fast), json.loads(ninja)


def test_the_api_renders_with_it():
    assert isinstance(api.renderer, FastJSONRenderer)


def test_same_json_as_ninjas_renderer():
    data = {
        "messages": [
            {
                "id": "17", "body": "caf\u00e9 \u2603 \U0001f600 \"quoted\" \\ \n", "headers": {"k": "v"},
                "published_at": MOMENT, "expires_at": None, "priority": 4, "durable": True, "ratio": 0.1,
            }
        ],
        "when": MOMENT.date(), "timeout": timedelta(seconds=90), "amount": Decimal("1.50"),
        "token": uuid.UUID(int=5), "state": TxState.PREPARED, "lazy": gettext_lazy("Queue"), 3: "int key",
    }  # fmt: skip
    fast, ninja = _both(data)
    assert fast == ninja


def test_timestamps_keep_djangos_format():
    fast, _ = _both({"at": MOMENT, "whole": MOMENT.replace(microsecond=0)})
    assert fast == {"at": "2026-12-07T20:15:01.123Z", "whole": "2026-12-07T20:15:01Z"}


def test_what_orjson_cannot_write_is_still_written():
    big = 2**70  # past orjson's 64-bit integers
    fast, ninja = _both({"n": big, "nested": [{"n": -big}]})
    assert fast == ninja == {"n": big, "nested": [{"n": -big}]}
