"""The REST interface (docs/API.md "REST", docs/rest.md): one small function per operation.

Each view checks permission through `messaging.access`, calls one broker (or queries) function
and renders the result. Errors are raised as BrokerError and mapped to HTTP once, in
pegasus_site/api.py. The receive views are async: they wait for messages without holding a
database connection or a thread (messaging/longpoll.py), and reach the database one hop at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from django.http import HttpRequest
from ninja import Path, Query, Router, Status

from messaging import access, broker, catalog, group_commit, limits, longpoll, queries, tokens
from messaging.access import Action, Kind
from messaging.models import Queue, Topic
from messaging.schemas import (
    AckIn,
    BrowseOut,
    ErrorOut,
    ExtendIn,
    MovedOut,
    NackIn,
    PublishIn,
    PublishOut,
    PurgedOut,
    QueueIn,
    QueueListOut,
    QueueOut,
    ReceiveIn,
    ReceiveOut,
    RedriveIn,
    ResultsOut,
    SubscriptionIn,
    SubscriptionListOut,
    SubscriptionOut,
    Text,
    TopicIn,
    TopicListOut,
    TopicOut,
    TransactionListOut,
    TransactionOut,
)
from messaging.schemas import Name as NameType

router = Router()

# Every operation can answer these (bad input, credentials, permission, unknown destination,
# conflict, size, quota, database outage), so every operation declares them.
ERRORS: dict[int, Any] = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 429, 503)}

Name = Annotated[NameType, Path(description="queue, topic or subscription name")]
TopicName = Annotated[NameType, Path(description="topic name")]
TransactionId = Annotated[Text, Path(max_length=40)]
BrowseState = Annotated[str | None, Query(None, pattern="^(ready|in_flight|staged|dead_lettered)$")]


def _user(request: HttpRequest) -> Any:
    return request.auth  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- rendering


def _queue_out(queue: Queue, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """A queue's settings and stats (`stats` from queries.all_queue_stats when listing many)."""
    return {
        "name": queue.name,
        "max_deliveries": queue.max_deliveries,
        "visibility_timeout_seconds": queue.visibility_timeout_seconds,
        "dead_letter_queue": queue.dead_letter_queue.name if queue.dead_letter_queue else None,
        "dedup_window_seconds": queue.dedup_window_seconds,
        "max_message_bytes": queue.max_message_bytes,
        "expired_action": queue.expired_action,
        "paused": queue.paused,
        "created_at": queue.created_at,
        **(stats if stats is not None else queries.queue_stats(queue)),
    }


def _subscription_out(sub: Queue, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **_queue_out(sub, stats),
        "topic": sub.topic.name if sub.topic else "",
        "durable": sub.durable,
        "filter": sub.filter,
        "expires_after_seconds": sub.expires_after_seconds,
        "expires_at": sub.expires_at,
    }


def _topic_out(topic: Topic) -> dict[str, Any]:
    return {"name": topic.name, "created_at": topic.created_at, "subscriptions": catalog.subscription_names(topic)}


def _results(receipts: list[str], statuses: list[str]) -> dict[str, Any]:
    broker.require_some_ok(statuses)
    return {"results": _paired(receipts, statuses)}


def _paired(receipts: list[str], statuses: list[str]) -> list[dict[str, str]]:
    return [{"receipt": r, "status": s} for r, s in zip(receipts, statuses, strict=True)]


# --------------------------------------------------------------------------- queues


@router.post("/queues", response={201: QueueOut, 200: QueueOut, **ERRORS}, tags=["queues"])
def create_queue(request: HttpRequest, payload: QueueIn) -> Status[dict[str, Any]]:
    """Create a queue (201). An existing queue with the same settings answers 200; with other settings, 409."""
    access.require(_user(request), Action.MANAGE, kind=Kind.QUEUE, name=payload.name)
    queue, created = broker.create_queue(name=payload.name, settings=payload.queue_settings(), user=_user(request))
    return Status(201 if created else 200, _queue_out(queue))


