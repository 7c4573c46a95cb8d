"""Publish to a queue or topic: all or nothing, deduplicated, durable before it returns."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError, connection

from messaging import clock, conf, events, filters, metrics
from messaging.broker import bulk, destinations
from messaging.broker.common import (
    DURABLE,
    STORES,
    TRANSIENT,
    OutgoingMessage,
    PublishResult,
    ReceivedMessage,
    Store,
    _lock_transaction,
    _touch,
    atomic,
    may_be_one_statement,
    one_statement,
    store_for,
    validate_message,
)
from messaging.exceptions import (
    BatchTooLarge,
    BrokerError,
    DuplicatePending,
    InvalidRequest,
)
from messaging.models import (
    DedupRecord,
    MessageBase,
    Queue,
    State,
    Topic,
    TxState,
)

# --------------------------------------------------------------------------- publish


def publish(
    *,
    queue: Queue | None = None,
    topic: Topic | None = None,
    messages: Sequence[OutgoingMessage],
    transaction_id: str | None = None,
    user: Any = None,
) -> list[PublishResult]:
    """Publish a batch to a queue or a topic, all or nothing.

    Returns when the messages are committed (durable ones to disk). A message whose dedup_id was
    seen on this destination within its dedup window is answered with the first message's id
    and `duplicate=True`, and nothing is enqueued for it. Inside a transaction the messages are
    staged: invisible until commit, gone on rollback.
    """
    request = PublishRequest(queue=queue, topic=topic, messages=messages, transaction_id=transaction_id, user=user)
    check_publish(request)
    with _transaction_for(request):
        return _publish_checked(request)


@dataclass(frozen=True)
class PublishRequest:
    """The arguments of one `publish` call, for `publish_many`.

    `ids`: message pks already taken from the non-durable store's sequence, one per message
    (messaging/write_behind.py numbers its publishes in arrival order). Only for non-durable
    messages outside a transaction; a duplicate's id goes unused."""

    messages: Sequence[OutgoingMessage]
    queue: Queue | None = None
    topic: Topic | None = None
    transaction_id: str | None = None
    user: Any = None
    ids: Sequence[int] | None = None


def publish_many(*, requests: Sequence[PublishRequest]) -> list[list[PublishResult] | Exception]:
    """Group commit: publish several independent requests in ONE database transaction.

    Each request keeps `publish`'s contract (all or nothing, deduplicated, durable when this
    returns) and gets its own outcome, in order: its results, or the BrokerError it raised. One
    commit (one WAL flush) serves them all, which is what makes many concurrent small publishes
    fast. A request that fails validation fails alone; if the shared transaction fails before
    its commit, each request is retried in a transaction of its own, so one bad request cannot
    fail the others. Requests inside a messaging transaction always run alone (each locks its
    transaction row, and a shared lock order across them is not worth having).
    """
    outcomes: list[list[PublishResult] | Exception | None] = [None] * len(requests)
    grouped: list[int] = []
    for i, request in enumerate(requests):
        try:
            check_publish(request)
        except BrokerError as exc:
            outcomes[i] = exc
            continue
        if request.transaction_id is None:
            grouped.append(i)
        else:
            outcomes[i] = _publish_alone(request)
    if len(grouped) == 1:
        outcomes[grouped[0]] = _publish_alone(requests[grouped[0]])
    elif grouped:
        _publish_group(requests, grouped, outcomes)
    return outcomes  # type: ignore[return-value]


def _publish_group(
    requests: Sequence[PublishRequest], grouped: list[int], outcomes: list[list[PublishResult] | Exception | None]
) -> None:
    # Requests to the same destination become one batch (one statement, one notify); each
    # gets its slice of the results back. In-batch dedup then spans them, in request order,
    # which is what publishing them one after the other would give.
    # Requests with ids taken in advance never share a batch with requests without.
    by_destination: dict[tuple[str, int, bool], list[int]] = {}
    for i in grouped:
        queue, topic, preassigned = requests[i].queue, requests[i].topic, requests[i].ids is not None
        key = ("queue", queue.pk, preassigned) if queue is not None else ("topic", topic.pk, preassigned)  # type: ignore[union-attr]
        by_destination.setdefault(key, []).append(i)
    merged: list[tuple[list[int], PublishRequest]] = []
    for indexes in by_destination.values():
        first = requests[indexes[0]]
        batch = [msg for i in indexes for msg in requests[i].messages]
        ids = None if first.ids is None else [pk for i in indexes for pk in requests[i].ids]  # type: ignore[union-attr]
        merged.append((indexes, PublishRequest(queue=first.queue, topic=first.topic, messages=batch, ids=ids)))
    # All to one destination, and one statement: that statement is the transaction.
    one = len(merged) == 1 and _commits_alone(merged[0][1])
    body_done = False
    try:
        with one_statement() if one else atomic():
            for indexes, request in merged:
                results = _publish_checked(request)
                start = 0
                for i in indexes:
                    end = start + len(requests[i].messages)
                    outcomes[i] = results[start:end]
                    start = end
            body_done = True
    except Exception as exc:
        if body_done or (one and not _nothing_written(exc)):
            # The COMMIT itself failed (or, for one statement, the connection did, or a failure
            # came after it): the outcome is unknown, so nothing is retried.
            for i in grouped:
                outcomes[i] = exc
            return
        for i in grouped:  # something failed before the commit: nothing was committed
            outcomes[i] = _publish_alone(requests[i])


