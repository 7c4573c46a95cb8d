"""Against a real daphne: waiting long polls hold neither threads nor database connections."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from messaging import broker
from tests.ws.conftest import Server, start_server

pytestmark = pytest.mark.django_db(transaction=True)

POLLS = 80


@pytest.fixture(scope="module")
def server(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: Any) -> Iterator[Server]:
    with django_db_blocker.unblock():
        started = start_server(tmp_path_factory.mktemp("longpoll") / "daphne.log")
    yield started
    started.close()


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


async def _poll_many(server: Server, token: str) -> tuple[int, list[Any]]:
    limits = httpx.Limits(max_connections=POLLS + 10)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{server.port}/api/v1"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as client:
        polls = [
            asyncio.ensure_future(client.post("/queues/many/receive", json={"wait_seconds": 20})) for _ in range(POLLS)
        ]
        await asyncio.sleep(2)  # all of them waiting (not a timing assertion)
        assert not any(p.done() for p in polls)
        assert server.process is not None
        threads = _threads(server.process.pid)
        published = await client.post(
            "/queues/many/messages", json={"messages": [{"body": str(i)} for i in range(POLLS)]}
        )
        assert published.status_code == 201
        return threads, await asyncio.gather(*polls)


def test_waiting_long_polls_hold_no_threads(server: Server, alice: Any, token_for: Any):
    broker.create_queue(name="many")
    threads, responses = asyncio.run(_poll_many(server, token_for(alice)))
    # Django would give each request a thread for its whole life; here a fixed few serve them all
    # (housekeeping, listener, and the shared database hop threads).
    assert threads < POLLS // 2, threads
    bodies = sorted(int(m["body"]) for r in responses for m in r.json()["messages"])
    assert bodies == list(range(POLLS))
