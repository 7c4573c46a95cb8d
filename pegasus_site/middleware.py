"""Security headers Django 5.2 does not set by itself."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

# No inline scripts anywhere in the console (console/static/console/console.js is a file), so
# script-src is 'self' only: an injected <script> or on* attribute cannot run. Styles may be
# inline (Django admin widgets and the SVG charts use style attributes).
CONSOLE_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware:
    """Adds a Content-Security-Policy to every console response."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path.startswith("/console/") and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = CONSOLE_CSP
        return response
