"""The group-commit round thread keeps its database connection between rounds
(messaging/group_commit.py, keep_connection_if_usable)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError

from messaging import broker, group_commit
from messaging.access import Kind
from messaging.models import Message

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


@pytest.fixture(autouse=True)
def _own_thread(monkeypatch):
    monkeypatch.setattr(group_commit, "OWN_THREAD", True)  # as in a server


@pytest.fixture
def admin(django_user_model):
    return django_user_model.objects.create_user("gc-admin", is_superuser=True)


def _publish(name, body, user):
    return group_commit.publish(user=user, kind=Kind.QUEUE, name=name, messages=[broker.OutgoingMessage(body=body)])


def _on_round_thread(fn):
    return group_commit._ROUND_THREAD.submit(fn).result()


def _round_connection_pid():
    from django.db import connection

    return None if connection.connection is None else connection.connection.info.backend_pid


async def test_round_thread__keeps_its_connection_between_rounds(admin):
    await database_sync_to_async(broker.create_queue)(name="gc-keep")
    await _publish("gc-keep", "1", admin)
    first = _on_round_thread(_round_connection_pid)
    await _publish("gc-keep", "2", admin)
    assert first is not None and _on_round_thread(_round_connection_pid) == first
    group_commit.release_round_connection()
    assert _on_round_thread(_round_connection_pid) is None


async def test_round_thread__a_kept_connection_that_dies_fails_one_round_then_is_replaced(admin):
    """PostgreSQL drops the kept connection (a restart, an operator's pg_terminate_backend): the
    next round fails (the publisher is told, 503; nothing is lost that was confirmed), and the
    one after it borrows a new connection."""
    await database_sync_to_async(broker.create_queue)(name="gc-dies")
    await _publish("gc-dies", "before", admin)
    pid = _on_round_thread(_round_connection_pid)

    def terminate():
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    await database_sync_to_async(terminate)()
    with pytest.raises(OperationalError):
        await _publish("gc-dies", "lost link", admin)
    await _publish("gc-dies", "after", admin)
    assert _on_round_thread(_round_connection_pid) not in (None, pid)
    bodies = await database_sync_to_async(lambda: sorted(Message.objects.values_list("body", flat=True)))()
    assert bodies == ["after", "before"]
