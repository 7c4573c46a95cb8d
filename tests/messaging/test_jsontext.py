"""messaging/jsontext.py writes the same JSON values as the standard library did, including
what orjson refuses."""

from __future__ import annotations

import json

import pytest

from messaging import jsontext


@pytest.mark.parametrize(
    "value",
    [
        {"op": "message", "message": {"body": 'caf\u00e9 \u2603 \U0001f600 "q" \\ \n\t', "headers": {}, "n": None}},
        [1, -2, 0.1, 1e16, True, False, None, "", [], {}],
        {"corr": 2**70},  # past 64 bits: orjson refuses, the standard library writes it
        {"corr": -(2**64)},
        {"corr": "\ud800"},  # a lone surrogate (json.loads reads one from "\\ud800")
    ],
)
def test_same_values_as_the_standard_library(value: object):
    text = jsontext.dumps(value)
    assert isinstance(text, str)
    assert json.loads(text) == json.loads(json.dumps(value))


def test_compact():
    assert jsontext.dumps({"a": [1, 2], "b": {"c": "d"}}) == '{"a":[1,2],"b":{"c":"d"}}'
