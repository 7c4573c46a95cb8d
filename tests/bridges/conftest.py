"""Bridge fixtures: a fake target server behind httpx.MockTransport (the only thing mocked:
what leaves the process), and a factory for bridges that forward to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from messaging.bridges import conf, link, services
from messaging.bridges.bridge import Forwarder
from messaging.bridges.locks import ProcessLock

TARGET = "http://target.example:8001"


@dataclass
class FakeTarget:
    """A Pegasus server's publish endpoint, with its duplicate detection, and scripted faults.

    `faults` is consumed one per request: None answers normally, "connect"/"timeout" fail before
    the target sees anything, "cut" stores the batch and then loses the answer, an int answers
    with that status and an error body, "garbled"/"short" store the batch and answer 201 with an
    unreadable or incomplete confirmation.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    faults: list[Any] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # on error answers

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "connect":
            raise httpx.ConnectError("refused", request=request)
        if fault == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if isinstance(fault, int):
            return httpx.Response(fault, json={"error": {"code": "oops", "message": "no"}}, headers=self.headers)
        results = self._store(request)
        if fault == "garbled":
            return httpx.Response(201, content=b'{"messages": [')
        if fault == "short":
            return httpx.Response(201, json={"messages": results[:-1]})
        if fault == "cut":
            raise httpx.RemoteProtocolError("peer closed connection mid-body", request=request)
        return httpx.Response(201, json={"messages": results})

    def _store(self, request: httpx.Request) -> list[dict[str, Any]]:
        import json

        results = []
        for msg in json.loads(request.content)["messages"]:
            if msg["dedup_id"] in self.seen:
                results.append({"id": str(self.seen[msg["dedup_id"]]), "duplicate": True})
                continue
            self.messages.append(msg)
            self.seen[msg["dedup_id"]] = len(self.messages)
            results.append({"id": str(len(self.messages)), "duplicate": False})
        return results

    @property
    def bodies(self) -> list[str]:
        return [m["body"] for m in self.messages]


@pytest.fixture(autouse=True)
def _allow_target(settings: Any) -> None:
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": [TARGET], "BACKOFF_MAX_SECONDS": 4}


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def target_client(target: FakeTarget) -> Iterator[httpx.Client]:
    with link.new_client(transport=httpx.MockTransport(target.handle)) as c:
        yield c


@pytest.fixture
def bridge_factory(queue_factory: Callable[..., Any]) -> Callable[..., Any]:
    def make(source: Any = None, **fields: Any) -> Any:
        queue = source or queue_factory(max_deliveries=3)
        values = {
            "name": f"b-{queue.name}", "source_name": queue.name, "target_url": TARGET,
            "target_name": "inbox", "target_token": "pgs_secret-token", "batch_size": 10,
        }  # fmt: skip
        return services.create_bridge(**{**values, **fields})

    return make


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def forwarder_for(target_client: httpx.Client, sleeps: list[float]) -> Iterator[Callable[..., Forwarder]]:
    made: list[Forwarder] = []

    def make(bridge: Any, *, sleep: Callable[[float], Any] | None = None) -> Forwarder:
        lock = ProcessLock(bridge.pk)
        assert lock.acquire()
        fwd = Forwarder(bridge.pk, client=target_client, lock=lock, sleep=sleep or sleeps.append, rng=lambda: 0.5,
                        settings=conf.get())  # fmt: skip
        fwd.take_over()
        made.append(fwd)
        return fwd

    yield make
    for fwd in made:
        fwd.lock.release()
        fwd.close()
