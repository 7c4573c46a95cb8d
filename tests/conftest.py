"""Fixtures and factories shared by every test. Personas: alice (admin), bob (member), mallory (outsider)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from messaging import broker, clock, tokens

# No bridge runners in the test process or in the servers tests start, unless a test asks
# (tests/bridges start theirs explicitly): a stray runner would forward a test's bridge.
os.environ.setdefault("PEGASUS_BRIDGES_RUNNER", "off")
# Group commit rounds run in the thread-sensitive hop, where a test's transaction is visible
# (messaging/group_commit.py; tests/messaging/test_group_commit.py covers the own-thread mode).
os.environ.setdefault("PEGASUS_GROUP_COMMIT_THREAD", "0")


def _flush_retrying_deadlocks() -> None:
    """A transactional test ends by TRUNCATEing every table. The daphne servers some tests start
    keep running their own housekeeping (lease expiry, token checks, rate flushes), and on
    PostgreSQL such a query can deadlock with the TRUNCATE's table locks; PostgreSQL then aborts
    one of the two. When it picks the TRUNCATE, try it again rather than fail the next test."""
    from django.test import TransactionTestCase

    teardown = TransactionTestCase._fixture_teardown  # type: ignore[attr-defined]

    def retrying(self: Any) -> None:
        for attempt in range(5):
            try:
                teardown(self)
                return
            except Exception as exc:
                if "deadlock detected" not in f"{exc} {exc.__cause__}" or attempt == 4:
                    raise
                time.sleep(0.2)

    TransactionTestCase._fixture_teardown = retrying  # type: ignore[attr-defined]


_flush_retrying_deadlocks()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """PostgreSQL-only tests are skipped on SQLite runs (CI runs the suite on both)."""
    from django.conf import settings

    on_postgres = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    skip = pytest.mark.skip(reason="needs DATABASE_URL=postgres://...")
    for item in items:
        if "postgres" in item.keywords and not on_postgres:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fast_password_hashing(request: Any, settings: Any) -> None:
    """The personas have passwords (console logins); the production hasher costs ~0.3 s each.
    Browser tests keep it: their server process must be able to check the passwords."""
    if request.node.get_closest_marker("browser") is None:
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _reset_clock() -> Iterator[None]:
    clock.reset()
    yield
    clock.reset()


@pytest.fixture(autouse=True)
def _stop_listener() -> Iterator[None]:
    """A test that started the LISTEN connection closes it, or the test database cannot be dropped."""
    yield
    from messaging import listener

    listener.stop()


@pytest.fixture(autouse=True)
def _release_round_connection() -> Iterator[None]:
    """The group-commit round thread keeps its connection between rounds; a test gives it back,
    or the test database cannot be dropped."""
    yield
    from messaging import group_commit

    group_commit.release_round_connection()


@pytest.fixture
def on_postgres() -> bool:
    return connection.vendor == "postgresql"


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", is_superuser=True, is_staff=True, password="pw-alice")


@pytest.fixture
def bob(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("bob", password="pw-bob")


@pytest.fixture
def mallory(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("mallory", password="pw-mallory")


@pytest.fixture
def grant() -> Callable[..., Any]:
    """grant(bob, "orders.*", "send", "consume") adds an access rule for a user."""
    from messaging import access

    return lambda user, pattern, *actions, kind="any": access.grant(
        user=user, pattern=pattern, actions=list(actions), kind=kind
    )


@pytest.fixture
def token_for() -> Callable[[Any], str]:
    return lambda user: tokens.create_token(user=user)


@pytest.fixture
def queue_factory() -> Callable[..., Any]:
    counter = iter(range(1_000_000))

    def make(name: str | None = None, **settings: Any) -> Any:
        queue, _ = broker.create_queue(name=name or f"q{next(counter)}", settings=broker.QueueSettings(**settings))
        return queue

    return make


@pytest.fixture
def publish() -> Callable[..., list[broker.PublishResult]]:
    """publish(queue, "a", "b", priority=7) publishes one message per body."""

    def send(queue: Any, *bodies: str, **options: Any) -> list[broker.PublishResult]:
        return broker.publish(queue=queue, messages=[broker.OutgoingMessage(body=b, **options) for b in bodies])

    return send
