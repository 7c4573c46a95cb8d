"""broker.register_consumer / refresh_consumers / unregister_consumers, and stale-row cleanup."""

from __future__ import annotations

from typing import Any

import pytest

from messaging import broker, clock, queries
from messaging.models import Consumer

pytestmark = pytest.mark.django_db


def test_registry__counts_in_stats_until_unregistered(queue_factory: Any, bob: Any) -> None:
    q = queue_factory()
    a = broker.register_consumer(connection="ws-a", user=bob, queue=q, protocol="json", prefetch=10)
    broker.register_consumer(connection="ws-b", user=bob, queue=q, protocol="stomp1.2", prefetch=5)
    broker.refresh_consumers(unacked={a: 3})
    assert Consumer.objects.get(pk=a).unacked == 3
    assert queries.queue_stats(q)["consumers"] == 2
    assert broker.unregister_consumers(connection="ws-a") == 1
    assert queries.queue_stats(q)["consumers"] == 1
    assert broker.unregister_consumers() == 0  # no filter: removes nothing


def test_maintenance__removes_consumers_of_a_dead_process(queue_factory: Any) -> None:
    q = queue_factory()
    stale = broker.register_consumer(connection="ws-dead", user=None, queue=q, protocol="json", prefetch=1)
    clock.advance(11 * 60)
    live = broker.register_consumer(connection="ws-live", user=None, queue=q, protocol="json", prefetch=1)
    broker.run_maintenance()
    assert list(Consumer.objects.values_list("pk", flat=True)) == [live]
    assert not Consumer.objects.filter(pk=stale).exists()
