"""ASGI entry point: HTTP to Django, WebSocket to messaging.routing (served by daphne)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pegasus_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from messaging import maintenance, routing  # noqa: E402

maintenance.start_in_background()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": routing.origin_checked(URLRouter(routing.websocket_urlpatterns)),
    }
)
