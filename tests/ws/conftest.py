"""Real daphne servers for the WebSocket and STOMP tests, on the test database.

Each server is a separate process (`daphne -p 0`, the port it got read from its log), pointed at
the test database through DATABASE_URL. Tests that use one are `django_db(transaction=True)`, so
what they create is committed and visible to the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import Daphne, test_database_url

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # daphne's WebSocket message limit; the app's frame limit is lower
DAPHNE_LIMITS = [
    "--websocket-max-message-size",
    str(MAX_MESSAGE_BYTES),
    "--websocket-max-frame-size",
    str(MAX_MESSAGE_BYTES),
]


Server = Daphne


def database_url() -> str:
    return test_database_url()


def start_server(log: Path, **settings: str) -> Server:
    """A started daphne on the test database, with the WebSocket size limits `make run` uses."""
    return Daphne(log, args=DAPHNE_LIMITS, **settings).start()


WAIT = 20  # seconds to wait for something expected (an upper bound, never a timing assertion)


def eventually(check: Callable[[], Any]) -> Any:
    """Poll until `check()` is truthy: the server cleans up after the client has gone."""
    deadline = time.monotonic() + WAIT
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return result


def settle() -> None:
    """Wait until the servers finished closing the test's connections (their last step removes
    the consumer rows), so the test database can be flushed without racing them."""
    from messaging.models import Consumer

    eventually(lambda: not Consumer.objects.exists())


@pytest.fixture(scope="session")
def daphne_factory(
    django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Start daphne servers on the test database; all are stopped at the end of the session,
    before the test database is dropped."""
    servers: list[Server] = []
    logs = tmp_path_factory.mktemp("daphne")

    def start(**settings: str) -> Server:
        with django_db_blocker.unblock():
            server = start_server(logs / f"daphne-{len(servers)}.log", **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def server(daphne_factory: Callable[..., Server]) -> Server:
    # Heart-beats every second (when a client asks for them), so the heart-beat test is quick.
    return daphne_factory(PEGASUS_STOMP_HEARTBEAT_MS="1000")


@pytest.fixture
def admin_token(alice: Any, token_for: Callable[[Any], str]) -> str:
    return token_for(alice)
