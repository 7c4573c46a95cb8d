"""Stores, value types and validation shared by every broker operation."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import OperationalError, connection, transaction
from django.db.models import QuerySet

from messaging import clock, conf
from messaging.exceptions import (
    InvalidName,
    InvalidRequest,
    MessageTooLarge,
    TransactionNotFound,
    TransactionStateError,
)
from messaging.models import (
    NAME_PATTERN,
    Delivery,
    ExpiredAction,
    Message,
    Queue,
    Transaction,
    TransientDelivery,
    TransientMessage,
)

_NAME_RE = re.compile(NAME_PATTERN)
MAX_DELAY_SECONDS = 7 * 24 * 3600
MAX_HEADERS = 100


# --------------------------------------------------------------------------- transactions


@contextmanager
def atomic() -> Iterator[None]:
    """`transaction.atomic()` that never drops its work in silence: every broker operation runs
    in one, because its caller confirms what it did (201, `ok`, a receipt) once it returns.

    Django ends a block WITHOUT an exception, rolling it back, when a failure inside it was
    caught after it doomed the transaction: a nested block whose savepoint could not be rolled
    back (the connection died: pg_terminate_backend, a PostgreSQL crash) or a connection closed
    inside it. Its caller would then confirm work that was never committed (the PostgreSQL
    restart fault test caught a publish answered 201 and lost that way, tests/faults). Here
    such a block raises OperationalError instead (503 with Retry-After over REST)."""
    with transaction.atomic():
        yield
        if connection.needs_rollback or connection.closed_in_transaction:
            raise OperationalError("The database connection failed inside the transaction; nothing was done.")


_one_statement = threading.local()


@contextmanager
def one_statement() -> Iterator[None]:
    """In place of atomic() around work that writes with exactly ONE statement (a plain publish
    to one store on PostgreSQL: broker/bulk.py insert_messages), outside any transaction. The
    statement runs in autocommit, which makes it its own transaction: PostgreSQL commits it
    (and flushes the WAL) before it answers, one round trip instead of three (BEGIN, the
    statement, COMMIT: docs/performance.md item 25). An error the server reports means
    nothing was written; a connection lost under the statement leaves that unknown.

    Whoever enters it must make sure that the work is that one statement (reads before it are
    fine: under READ COMMITTED each statement of a transaction sees its own snapshot anyway),
    and that every on_commit callback is registered after it: with no transaction open, Django
    runs them at once."""
    assert may_be_one_statement()
    _one_statement.active = True
    try:
        yield
    finally:
        _one_statement.active = False


def may_be_one_statement() -> bool:
    """Could work on this connection run as one_statement() now: PostgreSQL, in autocommit, and
    no transaction open? (The caller still decides whether its work is one statement.)"""
    return connection.vendor == "postgresql" and not connection.in_atomic_block and connection.get_autocommit()


def in_one_statement() -> bool:
    """Inside one_statement() on this thread: its statement is the transaction."""
    return getattr(_one_statement, "active", False)


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class Store:
    """Where a message lives: durable (logged) or transient (UNLOGGED on PostgreSQL)."""

    code: str
    message: type[Any]  # Message or TransientMessage (Any: the two share fields, not a base manager)
    delivery: type[Any]  # Delivery or TransientDelivery

    def public_id(self, pk: int) -> str:
        return str(pk) if self is DURABLE else f"t{pk}"

    def deliveries(self) -> QuerySet[Any]:
        return self.delivery.objects.all()  # type: ignore[no-any-return]


DURABLE = Store("d", Message, Delivery)
TRANSIENT = Store("t", TransientMessage, TransientDelivery)
STORES = (DURABLE, TRANSIENT)


def ANY_QUEUE(queue: Queue) -> bool:
    """An `authorize` for ack/nack/extend that allows every queue (admins)."""
    return True


def store_for(durable: bool) -> Store:
    return DURABLE if durable else TRANSIENT


# --------------------------------------------------------------------------- values


@dataclass
class OutgoingMessage:
    """A message as a publisher sends it. Validated by `validate_message`."""

    body: str
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    durable: bool = True
    priority: int = 4
    delay_seconds: float = 0
    ttl_seconds: float | None = None
    dedup_id: str | None = None


@dataclass
class PublishResult:
    id: str
    duplicate: bool


@dataclass
class ReceivedMessage:
    id: str
    body: str
    content_type: str
    headers: dict[str, str]
    priority: int
    durable: bool
    published_at: datetime
    expires_at: datetime | None
    destination: str
    receipt: str
    delivery_count: int
    redelivered: bool


@dataclass
class QueueSettings:
    """Settings a queue or subscription may be created with; None means "the default"."""

    max_deliveries: int | None = None
    visibility_timeout_seconds: int | None = None
    dead_letter_queue: str | None = None
    dedup_window_seconds: int | None = None
    max_message_bytes: int | None = None
    expired_action: str | None = None


# --------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidName(f"Invalid name {str(name)[:50]!r}: names match {NAME_PATTERN}.")
    return name


def validate_message(msg: OutgoingMessage, *, max_bytes: int) -> None:
    if not isinstance(msg.body, str):
        raise InvalidRequest("body must be a string (binary as base64 with content_type).")
    if len(msg.body.encode("utf-8", "surrogatepass")) > max_bytes:
        raise MessageTooLarge(f"Message body is larger than {max_bytes} bytes.")
    if "\x00" in msg.body:
        raise InvalidRequest("body may not contain NUL characters; send binary as base64.")
    if not isinstance(msg.headers, dict) or len(msg.headers) > MAX_HEADERS:
        raise InvalidRequest(f"headers must be an object of at most {MAX_HEADERS} strings.")
    for key, value in msg.headers.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or len(key) > 200:
            raise InvalidRequest("headers map non-empty names to string values.")
        if "\x00" in key or "\x00" in value:
            raise InvalidRequest("headers may not contain NUL characters.")
    if isinstance(msg.priority, bool) or not isinstance(msg.priority, int) or not 0 <= msg.priority <= 9:
        raise InvalidRequest("priority is an integer from 0 to 9.")
    if not 0 <= msg.delay_seconds <= MAX_DELAY_SECONDS:
        raise InvalidRequest(f"delay_seconds is between 0 and {MAX_DELAY_SECONDS}.")
    if msg.ttl_seconds is not None and not 0 < msg.ttl_seconds <= 365 * 24 * 3600:
        raise InvalidRequest("ttl_seconds must be positive (at most a year).")
    if msg.dedup_id is not None and not (isinstance(msg.dedup_id, str) and 0 < len(msg.dedup_id) <= 200):
        raise InvalidRequest("dedup_id is a string of 1 to 200 characters.")
    if len(msg.content_type) > 200:
        raise InvalidRequest("content_type is at most 200 characters.")


def _positive(value: int | None, what: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise InvalidRequest(f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer.")


def _validate_settings(s: QueueSettings) -> None:
    _positive(s.max_deliveries, "max_deliveries")
    _positive(s.visibility_timeout_seconds, "visibility_timeout_seconds")
    _positive(s.dedup_window_seconds, "dedup_window_seconds", allow_zero=True)
    _positive(s.max_message_bytes, "max_message_bytes")
    if s.visibility_timeout_seconds is not None and s.visibility_timeout_seconds > 12 * 3600:
        raise InvalidRequest("visibility_timeout_seconds is at most 43200 (12 hours).")
    if s.max_message_bytes is not None and s.max_message_bytes > conf.get().max_request_bytes:
        raise InvalidRequest("max_message_bytes may not exceed the server's request size limit.")
    if s.expired_action is not None and s.expired_action not in ExpiredAction.values:
        raise InvalidRequest(f"expired_action is one of {', '.join(ExpiredAction.values)}.")
    if s.dead_letter_queue is not None:
        validate_name(s.dead_letter_queue)


def _touch(queue: Queue) -> None:
    if queue.expires_after_seconds:
        queue.expires_at = clock.now() + timedelta(seconds=queue.expires_after_seconds)
        Queue.objects.filter(pk=queue.pk).update(expires_at=queue.expires_at)


def _user_or_none(user: Any) -> Any:
    return user if user is not None and getattr(user, "pk", None) is not None else None


def _lock_transaction(transaction_id: str, *, user: Any, states: Iterable[str]) -> Transaction:
    """Lock a transaction row of this user (admins: any) that is in one of `states`."""
    txn = Transaction.objects.select_for_update().filter(pk=str(transaction_id)[:40]).first()
    if txn is None or not _may_use(txn, user):
        raise TransactionNotFound(f"Transaction {str(transaction_id)[:40]!r} does not exist.")
    if txn.state not in states:
        raise TransactionStateError(f"Transaction is {txn.state}.")
    txn.last_activity_at = clock.now()
    Transaction.objects.filter(pk=txn.pk).update(last_activity_at=txn.last_activity_at)
    return txn


def _may_use(txn: Transaction, user: Any) -> bool:
    if user is None or getattr(user, "is_superuser", False):
        return True
    return txn.owner_id == getattr(user, "pk", None)
