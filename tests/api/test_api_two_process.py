"""Two daphne servers, one PostgreSQL database: a long poll on B is woken by a publish to A.

B's wake-up can only come through LISTEN/NOTIFY (messaging/listener.py): B re-checks on its own
only every 30 s here, so an answer within 100 ms of the publish is the notification's doing.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from messaging import broker
from tests.ws.conftest import Server, start_server

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROUNDS = 5
LIMIT_SECONDS = 0.100  # the bound: publish on A -> long poll on B answered


@pytest.fixture(scope="module")
def servers(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("two-process")
    started: list[Server] = []
    try:
        with django_db_blocker.unblock():
            for name in ("a", "b"):
                started.append(start_server(logs / f"{name}.log", PEGASUS_LONGPOLL_RECHECK_SECONDS="30"))
        yield started[0], started[1]
    finally:
        for server in started:
            server.close()


async def _round(a: httpx.AsyncClient, b: httpx.AsyncClient, body: str) -> tuple[float, float]:
    """(publish committed -> B answered, publish sent -> B answered), in seconds."""
    poll = asyncio.ensure_future(b.post("/queues/two/receive", json={"wait_seconds": 20}))
    await asyncio.sleep(0.3)  # let B's long poll start waiting (not a timing assertion)
    assert not poll.done()
    sent = time.monotonic()
    published = await a.post("/queues/two/messages", json={"body": body})
    committed = time.monotonic()  # A answers 201 once the publish is committed
    assert published.status_code == 201
    response = await poll
    answered = time.monotonic()
    assert [m["body"] for m in response.json()["messages"]] == [body]
    ack = await b.post("/ack", json={"receipts": [response.json()["messages"][0]["receipt"]]})
    assert ack.status_code == 200
    return answered - committed, answered - sent


def test_long_poll_on_b_is_woken_by_a_publish_to_a(servers: tuple[Server, Server], alice: Any, token_for: Any):
    broker.create_queue(name="two")
    rounds = asyncio.run(_measure(*servers, token_for(alice)))
    after_commit, after_send = [r[0] for r in rounds], [r[1] for r in rounds]
    print(
        f"publish on A committed -> long poll on B answered: median {statistics.median(after_commit) * 1000:.1f} ms,"
        f" max {max(after_commit) * 1000:.1f} ms; from sending the publish: median"
        f" {statistics.median(after_send) * 1000:.1f} ms, max {max(after_send) * 1000:.1f} ms"
    )
    assert max(after_commit) < LIMIT_SECONDS, rounds


async def _measure(server_a: Server, server_b: Server, token: str) -> list[tuple[float, float]]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server_a.port}/api/v1", headers=headers, timeout=30) as a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server_b.port}/api/v1", headers=headers, timeout=30) as b,
    ):
        await _round(a, b, "warm-up")  # B's LISTEN may still be connecting: then the 30 s re-check finds it
        return [await _round(a, b, f"m{i}") for i in range(ROUNDS)]