def _publish_alone(request: PublishRequest) -> list[PublishResult] | Exception:
    try:
        with _transaction_for(request):
            return _publish_checked(request)
    except (BrokerError, DatabaseError) as exc:
        return exc


def _transaction_for(request: PublishRequest) -> AbstractContextManager[None]:
    """The transaction a publish runs in by itself."""
    return one_statement() if _commits_alone(request) else atomic()


def _commits_alone(request: PublishRequest) -> bool:
    """May the publish be its one statement's transaction (broker.common.one_statement)? Yes
    for a plain publish of one store's messages on PostgreSQL (_publish_bulk), unless a push
    consumer of this process waiting on the destination is behind: its messages must be
    claimed by a hand-off in the publish's transaction (messaging/push.py, Pusher.behind)."""
    from messaging import push

    return (
        request.transaction_id is None
        and may_be_one_statement()
        and all(msg.dedup_id is None for msg in request.messages)
        and len({msg.durable for msg in request.messages}) == 1
        and not push.waits_behind(queue=request.queue, topic=request.topic)
    )


def _nothing_written(exc: Exception) -> bool:
    """Did a one_statement() publish that raised `exc` write nothing? Yes when it was refused
    before its statement, or the server refused the statement (which rolled it back). Not
    known when the connection failed under it."""
    if isinstance(exc, BrokerError):
        return True
    return isinstance(exc, DatabaseError) and not isinstance(exc, (OperationalError, InterfaceError))


def check_publish(request: PublishRequest) -> None:
    """Everything about a publish that needs no database: raises a BrokerError."""
    queue, topic, messages = request.queue, request.topic, request.messages
    if (queue is None) == (topic is None):
        raise InvalidRequest("Publish to exactly one queue or topic.")
    limits = conf.get()
    if not messages:
        raise InvalidRequest("A publish needs at least one message.")
    if len(messages) > limits.max_batch_messages:
        raise BatchTooLarge(f"At most {limits.max_batch_messages} messages per batch.")
    max_bytes = queue.max_message_bytes if queue is not None else limits.default_max_message_bytes
    for msg in messages:
        validate_message(msg, max_bytes=max_bytes)
    if request.ids is not None and (
        len(request.ids) != len(messages) or request.transaction_id is not None
        or any(msg.durable for msg in messages)
    ):  # fmt: skip
        raise InvalidRequest("Ids taken in advance are for non-durable messages outside transactions, one each.")


def _publish_checked(request: PublishRequest) -> list[PublishResult]:
    """The database part of a publish. Should be called inside atomic() (or one_statement(), see
    _transaction_for)."""
    queue, topic, messages, transaction_id = request.queue, request.topic, request.messages, request.transaction_id
    limits = conf.get()
    window = queue.dedup_window_seconds if queue is not None else limits.default_dedup_window_seconds
    destination = f"queue:{queue.name}" if queue is not None else f"topic:{topic.name}"  # type: ignore[union-attr]
    if transaction_id is not None:
        _lock_transaction(transaction_id, user=request.user, states=(TxState.OPEN,))
    now = clock.now()
    targets = [queue] if queue is not None else destinations.subscriptions_of(topic)  # type: ignore[arg-type]
    results = _publish_locked(
        destination=destination, targets=targets, messages=messages, window=window,
        transaction_id=transaction_id, now=now, ids=request.ids,
    )  # fmt: skip
    fresh = sum(not r.duplicate for r in results)
    per_key = {metrics.BROKER: fresh, **({("topic", topic.pk): fresh} if topic is not None else {})}
    metrics.count_on_commit(metrics.PUBLISHED, per_key)
    return results


