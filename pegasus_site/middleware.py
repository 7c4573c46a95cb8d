"""Security headers Django 5.2 does not set by itself."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

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


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Adds a Content-Security-Policy to every console response.

    A MiddlewareMixin, so it runs in async mode too: one sync-only middleware would make Django
    run every async view (REST long polls) inside a worker thread for its whole duration.
    """

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if request.path.startswith("/console/") and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = CONSOLE_CSP
        return response
