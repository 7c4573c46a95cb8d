"""messaging.conf.get: built once per PEGASUS dict, and a replaced dict is seen at once."""

from __future__ import annotations

from typing import Any

from messaging import conf


def test_get__builds_once_per_settings_dict() -> None:
    assert conf.get() is conf.get()


def test_get__sees_a_replaced_settings_dict(settings: Any) -> None:
    before = conf.get()
    settings.PEGASUS = {**settings.PEGASUS, "MAX_BATCH_MESSAGES": 7}
    assert conf.get().max_batch_messages == 7
    settings.PEGASUS = {**settings.PEGASUS, "MAX_BATCH_MESSAGES": before.max_batch_messages}
    assert conf.get() == before
