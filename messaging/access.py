"""Who may do what: the ONE permission decision every interface goes through.

REST, WebSocket, STOMP, console actions and bridges call `require()` (or an `access_*` fetch that
calls it) before any broker operation. Admins (superusers) may do everything. Everyone else may
do exactly what their AccessRule rows (their own and their groups') grant on destinations
matching the rule's pattern, and nothing by default. Actions:
  send     publish to a queue or topic
  consume  receive/ack from a queue; create, use and delete subscriptions of a topic
  browse   look at messages without consuming
  manage   create, delete, purge, redrive, pause a destination
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import lru_cache
from typing import Any

from django.db.models import Q

from messaging import broker
from messaging.exceptions import NotAuthenticated, PermissionDenied
from messaging.models import AccessRule, Queue, RuleKind, Topic


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
    rules = AccessRule.objects.filter(Q(user=user) | Q(group__in=user.groups.all()), **{action.value: True})
    rules = rules.filter(kind__in=[RuleKind.ANY, kind.value])
    return any(pattern_matches(pattern, name) for pattern in rules.values_list("pattern", flat=True))


def pattern_matches(pattern: str, name: str) -> bool:
    """RabbitMQ/Artemis wildcards on dot-separated words: `*` one word, `#` zero or more."""
    return _match(tuple(pattern.split(".")), tuple(name.split(".")))


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return _match(rest, words) or (bool(words) and _match(pattern, words[1:]))
    if not words:
        return False
    return head in ("*", words[0]) and _match(rest, words[1:])


def require(user: Any, action: Action, *, kind: Kind, name: str) -> None:
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotAuthenticated()
    if not can(user, action, kind=kind, name=name):
        raise PermissionDenied(f"Not permitted to {action} on {kind} {name!r}.")


def require_admin(user: Any) -> None:
    """Server-wide settings (bridges: they make this server contact others) are for admins
    only, whatever AccessRules grant."""
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotAuthenticated()
    if not (user.is_active and user.is_superuser):
        raise PermissionDenied("Only admins may do this.")


def may_consume(user: Any) -> Callable[[Queue], bool]:
    """For broker.ack/nack/extend(authorize=...): may `user` consume from this queue or
    subscription? (Holding a receipt alone is not permission.) For an admin, who may consume
    from every queue, broker.ANY_QUEUE: the broker then need not look the queues up at all."""
    if user is not None and getattr(user, "is_authenticated", False) and user.is_active and user.is_superuser:
        return broker.ANY_QUEUE

    def check(queue: Queue) -> bool:
        if queue.topic is not None:
            return can(user, Action.CONSUME, kind=Kind.TOPIC, name=queue.topic.name)
        return can(user, Action.CONSUME, kind=Kind.QUEUE, name=queue.name)

    return check


def access_queue(*, user: Any, name: str, action: Action, recent_ok: bool = False) -> Queue:
    broker.validate_name(name)
    require(user, action, kind=Kind.QUEUE, name=name)
    return broker.get_queue(name=name, recent_ok=recent_ok)


def access_topic(*, user: Any, name: str, action: Action) -> Topic:
    broker.validate_name(name)
    require(user, action, kind=Kind.TOPIC, name=name)
    return broker.get_topic(name=name)


def access_subscription(*, user: Any, topic: str, name: str, action: Action) -> Queue:
    broker.validate_name(topic)
    broker.validate_name(name)
    require(user, action, kind=Kind.TOPIC, name=topic)
    return broker.get_subscription(topic=topic, name=name)


def grant(
    *, pattern: str, actions: list[Action] | list[str], user: Any = None, group: Any = None, kind: str = RuleKind.ANY
) -> AccessRule:
    """Add a rule granting `actions` on destinations matching `pattern` (tests, setup scripts)."""
    flags = {action: action in {Action(a) for a in actions} for action in Action}
    return AccessRule.objects.create(user=user, group=group, kind=kind, pattern=pattern, **flags)
