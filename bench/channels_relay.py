"""The latency floor on Pegasus's own WebSocket stack: a relay written as a Django Channels
consumer, served by daphne (`daphne bench.channels_relay:application`; bench.daphne_ceiling
starts it).

It does what bench.daphne_ceiling's bare relay does (each frame of /publisher pushed to every
/consumer and confirmed to the publisher; under /durable/, committed first with one INSERT on
an async psycopg connection on the event loop), but through what a live consumer of Pegasus
must run on: Django's settings, channels' URLRouter and an AsyncWebsocketConsumer, with the
same dispatch as Pegasus's consumers (messaging/consumers.py: no database hop before each
frame). No authentication, no broker, no thread: the least a channels consumer costs.
"""

from __future__ import annotations

import json
from typing import Any

import django
from django.conf import settings

if not settings.configured:  # its own process, with no Pegasus settings
    settings.configure(INSTALLED_APPS=[], DATABASES={}, USE_TZ=True)
    django.setup()

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import URLRouter
from django.urls import re_path

from bench.daphne_ceiling import commit, database, pushed_and_confirm
from pegasus_site.gc_tuning import settle_garbage_collector

_consumers: list[Relay] = []


class Relay(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def dispatch(self, message: dict[str, Any]) -> None:
        """As messaging.consumers.JsonConsumer.dispatch: no aclose_old_connections() hop."""
        await getattr(self, get_handler_name(message))(message)

    async def connect(self) -> None:
        if self.scope["path"].startswith("/durable/"):
            await database()
        await self.accept()
        if self.scope["path"].endswith("/consumer"):
            _consumers.append(self)

    async def disconnect(self, code: int) -> None:
        if self in _consumers:
            _consumers.remove(self)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self in _consumers or text_data is None:
            return
        frame = json.loads(text_data)
        message = frame["messages"][0]
        ids = await commit([message["body"]]) if self.scope["path"].startswith("/durable/") else [1]
        pushed, confirm = pushed_and_confirm(frame, ids[0])
        for consumer in _consumers:
            await consumer.send(text_data=pushed)
        await self.send(text_data=confirm)


application = URLRouter([re_path(r"^(durable/)?(publisher|consumer)$", Relay.as_asgi())])
settle_garbage_collector()  # as pegasus_site/asgi.py does: full collections skip start-up's objects
