"""REST request (XIn) and response (XOut) schemas of /api/v1 (docs/API.md, docs/rest.md).

Inputs are strict (no silent coercion of "5" to 5 or of 1 to true) and refuse unknown fields,
so a misspelt option is an error instead of being ignored. Strings refuse NUL characters and
lone surrogates, which no database column can store. Limits that the broker enforces with a
specific error code (batch size, message size, name rule) are left to the broker, so clients get
that code; bounds that only protect the database (integer ranges) are checked here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from ninja import Field, Schema
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from messaging import broker
from messaging.models import NAME_PATTERN

MAX_INT = 2**31 - 1
MAX_LEASE_SECONDS = 12 * 3600
MAX_WAIT_SECONDS = 20


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("lone surrogates are not allowed (send valid UTF-8)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=200)]
Receipt = Annotated[Text, Field(max_length=200)]


# Inputs and the per-message outputs are plain pydantic models: ninja's Schema wraps every object
# it validates in a DjangoGetter (for ORM objects), a third of a 100-message publish's CPU.
class In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Out(BaseModel):
    """An output built from dicts and dataclasses, never from ORM objects."""

    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- errors


class ErrorDetail(Schema):
    code: str = Field(description="snake_case, e.g. queue_not_found")
    message: str


class ErrorOut(Schema):
    error: ErrorDetail


# --------------------------------------------------------------------------- queues and topics


class SettingsIn(In):
    """Settings of a queue or subscription; each defaults to the server's default."""

    max_deliveries: int | None = Field(None, ge=1, le=10_000)
    visibility_timeout_seconds: int | None = Field(None, ge=1, le=MAX_LEASE_SECONDS)
    dead_letter_queue: Name | None = None
    dedup_window_seconds: int | None = Field(None, ge=0, le=30 * 24 * 3600)
    max_message_bytes: int | None = Field(None, ge=1, le=MAX_INT)
    expired_action: Literal["drop", "dead_letter"] | None = None

    def queue_settings(self) -> broker.QueueSettings:
        return broker.QueueSettings(
            max_deliveries=self.max_deliveries,
            visibility_timeout_seconds=self.visibility_timeout_seconds,
            dead_letter_queue=self.dead_letter_queue,
            dedup_window_seconds=self.dedup_window_seconds,
            max_message_bytes=self.max_message_bytes,
            expired_action=self.expired_action,
        )


class QueueIn(SettingsIn):
    name: Name


class StatsOut(Schema):
    depth: int = Field(description="ready to deliver now")
    in_flight: int = Field(description="leased to a consumer")
    scheduled: int = Field(description="delayed, or nacked with a delay")
    dead_lettered: int = Field(description="dead letters that came from here")
    consumers: int
    oldest_age_seconds: float


class QueueOut(StatsOut):
    name: str
    max_deliveries: int
    visibility_timeout_seconds: int
    dead_letter_queue: str | None
    dedup_window_seconds: int
    max_message_bytes: int
    expired_action: str
    paused: bool
    created_at: datetime


class QueueListOut(Schema):
    queues: list[QueueOut]


class TopicIn(In):
    name: Name


class TopicOut(Schema):
    name: str
    created_at: datetime
    subscriptions: list[str]


class TopicListOut(Schema):
    topics: list[TopicOut]


FilterCondition = Text | bool | Annotated[list[Text], Field(min_length=1)]


class SubscriptionIn(SettingsIn):
    name: Name
    durable: bool = True
    filter: dict[Text, FilterCondition] | None = Field(
        None, description="Header filter: {header: value | [values] | true | false}; see docs/filters.md"
    )
    expires_after_seconds: int | None = Field(
        None, ge=1, le=30 * 24 * 3600, description="Non-durable only: deleted after this long without a receive"
    )


class SubscriptionOut(QueueOut):
    topic: str
    durable: bool
    filter: dict[str, Any] | None
    expires_after_seconds: int | None
    expires_at: datetime | None


class SubscriptionListOut(Schema):
    subscriptions: list[SubscriptionOut]


class PurgedOut(Schema):
    purged: int


class RedriveIn(In):
    max_messages: int | None = Field(None, ge=1, le=MAX_INT)


class MovedOut(Schema):
    moved: int


# --------------------------------------------------------------------------- messages


