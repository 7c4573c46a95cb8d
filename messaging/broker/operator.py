"""Operator actions on selected messages (the console): delete, move, copy, retry, reprioritise.

Messages are picked by the `cursor` an operator saw while browsing (queries.BrowsedMessage: store
code + delivery id, e.g. "d42", "t7"). Every function here follows the rules of the rest of the
broker: rows are locked with FOR UPDATE SKIP LOCKED in id order, durable store first; rows a
consumer holds (LEASED), a transaction's STAGED publishes and ACKED rows are never touched, only
READY (including scheduled) and DEAD ones; a row locked by someone else at that moment is skipped.
Each returns how many messages it changed, which may be fewer than were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from messaging import clock, events
from messaging.broker.common import STORES, Store, atomic
from messaging.broker.delivery import _delete_deliveries
from messaging.exceptions import BatchTooLarge, InvalidRequest
from messaging.models import Queue, State

MAX_SELECTED = 1000
OPERABLE_STATES = (State.READY, State.DEAD)


def parse_cursors(cursors: Sequence[str]) -> dict[Store, list[int]]:
    """Delivery ids per store from browse cursors; malformed cursors are refused."""
    if len(cursors) > MAX_SELECTED:
        raise BatchTooLarge(f"At most {MAX_SELECTED} messages at a time.")
    by_store: dict[Store, set[int]] = {}
    for cursor in cursors:
        store = next((s for s in STORES if isinstance(cursor, str) and cursor[:1] == s.code), None)
        digits = cursor[1:] if store is not None else ""
        if store is None or not digits.isdigit() or len(digits) > 18:
            raise InvalidRequest(f"Not a message cursor: {str(cursor)[:40]!r}.")
        by_store.setdefault(store, set()).add(int(digits))
    return {store: sorted(ids) for store, ids in by_store.items()}


def _lock_selected(store: Store, queue: Queue, ids: list[int], *, dead_letters_only: bool = False) -> list[Any]:
    """Lock the selected rows of this queue that an operator may change, in id order."""
    qs = store.deliveries().filter(queue=queue, pk__in=ids, state__in=OPERABLE_STATES)
    if dead_letters_only:
        qs = qs.filter(origin_queue__isnull=False)
    return list(qs.select_for_update(skip_locked=True, of=("self",)).order_by("id"))


def delete_messages(*, queue: Queue, cursors: Sequence[str]) -> int:
    """Delete the selected ready, scheduled or dead messages of `queue`."""
    selected = parse_cursors(cursors)
    with atomic():
        return sum(
            _delete_deliveries(store, store.deliveries().filter(queue=queue, pk__in=ids, state__in=OPERABLE_STATES))
            for store, ids in selected.items()
        )


def move_messages(*, queue: Queue, cursors: Sequence[str], target: Queue, copy: bool = False) -> int:
    """Move (or copy) the selected messages of `queue` to `target`, as fresh deliveries there.

    A moved or copied message is ready in `target` with a delivery count of 0 and no dead-letter
    marks; a scheduled one keeps its schedule. The target's filter and size limit are not
    applied: the operator decides. Moving to the same queue is refused.
    """
    if target.pk == queue.pk:
        raise InvalidRequest("Pick another queue to move or copy to.")
    selected = parse_cursors(cursors)
    done = 0
    with atomic():
        now = clock.now()
        for store, ids in selected.items():
            rows = _lock_selected(store, queue, ids)
            if copy:
                _copy_rows(store, rows, target)
            else:
                fresh = {"queue_id": target.pk, "delivery_count": 0, "origin_queue_id": None, "dead_letter_reason": ""}
                pks = [row.pk for row in rows]
                store.deliveries().filter(pk__in=pks, state=State.READY).update(**fresh)
                store.deliveries().filter(pk__in=pks, state=State.DEAD).update(
                    state=State.READY, visible_at=now, lease_token="", **fresh
                )
            done += len(rows)
        if done:
            events.notify_on_commit([target.pk])
    return done


def _copy_rows(store: Store, rows: list[Any], target: Queue) -> None:
    now = clock.now()
    store.delivery.objects.bulk_create(
        [
            store.delivery(
                message_id=row.message_id,
                queue_id=target.pk,
                state=State.READY,
                priority=row.priority,
                visible_at=max(row.visible_at, now) if row.state == State.READY else now,
                expires_at=row.expires_at,
            )
            for row in rows
        ]
    )


def retry_dead_letters(*, queue: Queue, cursors: Sequence[str]) -> int:
    """Send the selected dead letters of `queue` back to the queue they came from, as fresh
    deliveries (what `redrive` does for all of them). Messages without a known origin stay."""
    selected = parse_cursors(cursors)
    moved = 0
    with atomic():
        now = clock.now()
        origins: set[int] = set()
        for store, ids in selected.items():
            rows = _lock_selected(store, queue, ids, dead_letters_only=True)
            by_origin: dict[int, list[int]] = {}
            for row in rows:
                by_origin.setdefault(row.origin_queue_id, []).append(row.pk)
            for origin, pks in by_origin.items():
                store.deliveries().filter(pk__in=pks).update(
                    queue_id=origin, state=State.READY, visible_at=now, delivery_count=0,
                    origin_queue=None, dead_letter_reason="", lease_token="",
                )  # fmt: skip
            origins |= set(by_origin)
            moved += len(rows)
        events.notify_on_commit(origins)
    return moved


def set_priority(*, queue: Queue, cursors: Sequence[str], priority: int) -> int:
    """Change the priority of the selected messages in `queue` (0-9, higher first).

    The priority is the delivery's, which orders receives in this queue; the stored message (and
    its copies in other subscriptions) keeps the priority it was published with.
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidRequest("priority is an integer from 0 to 9.")
    selected = parse_cursors(cursors)
    changed = 0
    with atomic():
        for store, ids in selected.items():
            pks = [row.pk for row in _lock_selected(store, queue, ids)]
            changed += store.deliveries().filter(pk__in=pks).update(priority=priority)
    return changed
