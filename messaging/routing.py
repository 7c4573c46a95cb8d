"""WebSocket routes (Django Channels), and the Origin check in front of them."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import path

from messaging.consumers import JsonConsumer
from messaging.stomp.consumer import StompConsumer

websocket_urlpatterns: list[Any] = [
    path("ws/v1/", JsonConsumer.as_asgi()),
    path("ws/stomp/", StompConsumer.as_asgi()),
]


class BrowserOriginValidator(OriginValidator):  # type: ignore[misc]
    """Refuse a browser page from a host not in ALLOWED_HOSTS (cross-site WebSocket hijacking).
    A client that sends no Origin at all is not a browser (stomp.py, Node, websockets): it is let
    through, and authenticates with its token like everyone else."""

    def valid_origin(self, parsed_origin: Any) -> bool:
        return parsed_origin is None or bool(self.validate_origin(parsed_origin))


def origin_checked(application: Any) -> Any:
    return BrowserOriginValidator(application, settings.ALLOWED_HOSTS)