@router.get("/queues", response={200: QueueListOut, **ERRORS}, tags=["queues"])
def list_queues(request: HttpRequest) -> dict[str, Any]:
    """The queues this user may consume from, with their stats."""
    user = _user(request)
    visible = [q for q in catalog.list_queues() if access.can(user, Action.CONSUME, kind=Kind.QUEUE, name=q.name)]
    stats = queries.all_queue_stats([q.pk for q in visible])
    return {"queues": [_queue_out(q, stats[q.pk]) for q in visible]}


@router.get("/queues/{name}", response={200: QueueOut, **ERRORS}, tags=["queues"])
def get_queue(request: HttpRequest, name: Name) -> dict[str, Any]:
    """One queue with its stats: depth (ready), in_flight, scheduled, dead_lettered, consumers, oldest_age_seconds."""
    return _queue_out(access.access_queue(user=_user(request), name=name, action=Action.CONSUME))


@router.delete("/queues/{name}", response={204: None, **ERRORS}, tags=["queues"])
def delete_queue(request: HttpRequest, name: Name) -> Status[None]:
    """Delete a queue with its messages."""
    broker.delete_queue(queue=access.access_queue(user=_user(request), name=name, action=Action.MANAGE))
    return Status(204, None)


@router.post("/queues/{name}/purge", response={200: PurgedOut, **ERRORS}, tags=["queues"])
def purge_queue(request: HttpRequest, name: Name) -> dict[str, int]:
    """Remove every ready (and scheduled) message; leased ones stay with their consumers."""
    queue = access.access_queue(user=_user(request), name=name, action=Action.MANAGE)
    return {"purged": broker.purge_queue(queue=queue)}


@router.post("/queues/{name}/redrive", response={200: MovedOut, **ERRORS}, tags=["queues"])
def redrive_queue(request: HttpRequest, name: Name, payload: RedriveIn | None = None) -> dict[str, int]:
    """Move this dead-letter queue's messages back to the destinations they came from."""
    queue = access.access_queue(user=_user(request), name=name, action=Action.MANAGE)
    return {"moved": broker.redrive(queue=queue, max_messages=payload.max_messages if payload else None)}


