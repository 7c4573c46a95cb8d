"""Pegasus data model.

A *Queue* row is anything consumers receive from: a point-to-point queue (topic is NULL) or one
subscription of a topic. A published message is stored once (Message) and gets one Delivery row
per queue it is routed to; all delivery state (ready, leased, acked, dead) lives on the Delivery.

Durable messages live in `Message`/`Delivery`. Non-durable ones live in `TransientMessage`/
`TransientDelivery`, which on PostgreSQL are UNLOGGED tables: they write no WAL, are emptied by a
crash, and nothing in the logged tables refers to them, so a crash can never leave the durable
side pointing at something that vanished.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class Topic(models.Model):
    name = models.CharField(max_length=200, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ExpiredAction(models.TextChoices):
    DROP = "drop"
    DEAD_LETTER = "dead_letter"


class Queue(models.Model):
    """A point-to-point queue, or (with `topic` set) a subscription of that topic."""

    name = models.CharField(max_length=200)
    topic = models.ForeignKey(Topic, null=True, blank=True, on_delete=models.CASCADE, related_name="subscriptions")
    durable = models.BooleanField(default=True, help_text="Subscriptions only: outlives its owner.")
    filter = models.JSONField(null=True, blank=True, help_text="Header filter (see docs/filters.md).")
    owner = models.CharField(max_length=200, blank=True, help_text="Who keeps a non-durable subscription alive.")
    expires_after_seconds = models.PositiveIntegerField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    max_deliveries = models.PositiveIntegerField()
    visibility_timeout_seconds = models.PositiveIntegerField()
    dead_letter_queue = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="dead_letter_sources"
    )
    dedup_window_seconds = models.PositiveIntegerField()
    max_message_bytes = models.PositiveIntegerField()
    expired_action = models.CharField(max_length=20, choices=ExpiredAction.choices, default=ExpiredAction.DROP)
    paused = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name"], condition=Q(topic__isnull=True), name="queue_name_unique"),
            models.UniqueConstraint(
                fields=["topic", "name"], condition=Q(topic__isnull=False), name="subscription_name_unique"
            ),
        ]
        indexes = [models.Index(fields=["expires_at"], condition=Q(expires_at__isnull=False), name="queue_expiry")]

    def __str__(self) -> str:
        return f"{self.topic.name}/{self.name}" if self.topic_id and self.topic else self.name

    @property
    def is_subscription(self) -> bool:
        return self.topic_id is not None

    @property
    def label(self) -> str:
        """How the destination is named in headers and the console: `NAME` or `TOPIC/SUBSCRIPTION`."""
        return str(self)


class SubscriptionManager(models.Manager["Subscription"]):
    def get_queryset(self) -> models.QuerySet[Subscription]:
        return super().get_queryset().filter(topic__isnull=False)


class PointToPointManager(models.Manager["Queue"]):
    def get_queryset(self) -> models.QuerySet[Queue]:
        return super().get_queryset().filter(topic__isnull=True)


class Subscription(Queue):
    """A topic subscription (a Queue row with a topic), as its own model for the console."""

    objects = SubscriptionManager()  # type: ignore[misc]

    class Meta:
        proxy = True


class State(models.IntegerChoices):
    STAGED = 0, "staged"  # published inside an open transaction: invisible
    READY = 1, "ready"  # deliverable from visible_at on (scheduled until then)
    LEASED = 2, "leased"  # out to a consumer until visible_at (the lease deadline)
    ACKED = 3, "acked"  # done; kept until visible_at so a repeated ack answers ok
    DEAD = 4, "dead"  # dead-lettered, kept in its own queue (no dead-letter queue set)


class MessageBase(models.Model):
    id = models.BigAutoField(primary_key=True)
    body = models.TextField()
    content_type = models.CharField(max_length=200, blank=True)
    headers = models.JSONField(default=dict)
    priority = models.PositiveSmallIntegerField(default=4)
    dedup_id = models.CharField(max_length=200, blank=True)
    destination = models.CharField(max_length=210, help_text="Where it was published: queue:NAME or topic:NAME.")
    published_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class DeliveryBase(models.Model):
    """One message's state in one queue or subscription.

    `visible_at` is the next moment this row's state matters: READY → deliverable from then
    (scheduled before), LEASED → the lease deadline, ACKED → kept until then.
    """

    id = models.BigAutoField(primary_key=True)
    state = models.PositiveSmallIntegerField(choices=State.choices)
    priority = models.PositiveSmallIntegerField()  # copied from the message for the claim index
    visible_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)  # copied from the message (TTL)
    delivery_count = models.PositiveIntegerField(default=0)
    lease_token = models.CharField(max_length=32, blank=True)
    transaction_id = models.CharField(max_length=40, null=True, blank=True)
    dead_letter_reason = models.CharField(max_length=40, blank=True)

    class Meta:
        abstract = True


def _delivery_indexes(prefix: str) -> list[models.Index]:
    return [
        # Claim: the next ready messages of one queue, highest priority first, then oldest.
        models.Index(
            "queue", models.F("priority").desc(), "id", condition=Q(state=State.READY), name=f"{prefix}_ready"
        ),
        # Lease expiry: leased rows of one queue by deadline.
        models.Index(fields=["queue", "visible_at"], condition=Q(state=State.LEASED), name=f"{prefix}_leased"),
        models.Index(fields=["visible_at"], condition=Q(state=State.ACKED), name=f"{prefix}_acked"),
        models.Index(fields=["origin_queue"], condition=Q(origin_queue__isnull=False), name=f"{prefix}_origin"),
        models.Index(fields=["transaction_id"], condition=Q(transaction_id__isnull=False), name=f"{prefix}_txn"),
    ]


class Message(MessageBase):
    class Meta:
        indexes = [models.Index(fields=["published_at"], name="message_published")]


class Delivery(DeliveryBase):
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="deliveries")
    queue = models.ForeignKey(Queue, on_delete=models.CASCADE, related_name="deliveries")
    origin_queue = models.ForeignKey(
        Queue, null=True, blank=True, on_delete=models.SET_NULL, related_name="dead_letters", db_index=False
    )

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = _delivery_indexes("delivery")


class TransientMessage(MessageBase):
    """A non-durable message (UNLOGGED table on PostgreSQL)."""


class TransientDelivery(DeliveryBase):
    # No foreign-key constraint in the database (Django still cascades deletes): checking it
    # was a sixth of writing non-durable messages (docs/performance.md). Nothing can break it: a
    # delivery is inserted with its message, in one statement (broker/bulk.py) or one transaction
    # (publishing.py), or copied from a delivery of the same message locked meanwhile
    # (operator.py), and a message is deleted only once no delivery refers to it
    # (delivery._delete_deliveries). The queue's constraint stays: it is what makes a publish
    # racing a queue's deletion fail rather than leave deliveries to nowhere.
    message = models.ForeignKey(
        TransientMessage, on_delete=models.CASCADE, related_name="deliveries", db_constraint=False
    )
    queue = models.ForeignKey(Queue, on_delete=models.CASCADE, related_name="transient_deliveries")
    origin_queue = models.ForeignKey(
        Queue, null=True, blank=True, on_delete=models.SET_NULL, related_name="transient_dead_letters", db_index=False
    )

    class Meta:
        verbose_name_plural = "transient deliveries"
        indexes = _delivery_indexes("tdelivery")


class DedupRecord(models.Model):
    """A dedup_id seen on a destination, and the id of the first message published with it."""

    destination = models.CharField(max_length=210)
    dedup_id = models.CharField(max_length=200)
    message_id = models.CharField(max_length=40, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["destination", "dedup_id"], name="dedup_unique")]
        indexes = [models.Index(fields=["created_at"], name="dedup_created")]


class TxState(models.TextChoices):
    OPEN = "open"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class Transaction(models.Model):
    """Staged work: deliveries carrying this id (STAGED publishes, LEASED acks)."""

    id = models.CharField(max_length=40, primary_key=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    state = models.CharField(max_length=20, choices=TxState.choices, default=TxState.OPEN)
    created_at = models.DateTimeField()
    last_activity_at = models.DateTimeField()
    prepared_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["state", "last_activity_at"], name="txn_state")]

    def __str__(self) -> str:
        return self.id


class ApiToken(models.Model):
    """An API token. Only its SHA-256 is stored; the token itself is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="default")
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} / {self.name} ({self.prefix}…)"


