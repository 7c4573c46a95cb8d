"""Managing bridges: validation, the allowed-targets rule, the write-only token, status."""

from __future__ import annotations

from datetime import timedelta

import pytest

from messaging import broker, clock
from messaging.bridges import conf, services
from messaging.bridges.exceptions import BridgeNameTaken, InvalidSource, TargetNotAllowed
from messaging.bridges.models import BridgeState, LinkStatus
from messaging.exceptions import InvalidName, InvalidRequest, QueueNotFound, SubscriptionNotFound, TopicNotFound

from .conftest import TARGET

pytestmark = pytest.mark.django_db


def test_create__stores_it_with_a_waiting_state(bridge_factory):
    bridge = bridge_factory()
    assert bridge.target_url == TARGET and bridge.uid
    assert BridgeState.objects.get(pk=bridge.pk).status == LinkStatus.WAITING
    assert services.bridge_status(bridge).status == LinkStatus.WAITING


@pytest.mark.parametrize(
    "url",
    ["http://elsewhere.example:8001", "http://target.example:8002", "https://target.example:8001", "file:///etc/passwd",
     "http://user:pw@target.example:8001", "http://target.example:8001?x=1"],
)  # fmt: skip
def test_create__only_targets_the_operator_allows(bridge_factory, url):
    with pytest.raises(TargetNotAllowed):
        bridge_factory(target_url=url)


def test_create__target_urls_are_compared_normalized(bridge_factory):
    assert bridge_factory(target_url="HTTP://Target.Example:8001/").target_url == TARGET


def test_normalize_url__drops_default_ports():
    assert conf.normalize_url("https://x.example:443/base/") == "https://x.example/base"
    assert conf.normalize_url("http://[::1]:8000") == "http://[::1]:8000"


def test_create__needs_an_existing_source(bridge_factory, queue_factory):
    with pytest.raises(QueueNotFound):
        bridge_factory(queue_factory(), source_name="nope")
    with pytest.raises(TopicNotFound):
        bridge_factory(queue_factory(), source_topic="t", source_name="nope")
    broker.create_topic(name="t")
    with pytest.raises(SubscriptionNotFound):
        bridge_factory(queue_factory(), source_topic="t", source_name="nope")


def test_create__a_subscription_source_must_be_durable(bridge_factory, queue_factory):
    topic, _ = broker.create_topic(name="events")
    broker.create_subscription(topic=topic, name="keep", durable=True)
    broker.create_subscription(topic=topic, name="gone", durable=False)
    assert bridge_factory(queue_factory(), source_topic="events", source_name="keep").source_label == "events/keep"
    with pytest.raises(InvalidSource):
        bridge_factory(queue_factory(), source_topic="events", source_name="gone")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"name": "bad name"}, InvalidName),
        ({"target_name": "bad/name"}, InvalidName),
        ({"batch_size": 0}, InvalidRequest),
        ({"batch_size": 1001}, InvalidRequest),
        ({"target_kind": "exchange"}, InvalidRequest),
        ({"target_token": ""}, InvalidRequest),
        ({"target_token": "two\nlines"}, InvalidRequest),
    ],
)
def test_create__rejects_bad_fields(bridge_factory, fields, error):
    with pytest.raises(error):
        bridge_factory(**fields)


def test_create__names_are_unique(bridge_factory, queue_factory):
    queue = queue_factory()
    bridge_factory(queue)
    with pytest.raises(BridgeNameTaken):
        bridge_factory(queue)


def test_update__a_blank_token_keeps_the_stored_one(bridge_factory):
    bridge = bridge_factory()
    services.update_bridge(bridge=bridge, changes={"target_token": "", "batch_size": 5})
    bridge.refresh_from_db()
    assert (bridge.target_token, bridge.batch_size) == ("pgs_secret-token", 5)
    services.update_bridge(bridge=bridge, changes={"target_token": "pgs_new"})
    bridge.refresh_from_db()
    assert bridge.target_token == "pgs_new"


def test_update__validates_like_create(bridge_factory):
    bridge = bridge_factory()
    with pytest.raises(TargetNotAllowed):
        services.update_bridge(bridge=bridge, changes={"target_url": "http://evil.example"})
    with pytest.raises(InvalidRequest):
        services.update_bridge(bridge=bridge, changes={"uid": "x"})
    bridge.refresh_from_db()
    assert bridge.target_url == TARGET


def test_status__lag_counts_waiting_and_in_flight_messages(bridge_factory, publish):
    bridge = bridge_factory()
    queue = broker.get_queue(name=bridge.source_name)
    publish(queue, "a", "b", "c")
    broker.receive(queue=queue)
    assert services.bridge_status(bridge).lag == 3
    broker.delete_queue(queue=queue)
    assert services.bridge_status(bridge).lag is None


def test_status__a_live_heartbeat_shows_the_runners_state_and_disabled_shows_stopped(bridge_factory):
    bridge = bridge_factory()
    BridgeState.objects.filter(pk=bridge.pk).update(status=LinkStatus.RETRYING, heartbeat_at=clock.now())
    assert services.bridge_status(bridge).status == LinkStatus.RETRYING
    clock.advance(timedelta(minutes=5).total_seconds())
    assert services.bridge_status(bridge).status == LinkStatus.WAITING  # nobody is running it
    services.update_bridge(bridge=bridge, changes={"enabled": False})
    assert services.bridge_status(bridge).status == LinkStatus.STOPPED


def test_delete__removes_bridge_and_state_but_not_messages(bridge_factory, publish):
    bridge = bridge_factory()
    queue = broker.get_queue(name=bridge.source_name)
    publish(queue, "a")
    services.delete_bridge(bridge=bridge)
    assert not BridgeState.objects.filter(pk=bridge.pk).exists()
    assert len(broker.receive(queue=queue)) == 1


def test_update__disabling_works_even_when_the_source_and_target_are_gone(bridge_factory, settings):
    bridge = bridge_factory()
    broker.delete_queue(queue=broker.get_queue(name=bridge.source_name))
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": []}
    services.update_bridge(bridge=bridge, changes={"enabled": False})
    bridge.refresh_from_db()
    assert bridge.enabled is False
    with pytest.raises(TargetNotAllowed):
        services.update_bridge(bridge=bridge, changes={"enabled": True})