def _publish_locked(
    *,
    destination: str,
    targets: list[Queue],
    messages: Sequence[OutgoingMessage],
    window: int,
    transaction_id: str | None,
    now: datetime,
    ids: Sequence[int] | None = None,
) -> list[PublishResult]:
    results: list[PublishResult | None] = [None] * len(messages)
    first_in_batch: dict[str, int] = {}
    fresh: list[int] = []  # indexes of messages to enqueue
    for i, msg in enumerate(messages):
        if msg.dedup_id is not None and msg.dedup_id in first_in_batch:
            continue  # a repeat inside this batch: answered from the first below
        if msg.dedup_id is not None:
            first_in_batch[msg.dedup_id] = i
        fresh.append(i)
    if not first_in_batch and connection.vendor == "postgresql":
        return _publish_bulk(destination=destination, targets=targets, messages=messages,
                             transaction_id=transaction_id, now=now, ids=ids)  # fmt: skip

    rows_by_store: dict[Store, list[tuple[int, MessageBase]]] = {}
    for i in fresh:
        msg = messages[i]
        store = store_for(msg.durable)
        row = store.message(
            **({"id": ids[i]} if ids is not None else {}),
            body=msg.body,
            content_type=msg.content_type,
            headers=msg.headers,
            priority=msg.priority,
            dedup_id=msg.dedup_id or "",
            destination=destination,
            published_at=now,
            expires_at=now + timedelta(seconds=msg.ttl_seconds) if msg.ttl_seconds else None,
        )
        rows_by_store.setdefault(store, []).append((i, row))
    for store, rows in rows_by_store.items():
        store.message.objects.bulk_create([row for _, row in rows])
        for i, row in rows:
            results[i] = PublishResult(id=store.public_id(row.pk), duplicate=False)

    duplicates = _claim_dedup_ids(
        destination=destination,
        claims={messages[i].dedup_id: results[i].id for i in fresh if messages[i].dedup_id},  # type: ignore[union-attr,misc]
        window=window,
        now=now,
    )
    _refuse_pending_duplicates(duplicates, transaction_id)
    if duplicates:
        for store, rows in rows_by_store.items():
            dropped = [row.pk for i, row in rows if messages[i].dedup_id in duplicates]
            if dropped:
                store.message.objects.filter(pk__in=dropped).delete()
            rows_by_store[store] = [(i, row) for i, row in rows if messages[i].dedup_id not in duplicates]
        for i in fresh:
            dedup_id = messages[i].dedup_id
            if dedup_id in duplicates:
                results[i] = PublishResult(id=duplicates[dedup_id], duplicate=True)
    for i, msg in enumerate(messages):
        if results[i] is None:
            first = results[first_in_batch[msg.dedup_id]]  # type: ignore[index]
            results[i] = PublishResult(id=first.id, duplicate=True)  # type: ignore[union-attr]

    touched = _create_deliveries(rows_by_store, messages, targets, transaction_id, now)
    if transaction_id is None:
        events.notify_on_commit(touched)
    return results  # type: ignore[return-value]


def _publish_bulk(
    *,
    destination: str,
    targets: list[Queue],
    messages: Sequence[OutgoingMessage],
    transaction_id: str | None,
    now: datetime,
    ids: Sequence[int] | None = None,
) -> list[PublishResult]:
    """_publish_locked on PostgreSQL for a batch without dedup ids: one statement per store
    (broker/bulk.py) instead of ORM objects and two inserts. `ids`: see PublishRequest.

    Outside a messaging transaction, a push consumer of this process waiting on a target gets
    its messages leased to it by the insert itself, pushed when this transaction commits
    (_LeasePlan): no claim of its own, which is most of the time between a publish and its push."""
    results: list[PublishResult | None] = [None] * len(messages)
    state = State.STAGED if transaction_id is not None else State.READY
    routed: Counter[int] = Counter()
    plan = _LeasePlan.for_waiting_pushers(targets, messages) if transaction_id is None else None
    leased: list[tuple[Store, bulk.LeasedAtInsert]] = []
    expired_leases: set[int] = set()
    try:
        for store in STORES:  # durable first: the lock order
            indexes = [i for i, msg in enumerate(messages) if store_for(msg.durable) is store]
            if not indexes:
                continue
            inserted = bulk.insert_messages(
                store=store, destination=destination, targets=targets, messages=[messages[i] for i in indexes],
                state=state, transaction_id=transaction_id, now=now,
                ids=None if ids is None else [ids[i] for i in indexes],
                lease=plan.for_rows(indexes) if plan is not None else None,
            )  # fmt: skip
            routed.update(inserted.routed)
            for i, pk in zip(indexes, inserted.pks, strict=True):
                results[i] = PublishResult(id=store.public_id(pk), duplicate=False)
            leased += [(store, (pk, indexes[i], queue_pk, expires)) for pk, i, queue_pk, expires in inserted.leased]
            expired_leases |= inserted.expired_leases
    except BaseException:
        if plan is not None:
            plan.give_back()
        raise
    metrics.count_queues_on_commit(metrics.PUBLISHED, routed, broker_total=False)
    served: set[Any] = set()
    if plan is not None:
        served = plan.hand_over(leased, expired_leases, messages, results, now)  # type: ignore[arg-type]
    if transaction_id is None:
        events.notify_on_commit(routed, pg_notified=True, served=served)  # bulk.insert_messages ran pg_notify
    return results  # type: ignore[return-value]


