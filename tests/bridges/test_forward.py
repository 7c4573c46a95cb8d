"""The forwarding loop against the real broker and a fake target (tests/bridges/conftest.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from messaging import broker, clock, queries
from messaging.bridges import conf, link
from messaging.bridges.bridge import Stopped
from messaging.bridges.models import Bridge, BridgeState, LinkStatus
from messaging.models import Delivery, State

pytestmark = pytest.mark.django_db


def _drain(fwd: Any, limit: int = 100) -> None:
    for _ in range(limit):
        if not fwd.step():
            return
    raise AssertionError("the bridge never ran out of messages")


def _state(bridge: Bridge) -> BridgeState:
    return BridgeState.objects.get(pk=bridge.pk)


def test_step__forwards_batches_in_order_then_acks(bridge_factory, forwarder_for, target, publish, queue_factory):
    queue = queue_factory()
    publish(queue, *[f"m{i}" for i in range(25)])
    bridge = bridge_factory(queue)
    _drain(forwarder_for(bridge))
    assert target.bodies == [f"m{i}" for i in range(25)]
    assert [len(json.loads(r.content)["messages"]) for r in target.requests] == [10, 10, 5]
    assert queries.queue_stats(queue)["depth"] == 0 and queries.queue_stats(queue)["in_flight"] == 0
    state = _state(bridge)
    assert (state.forwarded_count, state.duplicate_count, state.retry_count) == (25, 0, 0)
    assert state.status == LinkStatus.CONNECTED and state.last_success_at is not None
    assert state.pending_receipts == []


def test_step__sends_the_public_contract_with_token_and_stable_dedup_ids(
    bridge_factory, forwarder_for, target, publish
):
    bridge = bridge_factory()
    queue = broker.get_queue(name=bridge.source_name)
    [result] = publish(queue, "hello", headers={"k": "v"}, priority=7, content_type="text/x", ttl_seconds=100)
    forwarder_for(bridge).step()
    request = target.requests[0]
    assert request.url == "http://target.example:8001/api/v1/queues/inbox/messages"
    assert request.headers["authorization"] == "Bearer pgs_secret-token"
    [sent] = json.loads(request.content)["messages"]
    assert sent == {
        "body": "hello", "headers": {"k": "v"}, "priority": 7, "durable": True, "content_type": "text/x",
        "dedup_id": f"bridge:{bridge.uid.hex}:{result.id}", "ttl_seconds": 100,
    }  # fmt: skip


def test_step__forwards_to_a_topic(bridge_factory, forwarder_for, target, publish):
    bridge = bridge_factory(target_kind="topic", target_name="events")
    publish(broker.get_queue(name=bridge.source_name), "x")
    forwarder_for(bridge).step()
    assert target.requests[0].url.path == "/api/v1/topics/events/messages"


def test_step__highest_priority_first_then_oldest(bridge_factory, forwarder_for, target, publish, queue_factory):
    queue = queue_factory()
    publish(queue, "low1", priority=1)
    publish(queue, "high1", priority=9)
    publish(queue, "low2", priority=1)
    publish(queue, "high2", priority=9)
    _drain(forwarder_for(bridge_factory(queue, batch_size=3)))
    assert target.bodies == ["high1", "high2", "low1", "low2"]


def test_step__retries_the_same_batch_with_growing_backoff(bridge_factory, forwarder_for, target, publish, sleeps):
    bridge = bridge_factory()
    publish(broker.get_queue(name=bridge.source_name), "a", "b")
    target.faults = ["connect", 503, "timeout", 500]
    assert forwarder_for(bridge).step()
    bodies = [[m["body"] for m in json.loads(r.content)["messages"]] for r in target.requests]
    assert bodies == [["a", "b"]] * 5
    assert target.bodies == ["a", "b"]
    # base 0.2 s doubling, capped at 4 s (conftest); rng 0.5 gives three quarters of each step
    assert sleeps == pytest.approx([0.3, 0.6, 1.2, 2.4])
    state = _state(bridge)
    assert (state.retry_count, state.forwarded_count, state.status) == (4, 2, LinkStatus.CONNECTED)
    assert state.last_error == "target answered 500 oops"


def test_step__a_cut_answer_is_retried_and_answered_duplicate(bridge_factory, forwarder_for, target, publish):
    bridge = bridge_factory()
    publish(broker.get_queue(name=bridge.source_name), "a", "b")
    target.faults = ["cut"]
    forwarder_for(bridge).step()
    assert target.bodies == ["a", "b"]  # stored once, though sent twice
    state = _state(bridge)
    assert (state.forwarded_count, state.duplicate_count, state.retry_count) == (2, 2, 1)
    assert "RemoteProtocolError" in state.last_error


def test_step__a_201_without_a_full_confirmation_is_a_failure_too(bridge_factory, forwarder_for, target, publish):
    bridge = bridge_factory()
    publish(broker.get_queue(name=bridge.source_name), "a", "b")
    target.faults = ["garbled", "short"]
    forwarder_for(bridge).step()
    assert target.bodies == ["a", "b"] and len(target.requests) == 3
    state = _state(bridge)
    assert (state.retry_count, state.forwarded_count, state.duplicate_count) == (2, 2, 2)
    assert state.last_error == "target confirmed 1 of 2 messages"


def test_retrying__extends_the_lease_so_nothing_is_redelivered_or_dead_lettered(
    bridge_factory, forwarder_for, target, publish, queue_factory, settings
):
    queue = queue_factory(max_deliveries=1)
    publish(queue, "a")
    bridge = bridge_factory(queue)
    lease = 60
    # Each backoff lasts most of a lease: without extending, it would lapse and dead-letter.
    target.faults = [503] * 6
    fwd = forwarder_for(bridge, sleep=lambda _: clock.advance(lease * 0.8))
    fwd.step()
    assert target.bodies == ["a"]
    delivery = Delivery.objects.get(queue=queue)
    assert (delivery.state, delivery.delivery_count) == (State.ACKED, 1)


def test_lost_lease__the_batch_goes_out_again_before_anything_newer(
    bridge_factory, forwarder_for, target, publish, queue_factory
):
    queue = queue_factory(max_deliveries=10)
    publish(queue, *[f"m{i}" for i in range(4)])
    bridge = bridge_factory(queue, batch_size=2)
    target.faults = ["cut"]
    # The process stalls past its lease after the cut: the lease on m0, m1 is gone.
    fwd = forwarder_for(bridge, sleep=lambda _: clock.advance(120))
    assert fwd.step()  # gave up the batch without acking
    assert _state(bridge).forwarded_count == 0
    _drain(fwd)
    assert target.bodies == ["m0", "m1", "m2", "m3"]
    assert _state(bridge).forwarded_count == 4 and _state(bridge).duplicate_count == 2


def test_take_over__a_new_runner_resends_the_dead_runners_batch_first(
    bridge_factory, forwarder_for, target, publish, queue_factory
):
    queue = queue_factory(max_deliveries=10)
    publish(queue, *[f"m{i}" for i in range(4)])
    bridge = bridge_factory(queue, batch_size=2)
    first = forwarder_for(bridge)
    target.faults = [503]

    def die(_: float) -> None:
        raise KeyboardInterrupt  # the process is killed while backing off: no ack, no cleanup

    first.sleep = die
    with pytest.raises(KeyboardInterrupt):
        first.step()
    assert _state(bridge).pending_receipts
    first.lock.release()
    second = forwarder_for(bridge)  # take_over() gives the batch back at once, not after its lease
    _drain(second)
    assert target.bodies == ["m0", "m1", "m2", "m3"]
    assert Delivery.objects.get(queue=queue, message__body="m0").delivery_count == 2


def test_step__disabled_while_retrying_stops_and_gives_the_batch_back(
    bridge_factory, forwarder_for, target, publish, queue_factory
):
    queue = queue_factory()
    publish(queue, "a")
    bridge = bridge_factory(queue)
    target.faults = [503]
    fwd = forwarder_for(bridge, sleep=lambda _: Bridge.objects.filter(pk=bridge.pk).update(enabled=False))
    with pytest.raises(Stopped):
        fwd.step()
    fwd.release()
    assert queries.queue_stats(queue)["depth"] == 1  # ready again right away, nothing lost
    assert target.bodies == []


def test_step__an_empty_source_sends_nothing(bridge_factory, forwarder_for, target):
    assert forwarder_for(bridge_factory()).step() is False
    assert target.requests == []


def test_step__a_missing_source_is_an_error_state_not_a_crash(bridge_factory, forwarder_for, target, sleeps):
    bridge = bridge_factory()
    fwd = forwarder_for(bridge)
    broker.delete_queue(queue=broker.get_queue(name=bridge.source_name))
    assert fwd.step() is False
    assert "does not exist" in _state(bridge).last_error and sleeps


def test_step__a_target_the_operator_no_longer_allows_is_not_contacted(
    bridge_factory, forwarder_for, target, publish, settings
):
    bridge = bridge_factory()
    publish(broker.get_queue(name=bridge.source_name), "a")
    fwd = forwarder_for(bridge)
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": []}
    calls = []

    def allow_again(_: float) -> None:
        calls.append(1)
        settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": ["http://target.example:8001/"]}

    fwd.sleep = allow_again
    fwd.step()
    assert calls == [1] and len(target.requests) == 1
    assert "PEGASUS_BRIDGE_TARGETS" in _state(bridge).last_error


def test_the_token_is_never_in_the_state_or_the_logs(bridge_factory, forwarder_for, target, publish, caplog):
    bridge = bridge_factory()
    publish(broker.get_queue(name=bridge.source_name), "a")
    target.faults = [401, "connect"]
    with caplog.at_level(logging.DEBUG):
        forwarder_for(bridge).step()
    assert _state(bridge).last_error and "secret" not in _state(bridge).last_error
    assert "secret" not in caplog.text


def test_dedup_id__unique_per_bridge_and_stable(bridge_factory, publish, queue_factory):
    queue = queue_factory()
    publish(queue, "a")
    [msg] = broker.receive(queue=queue)
    one, two = bridge_factory(queue), bridge_factory(queue, name="other")
    assert link.dedup_id(one, msg) == f"bridge:{one.uid.hex}:{msg.id}" != link.dedup_id(two, msg)


def test_dedup_id__transient_messages_also_carry_their_publish_time(bridge_factory, publish, queue_factory):
    queue = queue_factory()
    publish(queue, "a", durable=False)
    [msg] = broker.receive(queue=queue)
    bridge = bridge_factory(queue)
    assert link.dedup_id(bridge, msg) == f"bridge:{bridge.uid.hex}:{msg.id}:{msg.published_at.timestamp():.6f}"


def test_backoff__is_capped_and_jittered(bridge_factory, forwarder_for):
    fwd = forwarder_for(bridge_factory())
    fwd.rng = lambda: 1.0
    fwd.failures = 50
    assert fwd._backoff() == 4  # the cap (conftest)
    fwd.rng = lambda: 0.0
    assert fwd._backoff() == 2


def test_step__a_batch_too_big_for_one_request_goes_out_in_order_in_several(
    bridge_factory, forwarder_for, target, publish, queue_factory, settings
):
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "MAX_REQUEST_BYTES": 3000}
    queue = queue_factory()
    bodies = [f"{i}" * 900 for i in range(5)]
    publish(queue, *bodies)
    bridge = bridge_factory(queue, batch_size=10)
    target.faults = [None, 503]  # the second request fails once, after the first was acked
    fwd = forwarder_for(bridge)
    fwd.settings = conf.get()
    assert fwd.step()
    assert [len(json.loads(r.content)["messages"]) for r in target.requests] == [2, 2, 2, 1]
    assert target.bodies == bodies
    state = _state(bridge)
    assert (state.forwarded_count, state.retry_count, state.pending_receipts) == (5, 1, [])
    assert queries.queue_stats(queue)["in_flight"] == 0


def test_retrying__honours_the_targets_retry_after_up_to_the_longest_backoff(
    bridge_factory, forwarder_for, target, publish, sleeps
):
    bridge = bridge_factory()
    queue = broker.get_queue(name=bridge.source_name)
    fwd = forwarder_for(bridge)
    publish(queue, "a")
    target.faults, target.headers = [429, 503], {"Retry-After": "3"}
    fwd.step()
    assert sleeps == [3, 3]
    publish(queue, "b")
    target.faults, target.headers = [429], {"Retry-After": "3600"}
    fwd.step()
    assert sleeps[-1] == 4  # BACKOFF_MAX_SECONDS (conftest)
    assert target.bodies == ["a", "b"]
