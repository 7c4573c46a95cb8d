"""Bridge errors, in the broker's one hierarchy so every interface maps them the same way."""

from __future__ import annotations

from messaging.exceptions import InvalidRequest, NameTaken, NotFound


class BridgeNotFound(NotFound):
    """No such bridge."""

    code = "bridge_not_found"


class BridgeNameTaken(NameTaken):
    """A bridge with that name exists."""


class TargetNotAllowed(InvalidRequest):
    """The target is not allowed by the operator's PEGASUS_BRIDGE_TARGETS."""

    code = "target_not_allowed"


class InvalidSource(InvalidRequest):
    """A bridge's source is a queue or a durable subscription of this server."""

    code = "invalid_source"
