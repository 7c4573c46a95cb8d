"""A flood from one token gets 429 with Retry-After while another token is still served."""

from __future__ import annotations

import pytest
from django.test import Client

from messaging import broker, limits

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _small_limits(settings):
    settings.PEGASUS = {**settings.PEGASUS, "PUBLISH_RATE_PER_TOKEN": 1.0, "PUBLISH_BURST_PER_TOKEN": 5}
    limits.publish_limiter.reset()
    yield
    limits.publish_limiter.reset()


def _publish(token: str, n: int):
    return Client().post(
        "/api/v1/queues/orders.eu/messages",
        {"messages": [{"body": f"m{i}"} for i in range(n)]},
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


def test_flood_from_one_token__429_while_another_token_is_served(bob, grant, token_for):
    broker.create_queue(name="orders.eu")
    grant(bob, "orders.*", "send")
    flooder, other = token_for(bob), token_for(bob)
    assert _publish(flooder, 5).status_code == 201
    refused = _publish(flooder, 1)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "over_quota"
    assert int(refused["Retry-After"]) >= 1
    assert _publish(other, 3).status_code == 201  # a different token has its own bucket


def test_batch_larger_than_the_burst__429(bob, grant, token_for):
    broker.create_queue(name="orders.eu")
    grant(bob, "orders.*", "send")
    assert _publish(token_for(bob), 6).status_code == 429


def test_admins__are_exempt_by_default(alice, token_for):
    broker.create_queue(name="orders.eu")
    token = token_for(alice)
    assert all(_publish(token, 5).status_code == 201 for _ in range(3))
