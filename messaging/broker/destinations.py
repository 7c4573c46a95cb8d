"""Queues, topics and subscriptions: create, look up, delete, purge, pause."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from django.db import IntegrityError

from messaging import clock, conf, events, filters
from messaging.broker.common import (
    STORES,
    QueueSettings,
    _positive,
    _touch,
    _user_or_none,
    _validate_settings,
    atomic,
    validate_name,
)
from messaging.broker.delivery import _delete_deliveries
from messaging.exceptions import (
    NameTaken,
    OverQuota,
    QueueNotFound,
    SubscriptionNotFound,
    TopicNotFound,
)
from messaging.models import (
    ExpiredAction,
    Queue,
    State,
    Topic,
)

# --------------------------------------------------------------------------- destinations


def _settings_fields(s: QueueSettings) -> dict[str, Any]:
    defaults = conf.get()
    dlq = None
    if s.dead_letter_queue is not None:
        dlq = Queue.objects.filter(topic__isnull=True, name=s.dead_letter_queue).first()
        if dlq is None:
            raise QueueNotFound(f"Dead-letter queue {s.dead_letter_queue!r} does not exist.")
    return {
        "max_deliveries": s.max_deliveries or defaults.default_max_deliveries,
        "visibility_timeout_seconds": s.visibility_timeout_seconds or defaults.default_visibility_timeout_seconds,
        "dedup_window_seconds": (
            defaults.default_dedup_window_seconds if s.dedup_window_seconds is None else s.dedup_window_seconds
        ),
        "max_message_bytes": s.max_message_bytes or defaults.default_max_message_bytes,
        "expired_action": s.expired_action or ExpiredAction.DROP,
        "dead_letter_queue": dlq,
    }


def _same_settings(existing: Queue, s: QueueSettings) -> bool:
    """True when every setting the caller gave explicitly matches the existing row."""
    wanted = _settings_fields(s)
    given = {k for k, v in vars(s).items() if v is not None}
    for key in given:
        model_key = key
        if key == "dead_letter_queue":
            if existing.dead_letter_queue_id != (wanted[key].pk if wanted[key] else None):
                return False
            continue
        if getattr(existing, model_key) != wanted[key]:
            return False
    return True


def create_queue(*, name: str, settings: QueueSettings | None = None, user: Any = None) -> tuple[Queue, bool]:
    """Create a queue; return (queue, created). An existing queue with the same explicitly given
    settings is returned as is (idempotent create); with other settings it raises NameTaken."""
    validate_name(name)
    s = settings or QueueSettings()
    _validate_settings(s)
    with atomic():
        existing = Queue.objects.filter(topic__isnull=True, name=name).first()
        if existing is not None:
            if not _same_settings(existing, s):
                raise NameTaken(f"Queue {name!r} exists with other settings.")
            return existing, False
        try:
            with atomic():
                _check_destination_quota(user)
                queue = Queue.objects.create(name=name, created_by=_user_or_none(user), **_settings_fields(s))
        except IntegrityError:  # created concurrently: same answer as above
            existing = Queue.objects.get(topic__isnull=True, name=name)
            if not _same_settings(existing, s):
                raise NameTaken(f"Queue {name!r} exists with other settings.") from None
            return existing, False
    return queue, True


# Every publish and receive looks its destination up by name. Written as SQL: building the same
# query with the ORM costs about a millisecond of CPU here, more than the query itself.
_QUEUE_BY_NAME = f"SELECT * FROM {Queue._meta.db_table} WHERE topic_id IS NULL AND name = %s"
_TOPIC_BY_NAME = f"SELECT * FROM {Topic._meta.db_table} WHERE name = %s"
_SUBSCRIPTIONS = f"SELECT * FROM {Queue._meta.db_table} WHERE topic_id = %s ORDER BY id"


def get_queue(*, name: str, recent_ok: bool = False) -> Queue:
    """The queue (not a subscription) called `name`; its dead_letter_queue loads when used.

    `recent_ok` (publishing): a row read in this process less than QUEUE_CACHE_SECONDS ago will
    do, which saves a round trip per group-commit round. Changes made in this process are seen
    at once (signals clear the cache, messaging/apps.py); another process's within that time:
    a new max_message_bytes applies a moment later, and a publish to a queue deleted meanwhile
    fails its insert and answers 409 conflict ("retry"), then 404. Nothing is ever written to
    a queue that does not exist."""
    if recent_ok and QUEUE_CACHE_SECONDS > 0:
        cached = _recent_queues.get(name)
        if cached is not None and time.monotonic() - cached[0] < QUEUE_CACHE_SECONDS:
            return cached[1]
    queue = next(iter(Queue.objects.raw(_QUEUE_BY_NAME, [name])), None)
    if queue is None:
        raise QueueNotFound(f"Queue {name!r} does not exist.")
    if QUEUE_CACHE_SECONDS > 0:
        if len(_recent_queues) > 10_000:
            _recent_queues.clear()
        _recent_queues[name] = (time.monotonic(), queue)
    return queue


QUEUE_CACHE_SECONDS = float(os.environ.get("PEGASUS_QUEUE_CACHE_SECONDS", "1"))
_recent_queues: dict[str, tuple[float, Queue]] = {}


def forget_recent_queues(**kwargs: Any) -> None:
    """Signal receiver (messaging/apps.py): a queue was saved or deleted in this process."""
    _recent_queues.clear()


def get_topic(*, name: str) -> Topic:
    topic = next(iter(Topic.objects.raw(_TOPIC_BY_NAME, [name])), None)
    if topic is None:
        raise TopicNotFound(f"Topic {name!r} does not exist.")
    return topic


def subscriptions_of(topic: Topic) -> list[Queue]:
    """The topic's subscriptions in creation order (a publish's lock order)."""
    return list(Queue.objects.raw(_SUBSCRIPTIONS, [topic.pk]))


def get_subscription(*, topic: str, name: str) -> Queue:
    sub = Queue.objects.select_related("topic", "dead_letter_queue").filter(topic__name=topic, name=name).first()
    if sub is None:
        get_topic(name=topic)
        raise SubscriptionNotFound(f"Subscription {name!r} of topic {topic!r} does not exist.")
    return sub


def delete_queue(*, queue: Queue) -> None:
    """Delete a queue or subscription with all its messages."""
    with atomic():
        for store in STORES:
            _delete_deliveries(store, store.deliveries().filter(queue=queue), skip_locked=False)
        Queue.objects.filter(pk=queue.pk).delete()


def purge_queue(*, queue: Queue) -> int:
    """Remove the ready (and scheduled) messages. Leased, staged and dead-lettered ones stay:
    a consumer holding a lease can still ack it, and a transaction's work is its own."""
    with atomic():
        return sum(
            _delete_deliveries(store, store.deliveries().filter(queue=queue, state=State.READY)) for store in STORES
        )


