from __future__ import annotations

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    verbose_name = "Messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from messaging import tokens
        from messaging.models import ApiToken

        # A token or user changed in this process: authenticated tokens are looked up afresh.
        for model in (ApiToken, get_user_model()):
            for signal in (post_save, post_delete):
                uid = f"tokens-{model.__name__}-{id(signal)}"
                signal.connect(tokens.forget_on_change, sender=model, dispatch_uid=uid)