class Consumer(models.Model):
    """A live push consumer (WebSocket or STOMP subscription), for stats and the console."""

    connection = models.CharField(max_length=200)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.CASCADE)
    queue = models.ForeignKey(Queue, on_delete=models.CASCADE, related_name="consumers")
    protocol = models.CharField(max_length=20)
    prefetch = models.PositiveIntegerField()
    unacked = models.PositiveIntegerField(default=0)
    connected_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["heartbeat_at"], name="consumer_heartbeat")]


class RuleKind(models.TextChoices):
    ANY = "any"
    QUEUE = "queue"
    TOPIC = "topic"


class AccessRule(models.Model):
    """Grants a user or a group actions on destinations whose names match `pattern`.

    Patterns follow RabbitMQ/Artemis topic wildcards on dot-separated words: `*` matches exactly
    one word, `#` zero or more words (`orders.*`, `orders.#`, `#`). Admins need no rules; a user
    without any matching rule may do nothing (messaging/access.py).
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="access_rules"
    )
    group = models.ForeignKey(
        "auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="access_rules"
    )
    kind = models.CharField(max_length=10, choices=RuleKind.choices, default=RuleKind.ANY)
    pattern = models.CharField(max_length=200, help_text="e.g. orders.*, orders.#, # (everything)")
    send = models.BooleanField(default=False)
    consume = models.BooleanField(default=False)
    browse = models.BooleanField(default=False)
    manage = models.BooleanField(default=False, help_text="create, delete, purge, redrive")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False, group__isnull=True) | Q(user__isnull=True, group__isnull=False),
                name="access_rule_user_xor_group",
            )
        ]

    def __str__(self) -> str:
        who = f"user {self.user}" if self.user_id else f"group {self.group}"
        granted = [a for a in ("send", "consume", "browse", "manage") if getattr(self, a)]
        return f"{who}: {', '.join(granted) or 'nothing'} on {self.kind} {self.pattern}"
