"""A bridge's configuration (edited by operators) and its live state (written by its runner).

They are two tables on purpose: the console saving a bridge form must never overwrite the
counters its runner is updating at the same time.
"""

from __future__ import annotations

import uuid

from django.db import models

from messaging.models import NAME_PATTERN


class TargetKind(models.TextChoices):
    QUEUE = "queue"
    TOPIC = "topic"


class Bridge(models.Model):
    """Forward `source` (a local queue, or a durable subscription when `source_topic` is set)
    to the queue or topic `target_name` of the Pegasus server at `target_url`."""

    name = models.CharField(max_length=200, unique=True, help_text=f"Matches {NAME_PATTERN}.")
    # Part of every dedup_id sent to the target: unique across servers, unlike the row id.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    source_topic = models.CharField(max_length=200, blank=True, help_text="Blank: the source is a queue.")
    source_name = models.CharField(max_length=200, help_text="The queue, or the durable subscription of source_topic.")
    target_url = models.CharField(max_length=500, help_text="Base URL of the other server; see PEGASUS_BRIDGE_TARGETS.")
    target_kind = models.CharField(max_length=10, choices=TargetKind.choices, default=TargetKind.QUEUE)
    target_name = models.CharField(max_length=200)
    # Write-only: never rendered by the API or the console, never logged.
    target_token = models.CharField(max_length=500)
    batch_size = models.PositiveIntegerField(default=100)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name

    @property
    def source_label(self) -> str:
        return f"{self.source_topic}/{self.source_name}" if self.source_topic else self.source_name

    @property
    def target_label(self) -> str:
        return f"{self.target_url.rstrip('/')} {self.target_kind} {self.target_name}"


class LinkStatus(models.TextChoices):
    WAITING = "waiting", "waiting for a runner"
    CONNECTED = "connected"
    RETRYING = "retrying"
    STOPPED = "stopped"


class BridgeState(models.Model):
    bridge = models.OneToOneField(Bridge, primary_key=True, on_delete=models.CASCADE, related_name="state")
    status = models.CharField(max_length=20, choices=LinkStatus.choices, default=LinkStatus.WAITING)
    forwarded_count = models.BigIntegerField(default=0, help_text="Messages the target confirmed and we acked.")
    duplicate_count = models.BigIntegerField(default=0, help_text="Of those, answered duplicate: a harmless retry.")
    retry_count = models.BigIntegerField(default=0, help_text="Failed attempts, each retried after a backoff.")
    last_error = models.CharField(max_length=500, blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    runner = models.CharField(max_length=200, blank=True, help_text="host:pid of the process forwarding it.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Receipts of the batch being forwarded: a runner taking over releases them first, so the
    # batch goes out again before anything newer (order) instead of after its lease lapses.
    pending_receipts = models.JSONField(default=list, blank=True)

    def __str__(self) -> str:
        return f"{self.bridge_id}: {self.status}"
