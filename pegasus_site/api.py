"""The REST API at /api/v1: the NinjaAPI, bearer-token auth, and the ONE exception→HTTP mapping.

Every error leaves as the contract's `{"error": {"code", "message"}}` with a fitting status:
broker errors carry their own code and status (messaging/exceptions.py); ninja's validation
errors become 400 (not ninja's default 422 shape); database outages become 503 with Retry-After.
Views never build error JSON.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer

from messaging import longpoll, tokens
from messaging.api import router
from messaging.bridges.api import router as bridges_router
from messaging.exceptions import BrokerError, NotAuthenticated, Unavailable

log = logging.getLogger("pegasus.api")

RETRY_AFTER_SECONDS = 1


class BearerAuth(HttpBearer):
    """`Authorization: Bearer <token>` (tokens from `manage.py create_token`).

    ninja calls an auth marked is_async directly, from sync and async views alike. In a sync
    view (its own worker thread, no running loop) we look the token up right here; in an async
    view we return an awaitable that makes one database hop, so the event loop never blocks and
    the connection is closed again before a long poll starts waiting.
    """

    def __init__(self) -> None:
        super().__init__()
        self.is_async = True  # after ninja's __init__, which sets it from `authenticate`

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return tokens.authenticate(token)
        return _authenticate_async(token)


def _authenticate_async(token: str) -> Awaitable[Any]:
    return longpoll.hop(tokens.authenticate)(token)


# Errors any operation can answer, whatever its router declares: bad input, credentials,
# permission, unknown destination, conflict, body too large (pegasus_site/bodylimit.py),
# quota, database outage. Declared on every operation so clients and schema checkers know.
COMMON_ERRORS = {
    400: "Bad input", 401: "No or bad credentials", 403: "Not permitted", 404: "Unknown destination",
    409: "Conflict", 413: "Too large", 429: "Over quota", 503: "Database unavailable; retry after Retry-After",
}  # fmt: skip


class PegasusAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any) -> Any:
        schema = super().get_openapi_schema(*args, **kwargs)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        for operations in schema["paths"].values():
            for operation in operations.values():
                for status, description in COMMON_ERRORS.items():
                    operation["responses"].setdefault(status, {"description": description, "content": error})
        return schema


api = PegasusAPI(
    title="Pegasus",
    version="1",
    description="Queues and topics over REST. See docs/rest.md; errors are {error: {code, message}}.",
    auth=BearerAuth(),
    urls_namespace="api-v1",
)
api.add_router("", router)
api.add_router("/bridges", bridges_router)


# --------------------------------------------------------------------------- the error mapping


def error_response(
    request: HttpRequest, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> HttpResponse:
    response = api.create_response(request, {"error": {"code": code, "message": message}}, status=status)
    for key, value in (headers or {}).items():
        response[key] = value
    return response


@api.exception_handler(BrokerError)
def broker_error(request: HttpRequest, exc: BrokerError) -> HttpResponse:
    headers = None
    if exc.retry_after is not None:  # 429 over quota, 503 unavailable: whole seconds, at least 1
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, NotAuthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(request, exc.status, exc.code, exc.message, headers)


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    names = any(e.get("type") == "string_pattern_mismatch" and _is_name(e) for e in exc.errors)
    return error_response(request, 400, "invalid_name" if names else "invalid_request", _describe(exc.errors))


@api.exception_handler(AuthenticationError)
def authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    message = "Send Authorization: Bearer <token> with a valid token (manage.py create_token)."
    return error_response(request, 401, NotAuthenticated.code, message, {"WWW-Authenticate": "Bearer"})


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja's own 4xx, e.g. a body that is not JSON ("Cannot parse request body").
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc))


@api.exception_handler(Http404)
def not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, "not_found", "Not found.")


@api.exception_handler(RequestDataTooBig)
def request_too_large(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(request, 413, "request_too_large", "The request body is larger than the server accepts.")


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def database_unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.warning("database unavailable: %s", exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return error_response(request, 503, Unavailable.code, Unavailable().message, headers)


@api.exception_handler(DataError)
def data_error(request: HttpRequest, exc: DataError) -> HttpResponse:
    # Input the schemas let through but the database cannot store (a NUL in a path, a number
    # out of range): the client's fault, and nothing was written (the transaction rolled back).
    log.warning("data error on %s %s: %s", request.method, request.path, exc)
    return error_response(request, 400, "invalid_request", "A value in the request cannot be stored.")


@api.exception_handler(IntegrityError)
def integrity_error(request: HttpRequest, exc: IntegrityError) -> HttpResponse:
    # Only a race can get here (say, a queue deleted while a publish to it ran); retrying helps.
    log.warning("integrity error: %s", exc)
    return error_response(request, 409, "conflict", "The destination changed concurrently; retry.")


@api.exception_handler(Exception)
def server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(request, 500, "internal_error", "Internal server error; it has been logged.")


def _is_name(error: dict[str, Any]) -> bool:
    loc: tuple[Any, ...] = tuple(error.get("loc") or ())
    return bool(loc) and loc[-1] in {"name", "topic", "dead_letter_queue"}


def _describe(errors: list[dict[str, Any]]) -> str:
    """'body.messages.0.priority: Input should be less than or equal to 9; ...' (at most 5)."""
    parts = []
    for error in errors[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "payload")
        parts.append(f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more
