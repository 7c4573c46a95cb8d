"""The broker's one error hierarchy. Each error carries the contract's code and HTTP status;
pegasus_site/api.py maps them to JSON once, the WebSocket and STOMP adapters to error frames."""

from __future__ import annotations

from django.db import InterfaceError, OperationalError

# What a lost or restarting database raises (Django's wrappers of psycopg's errors): answered as
# Unavailable, 503 over REST and `unavailable` over WebSocket and STOMP.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


class BrokerError(Exception):
    """Broker error."""

    code = "broker_error"
    status = 400
    retry_after: float | None = None  # seconds; sent as Retry-After (429, 503)

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(self.message)


class InvalidRequest(BrokerError):
    """The request is not valid."""

    code = "invalid_request"


class InvalidName(InvalidRequest):
    """Names match ^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$."""

    code = "invalid_name"


class InvalidFilter(InvalidRequest):
    """The subscription filter is not valid."""

    code = "invalid_filter"


class BatchTooLarge(InvalidRequest):
    """Too many messages in one batch."""

    code = "batch_too_large"


class NotAuthenticated(BrokerError):
    """Missing or invalid credentials."""

    code = "not_authenticated"
    status = 401


class PermissionDenied(BrokerError):
    """Not permitted."""

    code = "permission_denied"
    status = 403


class NotFound(BrokerError):
    """Not found."""

    code = "not_found"
    status = 404


class QueueNotFound(NotFound):
    """No such queue."""

    code = "queue_not_found"


class TopicNotFound(NotFound):
    """No such topic."""

    code = "topic_not_found"


class SubscriptionNotFound(NotFound):
    """No such subscription."""

    code = "subscription_not_found"


class TransactionNotFound(NotFound):
    """No such transaction."""

    code = "transaction_not_found"


class Conflict(BrokerError):
    """Conflict."""

    code = "conflict"
    status = 409


class NameTaken(Conflict):
    """That name is taken, with other settings."""

    code = "name_taken"


class StaleReceipt(Conflict):
    """The receipt's lease has expired or was superseded; nothing was changed."""

    code = "stale_receipt"


class TransactionStateError(Conflict):
    """The transaction is not in a state that allows this."""

    code = "transaction_state"


class DuplicatePending(Conflict):
    """This dedup_id belongs to a message staged in a transaction that has not finished; retry."""

    code = "duplicate_pending"


class MessageTooLarge(BrokerError):
    """The message is larger than the destination allows."""

    code = "message_too_large"
    status = 413


class OverQuota(BrokerError):
    """Over quota; retry later."""

    code = "over_quota"
    status = 429


class Unavailable(BrokerError):
    """The database is unavailable; retry shortly."""

    code = "unavailable"
    status = 503
    retry_after = 1.0


def as_broker_error(exc: BrokerError | OperationalError | InterfaceError) -> BrokerError:
    """The error an adapter answers: a BrokerError as it is, the database away as Unavailable
    (the operation changed nothing, so the client may send it again)."""
    return exc if isinstance(exc, BrokerError) else Unavailable()
