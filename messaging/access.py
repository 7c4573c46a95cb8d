"""Who may do what: the ONE permission decision every interface goes through.

REST, WebSocket, STOMP, console actions and bridges call `require()` (or an `access_*` fetch that
calls it) before any broker operation. Admins (superusers) may do everything. Ordinary users may
send and consume; managing destinations (create, delete, purge, redrive) and browsing are for
admins. Per-destination rules plug in here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from messaging import broker
from messaging.exceptions import NotAuthenticated, PermissionDenied
from messaging.models import Queue, Topic


class Action(StrEnum):
    SEND = "send"
    CONSUME = "consume"
    BROWSE = "browse"
    MANAGE = "manage"


class Kind(StrEnum):
    QUEUE = "queue"
    TOPIC = "topic"


def can(user: Any, action: Action, *, kind: Kind, name: str) -> bool:
    """May `user` perform `action` on the destination `kind`:`name`?"""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser:
        return True
    return action in (Action.SEND, Action.CONSUME)


def require(user: Any, action: Action, *, kind: Kind, name: str) -> None:
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotAuthenticated()
    if not can(user, action, kind=kind, name=name):
        raise PermissionDenied(f"Not permitted to {action} on {kind} {name!r}.")


def access_queue(*, user: Any, name: str, action: Action) -> Queue:
    broker.validate_name(name)
    require(user, action, kind=Kind.QUEUE, name=name)
    return broker.get_queue(name=name)


def access_topic(*, user: Any, name: str, action: Action) -> Topic:
    broker.validate_name(name)
    require(user, action, kind=Kind.TOPIC, name=name)
    return broker.get_topic(name=name)


def access_subscription(*, user: Any, topic: str, name: str, action: Action) -> Queue:
    broker.validate_name(topic)
    broker.validate_name(name)
    require(user, action, kind=Kind.TOPIC, name=topic)
    return broker.get_subscription(topic=topic, name=name)
