"""Read side for listings of destinations (REST GET /queues, /topics, .../subscriptions). Never mutates."""

from __future__ import annotations

from messaging.models import Queue, Topic

MAX_LISTED = 1000


def list_queues() -> list[Queue]:
    """Point-to-point queues by name (at most MAX_LISTED)."""
    qs = Queue.objects.filter(topic__isnull=True).select_related("dead_letter_queue").order_by("name")
    return list(qs[:MAX_LISTED])


def list_topics() -> list[Topic]:
    return list(Topic.objects.order_by("name")[:MAX_LISTED])


def subscription_names(topic: Topic) -> list[str]:
    return list(Queue.objects.filter(topic=topic).order_by("name").values_list("name", flat=True)[:MAX_LISTED])


def list_subscriptions(topic: Topic) -> list[Queue]:
    qs = Queue.objects.filter(topic=topic).select_related("topic", "dead_letter_queue").order_by("name")
    return list(qs[:MAX_LISTED])