class _LeasePlan:
    """Which deliveries of a publish the insert leases to waiting push consumers of this process.

    For each target with a pusher waiting (messaging/push.py, take_waiting), the messages it
    gets are those it would claim first: routed to it (its filter), deliverable now (no
    delay), in claim order (priority, then durable first, then publish order), as many as its
    prefetch leaves room for. Each lease is a normal one: delivery_count 1, the queue's
    visibility timeout, a fresh token. A pusher left with more than its room, or whose queue
    holds an expired lease (the insert tells), looks again."""

    def __init__(self, taken: dict[int, tuple[Any, int]], chosen: dict[int, list[int]], visibility: dict[int, int]):
        self.taken = taken  # queue pk -> (pusher, room)
        self.chosen = chosen  # queue pk -> indexes of the messages leased to its pusher
        self.visibility = visibility
        self.token = secrets.token_hex(8)

    @classmethod
    def for_waiting_pushers(cls, targets: Sequence[Queue], messages: Sequence[OutgoingMessage]) -> _LeasePlan | None:
        from messaging import push  # the live layer registers its waiting pushers there

        waiting = [t for t in targets if push.is_waiting(t.pk) and not t.paused]
        if not waiting:
            return None
        deliverable = {
            t.pk: [i for i, msg in enumerate(messages) if msg.delay_seconds <= 0
                   and (t.filter is None or filters.matches(t.filter, msg.headers))]
            for t in waiting
        }  # fmt: skip
        taken = push.take_waiting([pk for pk, indexes in deliverable.items() if indexes])
        if not taken:
            return None
        chosen: dict[int, list[int]] = {}
        for pk, (_, room) in taken.items():
            order = sorted(deliverable[pk], key=lambda i: (-messages[i].priority, not messages[i].durable, i))
            chosen[pk] = order[:room]
        visibility: dict[int, int] = {}
        for t in waiting:
            if t.pk in taken:
                visibility[t.pk] = t.visibility_timeout_seconds
                _touch(t)  # consumed from, as a receive would (a queue that expires when idle)
        return cls(taken, chosen, visibility)

    def for_rows(self, indexes: Sequence[int]) -> bulk.LeaseAtInsert:
        """The lease of one store's insert, whose rows are the messages at `indexes`."""
        position = {i: n for n, i in enumerate(indexes)}
        rows: dict[int, list[int]] = {}
        for queue_pk, chosen in self.chosen.items():
            for i in chosen:
                if i in position:
                    rows.setdefault(position[i], []).append(queue_pk)
        return bulk.LeaseAtInsert(rows=rows, visibility=self.visibility, token=self.token)

    def hand_over(
        self,
        leased: list[tuple[Store, bulk.LeasedAtInsert]],
        expired_leases: set[int],
        messages: Sequence[OutgoingMessage],
        results: Sequence[PublishResult],
        now: datetime,
    ) -> set[Any]:
        """Give each pusher its leased messages, to push when this transaction commits; returns
        the pushers served. A pusher whose queue holds an expired lease is told to look: its
        claim returns that lease first (a pusher fed by leases at insert never claims else)."""
        from messaging import push

        by_queue: dict[int, list[tuple[Store, int, int, datetime | None]]] = {}
        for store, (delivery_pk, i, queue_pk, expires) in leased:
            by_queue.setdefault(queue_pk, []).append((store, delivery_pk, i, expires))
        for queue_pk, (pusher, room) in self.taken.items():
            rank = {i: n for n, i in enumerate(self.chosen[queue_pk])}
            rows = sorted(by_queue.get(queue_pk, []), key=lambda row: rank[row[2]])
            label = pusher.queue.label
            received = [
                _leased_now(messages[i], results[i].id, store, f"{store.code}{pk}.{self.token}", label, now, expires)
                for store, pk, i, expires in rows
            ]
            push.hand_over(pusher, received, filled=len(received) >= room or queue_pk in expired_leases)
        metrics.count_queues_on_commit(metrics.DELIVERED, {pk: len(rows) for pk, rows in by_queue.items()})
        return {pusher for pusher, _ in self.taken.values()}

    def give_back(self) -> None:
        from messaging import push

        push.give_back([pusher for pusher, _ in self.taken.values()])