class _MessageFields(In):
    body: Text | None = None
    content_type: Text = Field("", max_length=200)
    headers: dict[Text, Text] = Field(default_factory=dict)
    durable: bool = True
    priority: int = Field(4, ge=0, le=9)
    delay_seconds: float = Field(0, ge=0, le=broker.MAX_DELAY_SECONDS, allow_inf_nan=False)
    ttl_seconds: float | None = Field(None, gt=0, le=365 * 24 * 3600, allow_inf_nan=False)
    dedup_id: Text | None = Field(None, min_length=1, max_length=200)

    def outgoing(self) -> broker.OutgoingMessage:
        return broker.OutgoingMessage(
            body=self.body or "",
            headers=dict(self.headers),
            content_type=self.content_type,
            durable=self.durable,
            priority=self.priority,
            delay_seconds=self.delay_seconds,
            ttl_seconds=self.ttl_seconds,
            dedup_id=self.dedup_id,
        )


class MessageIn(_MessageFields):
    body: Text = Field(description="text; binary as base64 with content_type")


class PublishIn(_MessageFields):
    """One message (its fields at the top level) or a batch (`messages`), all or nothing."""

    messages: list[MessageIn] | None = Field(None, description="a batch of at most 1000 messages")
    transaction: Text | None = Field(None, max_length=40, description="stage the publish in this transaction")

    @model_validator(mode="after")
    def _one_message_or_a_batch(self) -> PublishIn:
        single = self.model_fields_set - {"messages", "transaction"}
        if self.messages is None and self.body is None:
            raise ValueError("send one message (body, ...) or a batch (messages)")
        if self.messages is not None and single:
            raise ValueError(f"send either a batch (messages) or one message's fields, not both: {sorted(single)}")
        return self

    def outgoing_messages(self) -> list[broker.OutgoingMessage]:
        if self.messages is not None:
            return [m.outgoing() for m in self.messages]
        return [self.outgoing()]


class PublishedOut(Out):
    id: str
    duplicate: bool


class PublishOut(Out):
    messages: list[PublishedOut]


class ReceiveIn(In):
    max_messages: int = Field(1, ge=1, le=1000)
    wait_seconds: float = Field(0, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)
    visibility_timeout_seconds: int | None = Field(None, ge=1, le=MAX_LEASE_SECONDS)
    ack: list[Receipt] | None = Field(
        None,
        max_length=1000,
        description="receipts to acknowledge first, in the same commit as the lease (one request "
        "instead of an /ack and a receive); their statuses come back in `acked`",
    )


class ReceivedOut(Out):
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


class ReceiptResultOut(Out):
    receipt: str
    status: Literal["ok", "stale_receipt"]


class ReceiveOut(Out):
    messages: list[ReceivedOut]
    acked: list[ReceiptResultOut] | None = Field(
        None, description="only when the request carried `ack`: one status per receipt, in its order"
    )


class BrowsedOut(Out):
    id: str
    cursor: str = Field(description="pass as `after` to get the rows after this one")
    state: str
    body: str
    content_type: str
    headers: dict[str, str]
    priority: int
    durable: bool
    delivery_count: int
    published_at: datetime
    visible_at: datetime
    expires_at: datetime | None
    dead_letter_reason: str


class BrowseOut(Out):
    messages: list[BrowsedOut]
    next: str | None = Field(description="`after` for the next page; null on the last page")


# --------------------------------------------------------------------------- ack, nack, extend


class AckIn(In):
    receipts: list[Receipt] = Field(min_length=1, max_length=1000)
    transaction: Text | None = Field(None, max_length=40)


class NackIn(In):
    receipts: list[Receipt] = Field(min_length=1, max_length=1000)
    delay_seconds: float = Field(0, ge=0, le=broker.MAX_DELAY_SECONDS, allow_inf_nan=False)


class ExtendIn(In):
    receipts: list[Receipt] = Field(min_length=1, max_length=1000)
    visibility_timeout_seconds: int = Field(ge=1, le=MAX_LEASE_SECONDS)


class ResultsOut(Out):
    results: list[ReceiptResultOut]


# --------------------------------------------------------------------------- transactions


class TransactionOut(Schema):
    id: str
    state: Literal["open", "prepared", "committed", "rolled_back"]
    created_at: datetime
    last_activity_at: datetime
    prepared_at: datetime | None
    finished_at: datetime | None


class TransactionListOut(Schema):
    transactions: list[TransactionOut]
