"""The publish, ack and claim statements are prepared once per connection and run on their generic plan.

Planning the publish statement at every call took ~0.5 ms of PostgreSQL's time out of a latency
round of ~1 ms (docs/performance.md, item 23). Django leaves psycopg's prepare_threshold at None,
which silently refuses even `prepare=True`, so these tests look at what PostgreSQL itself holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction

from messaging import broker, clock
from messaging.broker import DURABLE, bulk

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


# The counts below start at zero in every test: psycopg deallocates a connection's prepared
# statements when it rolls back, and every test here ends in a rollback.


def _prepared_publishes() -> list[tuple[bool, int, int]]:
    """(leasing?, generic plans, custom plans) of each prepared publish statement."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement LIKE '%%ANY(u.l)%%', generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%json_to_recordset%%' ORDER BY 1"
        )
        return list(cursor.fetchall())


def _prepared(start: str) -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE ltrim(statement, E' \\n') LIKE %s",
            [start + "%"],
        )
        return list(cursor.fetchall())


def test_publish_and_ack_statements_are_prepared_once_and_never_planned_again():
    queue, _ = broker.create_queue(name="prepared")
    for i in range(3):
        broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=f"plain {i}")])
    lease = bulk.LeaseAtInsert(rows={0: [queue.pk]}, visibility={queue.pk: 30}, token="t" * 16)
    for i in range(3):
        with transaction.atomic():
            bulk.insert_messages(
                store=DURABLE, destination="queue:prepared", targets=[queue], state=1, transaction_id=None,
                messages=[broker.OutgoingMessage(body=f"leased {i}")], now=clock.now(), lease=lease,
            )  # fmt: skip

    assert _prepared_publishes() == [(False, 3, 0), (True, 3, 0)]
    leased = broker.receive(queue=queue, max_messages=10)
    assert sorted(m.body for m in leased) == ["plain 0", "plain 1", "plain 2"]  # the others are leased
    for m in leased:
        assert broker.ack(receipts=[m.receipt]) == ["ok"]
    assert _prepared("WITH held AS") == [(3, 0)]
    assert _prepared("WITH gate AS") == [(1, 0)]  # the claim too (bulk.claim says why)


def test_pegasus_db_prepare_0_turns_preparing_off():
    code = "from django.conf import settings; import json; print(json.dumps(settings.DATABASES['default']['OPTIONS']))"

    def options(url: str = "postgres://nobody@127.0.0.1:1/none", **env: str) -> Any:
        environ = {k: v for k, v in os.environ.items() if k != "PEGASUS_DB_PREPARE"}
        environ.update(DJANGO_SETTINGS_MODULE="pegasus_site.settings", PEGASUS_DB_POOL="0", **env)
        environ["DATABASE_URL"] = url  # read, never connected to
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert options() == {"prepare_threshold": 2**31 - 1, "options": "-c plan_cache_mode=force_generic_plan"}
    assert options(PEGASUS_DB_PREPARE="0") == {}
    # What the URL's query string sets is kept, and its own server options come first.
    assert options("postgres://nobody@127.0.0.1:1/none?sslmode=require&options=-c%20statement_timeout%3D5000") == {
        "sslmode": "require", "prepare_threshold": 2**31 - 1,
        "options": "-c statement_timeout=5000 -c plan_cache_mode=force_generic_plan",
    }  # fmt: skip
