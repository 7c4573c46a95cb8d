"""The REST API at /api/v1: the NinjaAPI, bearer-token auth, and the ONE exception→HTTP mapping.

Every error leaves as the contract's `{"error": {"code", "message"}}` with a fitting status:
broker errors carry their own code and status (messaging/exceptions.py); ninja's validation
errors become 400 (not ninja's default 422 shape); database outages become 503 with Retry-After.
Views never build error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.renderers import JSONRenderer
from ninja.responses import NinjaJSONEncoder
from ninja.security import HttpBearer

from messaging import longpoll, tokens
from messaging.api import router
from messaging.bridges.api import router as bridges_router
from messaging.exceptions import DATABASE_UNAVAILABLE, BrokerError, NotAuthenticated, Unavailable

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
            return tokens.cached_user(token) or tokens.authenticate_and_remember(token)
        return authenticate_async(token)


async def authenticate_async(token: str | None) -> Any:
    """The token's user, from the per-process cache (messaging/tokens.py) or with one hop."""
    user = tokens.cached_user(token)
    if user is not None:
        return user
    return await longpoll.hop(tokens.authenticate_and_remember)(token)


# Errors any operation can answer, whatever its router declares: bad input, credentials,
# permission, unknown destination, conflict, body too large (pegasus_site/bodylimit.py),
# quota, database outage. Declared on every operation so clients and schema checkers know.
COMMON_ERRORS = {
    400: "Bad input", 401: "No or bad credentials", 403: "Not permitted", 404: "Unknown destination",
    409: "Conflict", 413: "Too large", 429: "Over quota", 503: "Database unavailable; retry after Retry-After",
}  # fmt: skip


class FastJSONRenderer(JSONRenderer):
    """ninja's JSON renderer, written by orjson (ninja's documented ORJSONRenderer pattern): the
    same JSON, a third of the time for a 100-message receive (0.16 against 0.51 ms,
    docs/performance.md). Datetimes and whatever orjson does not know go through ninja's own
    encoder, so timestamps keep Django's format; what orjson cannot write at all (an integer
    past 64 bits in a message's headers) is written by the standard library, as before."""

    _encoder = NinjaJSONEncoder()
    _options = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS

    def render(self, request: HttpRequest | None, data: Any, *, response_status: int) -> bytes:
        try:
            return orjson.dumps(data, default=self._encoder.default, option=self._options)
        except orjson.JSONEncodeError:
            return json.dumps(data, cls=NinjaJSONEncoder).encode()


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
    renderer=FastJSONRenderer(),
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


def describe_exception(exc: Exception, where: str = "") -> tuple[int, str, str, dict[str, str]]:
    """How an operation's exception is answered: (status, code, message, headers). The ninja
    handlers below and the express lane (pegasus_site/express.py) both answer with this."""
    if isinstance(exc, BrokerError):
        headers = {}
        if exc.retry_after is not None:  # 429 over quota, 503 unavailable: whole seconds, at least 1
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        if isinstance(exc, NotAuthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        return exc.status, exc.code, exc.message, headers
    if isinstance(exc, DATABASE_UNAVAILABLE):
        log.warning("database unavailable: %s", exc)
        return 503, Unavailable.code, Unavailable().message, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, DataError):
        # Input the schemas let through but the database cannot store (a NUL in a path, a number
        # out of range): the client's fault, and nothing was written (the transaction rolled back).
        log.warning("data error on %s: %s", where, exc)
        return 400, "invalid_request", "A value in the request cannot be stored.", {}
    if isinstance(exc, IntegrityError):
        # Only a race can get here (say, a queue deleted while a publish to it ran); retrying helps.
        log.warning("integrity error: %s", exc)
        return 409, "conflict", "The destination changed concurrently; retry.", {}
    log.error("unhandled error in %s", where, exc_info=exc)
    return 500, "internal_error", "Internal server error; it has been logged.", {}


@api.exception_handler(BrokerError)
@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
@api.exception_handler(DataError)
@api.exception_handler(IntegrityError)
@api.exception_handler(Exception)
def operation_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    status, code, message, headers = describe_exception(exc, f"{request.method} {request.path}")
    return error_response(request, status, code, message, headers)


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    names = any(e.get("type") == "string_pattern_mismatch" and _is_name(e) for e in exc.errors)
    return error_response(request, 400, "invalid_name" if names else "invalid_request", _describe(exc.errors))


@api.exception_handler(AuthenticationError)
def authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(request, 401, NotAuthenticated.code, AUTHENTICATE_MESSAGE, {"WWW-Authenticate": "Bearer"})


AUTHENTICATE_MESSAGE = "Send Authorization: Bearer <token> with a valid token (manage.py create_token)."


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