@router.get("/queues/{name}/messages", response={200: BrowseOut, **ERRORS}, tags=["queues"])
def browse_queue(
    request: HttpRequest,
    name: Name,
    state: BrowseState = None,
    after: Annotated[Text | None, Query(None, max_length=40)] = None,
    limit: Annotated[int, Query(50, ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Messages of a queue without consuming them, oldest first; page on with `after` = the last `cursor`."""
    queue = access.access_queue(user=_user(request), name=name, action=Action.BROWSE)
    return _browse(queue, state=state, after=after, limit=limit)


def _browse(queue: Queue, *, state: str | None, after: str | None, limit: int) -> dict[str, Any]:
    rows = queries.browse(queue, state=state, after=after, limit=limit)
    return {"messages": rows, "next": rows[-1].cursor if len(rows) == limit else None}


@router.post("/queues/{name}/messages", response={201: PublishOut, **ERRORS}, tags=["messages"])
async def publish_to_queue(request: HttpRequest, name: Name, payload: PublishIn) -> Status[dict[str, Any]]:
    """Publish one message or a batch, all or nothing; 201 once durable messages are committed."""
    return Status(201, await publish_as(_user(request), Kind.QUEUE, name, payload))


@router.post("/queues/{name}/receive", response={200: ReceiveOut, **ERRORS}, tags=["messages"], exclude_unset=True)
async def receive_from_queue(request: HttpRequest, name: Name, payload: ReceiveIn | None = None) -> dict[str, Any]:
    """Lease up to max_messages; with wait_seconds, wait up to that long for the first one (long poll)."""
    return await receive_queue_as(_user(request), name, payload or ReceiveIn.model_validate({}))


# The hot operations as functions of (user, arguments): the views above and below, and the
# express lane (pegasus_site/express.py), which serves them without Django's request handling,
# call these, so both answer alike.


async def receive_queue_as(user: Any, name: str, payload: ReceiveIn) -> dict[str, Any]:
    def lookup(recent_ok: bool) -> Queue:  # a recent row will do: longpoll.receive_from
        return access.access_queue(user=user, name=name, action=Action.CONSUME, recent_ok=recent_ok)

    return await _receive(user, lookup, payload, (Kind.QUEUE, name), recent_rows=True)


async def receive_subscription_as(user: Any, topic: str, name: str, payload: ReceiveIn) -> dict[str, Any]:
    def lookup(recent_ok: bool) -> Queue:  # always afresh: subscriptions are not remembered
        return access.access_subscription(user=user, topic=topic, name=name, action=Action.CONSUME)

    return await _receive(user, lookup, payload, (Kind.TOPIC, topic), recent_rows=False)


async def _receive(
    user: Any,
    lookup: Callable[[bool], Queue],
    payload: ReceiveIn,
    published_to: tuple[Kind, str],
    *,
    recent_rows: bool,
) -> dict[str, Any]:
    """The answer has `acked` only when the request carried `ack`. Unlike /ack, all-stale acks
    are no error here: the receive's messages still come back, with the statuses beside them."""
    ack = None if payload.ack is None else longpoll.AckFirst(payload.ack, user, access.may_consume(user))
    statuses, messages = await longpoll.receive_from(
        lookup,
        max_messages=payload.max_messages,
        wait_seconds=payload.wait_seconds,
        visibility_timeout_seconds=payload.visibility_timeout_seconds,
        ack=ack,
        published_to=published_to,
        recent_rows=recent_rows,
    )
    if payload.ack is None:
        return {"messages": messages}
    return {"messages": messages, "acked": _paired(payload.ack, statuses)}


async def publish_as(user: Any, kind: Kind, name: str, payload: PublishIn) -> dict[str, Any]:
    """Async, so that concurrent publishes share one hop and one commit (messaging/group_commit.py);
    a publish inside a transaction is staged on its own."""
    messages = payload.outgoing_messages()
    limits.check_publish_rate(user=user, token_key=tokens.token_key(user), messages=len(messages))
    if payload.transaction is None:
        # A REST client waits for this answer before it publishes again: no order to keep.
        results = await group_commit.publish(user=user, kind=kind, name=name, messages=messages, ordered=False)
    else:
        results = await longpoll.hop(_publish_in_transaction)(user, kind, name, messages, payload.transaction)
    return {"messages": results}


def ack_as(user: Any, payload: AckIn) -> dict[str, Any]:
    statuses = broker.ack(
        receipts=payload.receipts, transaction_id=payload.transaction, user=user, authorize=access.may_consume(user)
    )
    return _results(payload.receipts, statuses)


# --------------------------------------------------------------------------- topics


@router.post("/topics", response={201: TopicOut, 200: TopicOut, **ERRORS}, tags=["topics"])
def create_topic(request: HttpRequest, payload: TopicIn) -> Status[dict[str, Any]]:
    """Create a topic (201); an existing one answers 200."""
    access.require(_user(request), Action.MANAGE, kind=Kind.TOPIC, name=payload.name)
    topic, created = broker.create_topic(name=payload.name, user=_user(request))
    return Status(201 if created else 200, _topic_out(topic))


@router.get("/topics", response={200: TopicListOut, **ERRORS}, tags=["topics"])
def list_topics(request: HttpRequest) -> dict[str, Any]:
    user = _user(request)
    visible = [t for t in catalog.list_topics() if access.can(user, Action.CONSUME, kind=Kind.TOPIC, name=t.name)]
    return {"topics": [_topic_out(t) for t in visible]}


@router.get("/topics/{name}", response={200: TopicOut, **ERRORS}, tags=["topics"])
def get_topic(request: HttpRequest, name: Name) -> dict[str, Any]:
    return _topic_out(access.access_topic(user=_user(request), name=name, action=Action.CONSUME))


@router.delete("/topics/{name}", response={204: None, **ERRORS}, tags=["topics"])
def delete_topic(request: HttpRequest, name: Name) -> Status[None]:
    """Delete a topic with its subscriptions and their messages."""
    broker.delete_topic(topic=access.access_topic(user=_user(request), name=name, action=Action.MANAGE))
    return Status(204, None)


@router.post("/topics/{name}/messages", response={201: PublishOut, **ERRORS}, tags=["messages"])
async def publish_to_topic(request: HttpRequest, name: Name, payload: PublishIn) -> Status[dict[str, Any]]:
    """Publish to every subscription (whose filter matches) that exists now; 201 once committed."""
    return Status(201, await publish_as(_user(request), Kind.TOPIC, name, payload))


def _publish_in_transaction(
    user: Any, kind: Kind, name: str, messages: list[broker.OutgoingMessage], transaction_id: str
) -> list[broker.PublishResult]:
    if kind is Kind.QUEUE:
        queue = access.access_queue(user=user, name=name, action=Action.SEND)
        return broker.publish(queue=queue, messages=messages, transaction_id=transaction_id, user=user)
    topic = access.access_topic(user=user, name=name, action=Action.SEND)
    return broker.publish(topic=topic, messages=messages, transaction_id=transaction_id, user=user)


# --------------------------------------------------------------------------- subscriptions


@router.post(
    "/topics/{topic}/subscriptions", response={201: SubscriptionOut, 200: SubscriptionOut, **ERRORS}, tags=["topics"]
)
def create_subscription(request: HttpRequest, topic: TopicName, payload: SubscriptionIn) -> Status[dict[str, Any]]:
    """Create a subscription (201; the same one again answers 200), for users who may consume
    from the topic. A non-durable one is deleted after expires_after_seconds (default 300)
    without a receive."""
    user = _user(request)
    sub, created = broker.create_subscription(
        topic=access.access_topic(user=user, name=topic, action=Action.CONSUME),
        name=payload.name,
        durable=payload.durable,
        filter=payload.filter,
        expires_after_seconds=payload.expires_after_seconds,
        settings=payload.queue_settings(),
        owner="" if payload.durable else f"rest:{user.pk}",
        user=user,
    )
    return Status(201 if created else 200, _subscription_out(sub))


@router.get("/topics/{topic}/subscriptions", response={200: SubscriptionListOut, **ERRORS}, tags=["topics"])
def list_subscriptions(request: HttpRequest, topic: TopicName) -> dict[str, Any]:
    t = access.access_topic(user=_user(request), name=topic, action=Action.CONSUME)
    subs = catalog.list_subscriptions(t)
    stats = queries.all_queue_stats([s.pk for s in subs])
    return {"subscriptions": [_subscription_out(s, stats[s.pk]) for s in subs]}


@router.get("/topics/{topic}/subscriptions/{name}", response={200: SubscriptionOut, **ERRORS}, tags=["topics"])
def get_subscription(request: HttpRequest, topic: TopicName, name: Name) -> dict[str, Any]:
    sub = access.access_subscription(user=_user(request), topic=topic, name=name, action=Action.CONSUME)
    return _subscription_out(sub)


@router.delete("/topics/{topic}/subscriptions/{name}", response={204: None, **ERRORS}, tags=["topics"])
def delete_subscription(request: HttpRequest, topic: TopicName, name: Name) -> Status[None]:
    sub = access.access_subscription(user=_user(request), topic=topic, name=name, action=Action.CONSUME)
    broker.delete_queue(queue=sub)
    return Status(204, None)


@router.post("/topics/{topic}/subscriptions/{name}/purge", response={200: PurgedOut, **ERRORS}, tags=["topics"])
def purge_subscription(request: HttpRequest, topic: TopicName, name: Name) -> dict[str, int]:
    sub = access.access_subscription(user=_user(request), topic=topic, name=name, action=Action.MANAGE)
    return {"purged": broker.purge_queue(queue=sub)}


@router.get("/topics/{topic}/subscriptions/{name}/messages", response={200: BrowseOut, **ERRORS}, tags=["topics"])
def browse_subscription(
    request: HttpRequest,
    topic: TopicName,
    name: Name,
    state: BrowseState = None,
    after: Annotated[Text | None, Query(None, max_length=40)] = None,
    limit: Annotated[int, Query(50, ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    sub = access.access_subscription(user=_user(request), topic=topic, name=name, action=Action.BROWSE)
    return _browse(sub, state=state, after=after, limit=limit)


@router.post(
    "/topics/{topic}/subscriptions/{name}/receive",
    response={200: ReceiveOut, **ERRORS},
    tags=["messages"],
    exclude_unset=True,  # `acked` only when asked for
)
async def receive_from_subscription(
    request: HttpRequest, topic: TopicName, name: Name, payload: ReceiveIn | None = None
) -> dict[str, Any]:
    """Lease up to max_messages from a subscription (long poll with wait_seconds); keeps a non-durable one alive."""
    return await receive_subscription_as(_user(request), topic, name, payload or ReceiveIn.model_validate({}))


# --------------------------------------------------------------------------- ack, nack, extend


@router.post("/ack", response={200: ResultsOut, **ERRORS}, tags=["messages"])
def ack(request: HttpRequest, payload: AckIn) -> dict[str, Any]:
    """Acknowledge; a status per receipt in request order, "ok" or "stale_receipt" (409 when all are stale)."""
    return ack_as(_user(request), payload)


@router.post("/nack", response={200: ResultsOut, **ERRORS}, tags=["messages"])
def nack(request: HttpRequest, payload: NackIn) -> dict[str, Any]:
    """Give messages back, deliverable again after delay_seconds (409 when all receipts are stale)."""
    statuses = broker.nack(
        receipts=payload.receipts, delay_seconds=payload.delay_seconds, authorize=access.may_consume(_user(request))
    )
    return _results(payload.receipts, statuses)


@router.post("/extend", response={200: ResultsOut, **ERRORS}, tags=["messages"])
def extend(request: HttpRequest, payload: ExtendIn) -> dict[str, Any]:
    """Extend leases to now + visibility_timeout_seconds (409 when all receipts are stale)."""
    statuses = broker.extend(
        receipts=payload.receipts,
        visibility_timeout_seconds=payload.visibility_timeout_seconds,
        authorize=access.may_consume(_user(request)),
    )
    return _results(payload.receipts, statuses)


# --------------------------------------------------------------------------- transactions


@router.post("/transactions", response={201: TransactionOut, **ERRORS}, tags=["transactions"])
def begin(request: HttpRequest) -> Status[Any]:
    """Open a transaction; pass its id as `transaction` to publishes and acks."""
    return Status(201, broker.begin(user=_user(request)))


@router.get("/transactions", response={200: TransactionListOut, **ERRORS}, tags=["transactions"])
def list_transactions(
    request: HttpRequest,
    state: Annotated[str | None, Query(None, pattern="^(open|prepared|committed|rolled_back)$")] = None,
) -> dict[str, Any]:
    """Your transactions (admins: all), e.g. ?state=prepared for recovery."""
    return {"transactions": broker.list_transactions(state=state, user=_user(request))}


@router.get("/transactions/{id}", response={200: TransactionOut, **ERRORS}, tags=["transactions"])
def get_transaction(request: HttpRequest, id: TransactionId) -> Any:
    return broker.get_transaction(transaction_id=id, user=_user(request))


@router.post("/transactions/{id}/prepare", response={200: TransactionOut, **ERRORS}, tags=["transactions"])
def prepare(request: HttpRequest, id: TransactionId) -> Any:
    """Phase one: the staged work survives restarts and timeouts until commit or rollback."""
    return broker.prepare(transaction_id=id, user=_user(request))


@router.post("/transactions/{id}/commit", response={200: TransactionOut, **ERRORS}, tags=["transactions"])
def commit(request: HttpRequest, id: TransactionId) -> Any:
    """Apply the staged publishes and acks atomically (committing again answers the same)."""
    return broker.commit(transaction_id=id, user=_user(request))


@router.post("/transactions/{id}/rollback", response={200: TransactionOut, **ERRORS}, tags=["transactions"])
def rollback(request: HttpRequest, id: TransactionId) -> Any:
    """Discard the staged publishes; the acked messages are redelivered."""
    return broker.rollback(transaction_id=id, user=_user(request))
