"""The console's own tables: the audit log of operator actions and the publish/deliver/ack rates."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class AuditEntry(models.Model):
    """One operator action: who did what to which destination, when, and to how many messages."""

    at = models.DateTimeField(db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, help_text="Kept if the user is deleted.")
    action = models.CharField(max_length=40, db_index=True)
    target = models.CharField(max_length=420, blank=True, help_text="Queue, TOPIC/SUBSCRIPTION or transaction.")
    messages = models.PositiveIntegerField(null=True, blank=True, help_text="How many messages it changed.")
    outcome = models.CharField(max_length=40, default="ok", help_text="ok, or the error code it failed with.")
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action} {self.target}"


class RateSample(models.Model):
    """Events counted in one time bucket for one scope: "broker", "queue:<pk>" or "topic:<pk>".

    Each server process adds its in-memory counts (messaging/metrics.py) every few seconds.
    """

    bucket = models.DateTimeField(help_text="Start of the bucket.")
    scope = models.CharField(max_length=40)
    published = models.PositiveBigIntegerField(default=0)
    delivered = models.PositiveBigIntegerField(default=0)
    acked = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "bucket"], name="rate_sample_unique")]
        indexes = [models.Index(fields=["bucket"], name="rate_sample_bucket")]

    def __str__(self) -> str:
        return f"{self.scope} @ {self.bucket:%H:%M:%S}"