def _leased_now(
    msg: OutgoingMessage,
    public_id: str,
    store: Store,
    receipt: str,
    label: str,
    now: datetime,
    expires: datetime | None,
) -> ReceivedMessage:
    """A message as receive renders it, leased for the first time as it was published."""
    return ReceivedMessage(
        id=public_id, body=msg.body, content_type=msg.content_type, headers=dict(msg.headers),
        priority=msg.priority, durable=store is DURABLE, published_at=now, expires_at=expires, destination=label,
        receipt=receipt, delivery_count=1, redelivered=False,
    )  # fmt: skip


def _create_deliveries(
    rows_by_store: dict[Store, list[tuple[int, MessageBase]]],
    messages: Sequence[OutgoingMessage],
    targets: list[Queue],
    transaction_id: str | None,
    now: datetime,
) -> set[int]:
    touched: set[int] = set()
    routed: Counter[int] = Counter()
    state = State.STAGED if transaction_id is not None else State.READY
    for store, rows in rows_by_store.items():
        deliveries = []
        for i, row in rows:
            msg = messages[i]
            for target in targets:
                if not filters.matches(target.filter, msg.headers):
                    continue
                touched.add(target.pk)
                deliveries.append(
                    store.delivery(
                        message_id=row.pk,
                        queue_id=target.pk,
                        state=state,
                        priority=msg.priority,
                        visible_at=now + timedelta(seconds=msg.delay_seconds),
                        expires_at=row.expires_at,
                        transaction_id=transaction_id,
                    )
                )
        store.delivery.objects.bulk_create(deliveries, batch_size=1000)
        routed.update(d.queue_id for d in deliveries)
    # Console rates: an in-memory add after commit, no extra write (messaging/metrics.py).
    metrics.count_queues_on_commit(metrics.PUBLISHED, routed, broker_total=False)
    return touched


def _claim_dedup_ids(*, destination: str, claims: dict[str, str], window: int, now: datetime) -> dict[str, str]:
    """Record dedup ids for this destination; return {dedup_id: first id} for those already seen
    within the window. The unique index makes a concurrent publisher of the same dedup_id wait
    for ours to commit, then see it as a duplicate."""
    if not claims:
        return {}
    table = DedupRecord._meta.db_table
    cutoff = now - timedelta(seconds=window)
    values = ", ".join(["(%s, %s, %s, %s)"] * len(claims))
    params: list[Any] = []
    for dedup_id, message_id in claims.items():
        params += [destination, dedup_id, message_id, _db_datetime(now)]
    sql = (
        f"INSERT INTO {table} (destination, dedup_id, message_id, created_at) VALUES {values} "
        f"ON CONFLICT (destination, dedup_id) DO UPDATE SET message_id = excluded.message_id, "
        f"created_at = excluded.created_at WHERE {table}.created_at < %s RETURNING dedup_id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, _db_datetime(cutoff)])
        claimed = {row[0] for row in cursor.fetchall()}
    seen = [d for d in claims if d not in claimed]
    if not seen:
        return {}
    return dict(
        DedupRecord.objects.filter(destination=destination, dedup_id__in=seen).values_list("dedup_id", "message_id")
    )


def _refuse_pending_duplicates(duplicates: dict[str, str], transaction_id: str | None) -> None:
    """Refuse a duplicate of a message still staged in another, unfinished transaction.

    That transaction may yet roll back and take the first message with it; answering
    "duplicate" now would tell this publisher its message is in when it may never be (found by
    tests/faults/test_model.py). A retry after the other transaction finishes gets the final
    answer: duplicate after its commit, enqueued after its rollback (which drops the record)."""
    for store in STORES:
        transient = store is TRANSIENT
        pks = [int(i[1:] if transient else i) for i in duplicates.values() if i.startswith("t") == transient]
        pending = store.deliveries().filter(message_id__in=pks, state=State.STAGED)
        if transaction_id is not None:
            pending = pending.exclude(transaction_id=transaction_id)
        if pks and pending.exists():
            raise DuplicatePending()


def _db_datetime(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)
