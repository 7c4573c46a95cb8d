from __future__ import annotations

from collections.abc import Callable

from django.apps import AppConfig
from django.db.models import Model


class MessagingConfig(AppConfig):
    name = "messaging"
    verbose_name = "Messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from messaging import tokens
        from messaging.broker import destinations
        from messaging.models import ApiToken, Queue

        # A token or user changed in this process: authenticated tokens are looked up afresh;
        # a queue changed: publishes look it up afresh (broker.get_queue(recent_ok=True)).
        forget: list[tuple[Callable[..., None], type[Model]]] = [
            (tokens.forget_on_change, ApiToken),
            (tokens.forget_on_change, get_user_model()),
            (destinations.forget_recent_queues, Queue),
        ]
        for receiver, model in forget:
            for signal in (post_save, post_delete):
                uid = f"forget-{model.__name__}-{id(signal)}"
                signal.connect(receiver, sender=model, dispatch_uid=uid)
