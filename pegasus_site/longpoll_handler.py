"""Serve the REST receive endpoints (long polls) without pinning a thread per waiting request.

Django's ASGI handler runs each request's sync work (the process_request/process_response of
every MiddlewareMixin, sync signal receivers) on a thread of its own that lives as long as the
request. For a long poll that is an idle thread per waiting client, up to 20 s each. So the
receive endpoints, and only they, go to a Django handler without the middleware stack: none of it
applies to a bearer-token JSON API (sessions, CSRF, messages, clickjacking and console headers),
and the view itself reaches the database through messaging.longpoll.hop, on a shared pool of
threads. What remains per request is one short-lived thread at the very end (response.close).
"""

from __future__ import annotations

import re
from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

RECEIVE_PATH = re.compile(r"^/api/v1/(queues/[^/]+|topics/[^/]+/subscriptions/[^/]+)/receive/?$")


class BareASGIHandler(ASGIHandler):
    """Django's ASGI handler with an empty middleware stack."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]


class LongPollRouter:
    """ASGI: receive endpoints to a bare handler, everything else to `app`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bare = BareASGIHandler()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and RECEIVE_PATH.match(scope.get("path", "")):
            return await self.bare(scope, receive, _with_security_headers(scope, send))
        return await self.app(scope, receive, send)  # type: ignore[no-any-return]


def _with_security_headers(scope: Any, send: Any) -> Any:
    """The headers the skipped SecurityMiddleware and XFrameOptionsMiddleware would have added."""
    from pegasus_site.express import security_headers

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *security_headers(scope)]}
        await send(message)

    return sending
