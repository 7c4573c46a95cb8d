"""The hot statements' plans grow with their rows, not with their square.

On PostgreSQL the claim and the ack run on generic plans (pegasus_site/settings.py), which
expect a handful of rows from a CTE or an array parameter and so join them by nested loops. A
join between two such row sets then compares every row of one with every row of the other: an
ack of 1,000 receipts took 155 ms that way, a claim of 100 a quarter of its time
(docs/performance.md, item 26). Which join PostgreSQL picks depends on the table's size (a test
database's small tables got hash joins where the bench's got nested loops), so these tests turn
hash and merge joins off: every join is then a nested loop, and one that is not an index lookup
shows up as rows a join filter threw away. Each test runs the statement as the broker builds it
and counts those rows in the plan PostgreSQL ran (auto_explain).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction

from messaging import broker, clock
from messaging.broker import DURABLE, STORES, bulk
from messaging.models import Delivery, State

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

ROWS = 300  # half durable: the old claim threw 44,700 rows away here, the old ack (of 150) 22,350


@pytest.fixture
def plans() -> Iterator[list[dict[str, Any]]]:
    """The plan of every statement this test's connection runs, as PostgreSQL ran it
    (auto_explain, sent to the client as a notice), with nested loops for every join."""
    seen: list[dict[str, Any]] = []

    def noticed(diagnostic: Any) -> None:
        text = diagnostic.message_primary or ""
        if "plan:" in text:
            seen.append(json.loads(text.split("plan:", 1)[1])["Plan"])

    connection.ensure_connection()
    raw = connection.connection
    raw.add_notice_handler(noticed)
    with connection.cursor() as cursor:
        cursor.execute("LOAD 'auto_explain'")
        for setting, value in (("log_format", "json"), ("log_level", "notice"), ("log_analyze", "on")):
            cursor.execute(f"SET auto_explain.{setting} = {value}")
        cursor.execute("SET auto_explain.log_min_duration = 0")
        cursor.execute("SET enable_hashjoin = off")
        cursor.execute("SET enable_mergejoin = off")
    try:
        yield seen
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET enable_hashjoin")
            cursor.execute("RESET enable_mergejoin")
            cursor.execute("SET auto_explain.log_min_duration = -1")
        raw.remove_notice_handler(noticed)


def _rows_thrown_away(plan: dict[str, Any]) -> int:
    own = int(plan.get("Rows Removed by Join Filter", 0))
    return own + sum(_rows_thrown_away(child) for child in plan.get("Plans", ()))


def _plan_of(plans: list[dict[str, Any]], table: str) -> dict[str, Any]:
    """The one plan that writes `table` (the claim leases rows, the ack acks them)."""
    (plan,) = [p for p in plans if f"'Relation Name': '{table}'" in repr(p) and "'ModifyTable'" in repr(p)]
    return plan


@pytest.fixture
def queue(queue_factory: Any) -> Any:
    q = queue_factory("plans")
    half = ROWS // 2
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="d") for _ in range(half)])
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="t", durable=False) for _ in range(half)])
    return q


def test_a_claim_of_many_rows_joins_them_without_comparing_each_pair(queue: Any, plans: list[Any]) -> None:
    now = clock.now()
    with transaction.atomic():
        claimed = bulk.claim(
            stores=STORES, queue_id=queue.pk, limit=ROWS, now=now, deadline=now + timedelta(seconds=30),
            token=secrets.token_hex(8), gated=True,
        )  # fmt: skip
    assert claimed is not None and len(claimed) == ROWS
    assert _rows_thrown_away(_plan_of(plans, DURABLE.delivery._meta.db_table)) == 0


def test_an_ack_of_many_receipts_joins_them_without_comparing_each_pair(queue: Any, plans: list[Any]) -> None:
    received = broker.receive(queue=queue, max_messages=ROWS)
    durable = [broker.delivery._parse_receipt(m.receipt) for m in received if m.durable]
    receipts = sorted((pk, token) for _, pk, token in durable)  # type: ignore[misc]
    now = clock.now()
    plans.clear()  # the receive's
    with transaction.atomic():
        rows = bulk.ack(store=DURABLE, receipts=receipts, now=now, retain_until=now + timedelta(seconds=60))
    assert len(rows) == len(receipts) == ROWS // 2
    assert _rows_thrown_away(_plan_of(plans, DURABLE.delivery._meta.db_table)) == 0
    assert Delivery.objects.filter(state=State.ACKED).count() == ROWS // 2  # bulk.ack acked them all
    assert broker.ack(receipts=[m.receipt for m in received if m.durable]) == ["ok"] * (ROWS // 2)  # a repeat: ok
