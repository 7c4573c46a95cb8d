from __future__ import annotations

import pytest

from messaging import broker, limits
from messaging.exceptions import OverQuota


def test_rate_limiter__refuses_past_the_burst_then_refills(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("messaging.limits.time.monotonic", lambda: clock[0])
    limiter = limits.RateLimiter()
    limiter.take("a", 10, rate=10, burst=10)
    with pytest.raises(OverQuota) as refused:
        limiter.take("a", 5, rate=10, burst=10)
    assert refused.value.retry_after == pytest.approx(0.5)
    limiter.take("b", 10, rate=10, burst=10)  # another token is still served
    clock[0] += 0.5
    limiter.take("a", 5, rate=10, burst=10)


def test_rate_limiter__a_request_larger_than_the_burst_is_refused():
    with pytest.raises(OverQuota):
        limits.RateLimiter().take("a", 11, rate=10, burst=10)


def test_connection_counter__limits_per_user(settings):
    settings.PEGASUS = {**settings.PEGASUS, "MAX_CONNECTIONS_PER_USER": 2}
    counter = limits.ConnectionCounter()
    counter.acquire(1)
    counter.acquire(1)
    with pytest.raises(OverQuota):
        counter.acquire(1)
    counter.acquire(2)
    counter.release(1)
    counter.acquire(1)


@pytest.mark.django_db
def test_destination_quota__applies_to_non_admins(settings, bob, alice):
    settings.PEGASUS = {**settings.PEGASUS, "MAX_DESTINATIONS_PER_USER": 2}
    broker.create_queue(name="a", user=bob)
    broker.create_topic(name="t", user=bob)
    with pytest.raises(OverQuota):
        broker.create_queue(name="b", user=bob)
    broker.create_queue(name="a", user=bob)  # an existing one is no new destination
    for i in range(3):
        broker.create_queue(name=f"admin{i}", user=alice)