def set_paused(*, queue: Queue, paused: bool) -> None:
    """Pause or resume delivery of a queue: publishes are still accepted while paused."""
    Queue.objects.filter(pk=queue.pk).update(paused=paused)
    if not paused:
        with atomic():
            events.notify_on_commit([queue.pk])


def create_topic(*, name: str, user: Any = None) -> tuple[Topic, bool]:
    validate_name(name)
    existing = Topic.objects.filter(name=name).first()
    if existing is not None:
        return existing, False
    _check_destination_quota(user)
    try:
        with atomic():
            return Topic.objects.get_or_create(name=name, defaults={"created_by": _user_or_none(user)})
    except IntegrityError:
        return Topic.objects.get(name=name), False


def _check_destination_quota(user: Any) -> None:
    """Non-admins may own at most MAX_DESTINATIONS_PER_USER queues, topics and subscriptions."""
    if user is None or getattr(user, "pk", None) is None or getattr(user, "is_superuser", False):
        return
    limit = conf.get().max_destinations_per_user
    owned = Queue.objects.filter(created_by=user).count() + Topic.objects.filter(created_by=user).count()
    if owned >= limit:
        raise OverQuota(f"At most {limit} destinations per user.")


def delete_topic(*, topic: Topic) -> None:
    with atomic():
        for sub in Queue.objects.filter(topic=topic):
            delete_queue(queue=sub)
        Topic.objects.filter(pk=topic.pk).delete()


def create_subscription(
    *,
    topic: Topic,
    name: str,
    durable: bool = True,
    filter: object = None,
    owner: str = "",
    expires_after_seconds: int | None = None,
    settings: QueueSettings | None = None,
    user: Any = None,
) -> tuple[Queue, bool]:
    """Create a subscription. A non-durable one lives while its owner keeps it alive: a
    WebSocket connection (`owner`) or, for REST, a receive at least every
    `expires_after_seconds` (default 300)."""
    validate_name(name)
    flt = filters.validate(filter)
    s = settings or QueueSettings()
    _validate_settings(s)
    _positive(expires_after_seconds, "expires_after_seconds")
    if not durable and expires_after_seconds is None:
        expires_after_seconds = 300
    if durable:
        expires_after_seconds = None
    with atomic():
        existing = Queue.objects.filter(topic=topic, name=name).first()
        if existing is not None:
            if existing.durable != durable or existing.filter != flt or not _same_settings(existing, s):
                raise NameTaken(f"Subscription {name!r} exists with other settings.")
            _touch(existing)
            return existing, False
        expires_at = clock.now() + timedelta(seconds=expires_after_seconds) if expires_after_seconds else None
        try:
            with atomic():
                _check_destination_quota(user)
                sub = Queue.objects.create(
                    name=name,
                    topic=topic,
                    durable=durable,
                    filter=flt,
                    owner=owner,
                    expires_after_seconds=expires_after_seconds,
                    expires_at=expires_at,
                    created_by=_user_or_none(user),
                    **_settings_fields(s),
                )
        except IntegrityError:
            raise NameTaken(f"Subscription {name!r} was just created by someone else.") from None
    return sub, True


def delete_owned_subscriptions(*, owner: str) -> int:
    """Delete the non-durable subscriptions of an owner (a closed connection), with their messages."""
    subs = list(Queue.objects.filter(topic__isnull=False, durable=False, owner=owner))
    for sub in subs:
        delete_queue(queue=sub)
    return len(subs)


def keep_alive(*, queue: Queue) -> None:
    """Push back the expiry of a non-durable subscription (called by its owner)."""
    _touch(queue)
