from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser, Group

from messaging import access
from messaging.access import Action, Kind
from messaging.exceptions import NotAuthenticated, PermissionDenied

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("orders", "orders", True),
        ("orders", "orders.eu", False),
        ("orders.*", "orders.eu", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.eu.x", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.eu.x", True),
        ("orders.#", "ordersx", False),
        ("#", "anything.at.all", True),
        ("*.dlq", "orders.dlq", True),
        ("#.dlq", "a.b.dlq", True),
        ("#.dlq", "a.b.dlqx", False),
        ("orders-eu", "orders_eu", False),
    ],
)
def test_pattern_matches(pattern, name, expected):
    assert access.pattern_matches(pattern, name) is expected


def test_new_user__may_do_nothing(bob):
    for action in Action:
        assert not access.can(bob, action, kind=Kind.QUEUE, name="orders.eu")


def test_admin__may_do_everything(alice):
    assert all(access.can(alice, a, kind=Kind.TOPIC, name="x") for a in Action)


def test_rule__grants_only_its_actions_and_names(bob, grant):
    grant(bob, "orders.*", "send", "consume")
    assert access.can(bob, Action.SEND, kind=Kind.QUEUE, name="orders.eu")
    assert access.can(bob, Action.CONSUME, kind=Kind.TOPIC, name="orders.us")
    assert not access.can(bob, Action.MANAGE, kind=Kind.QUEUE, name="orders.eu")
    assert not access.can(bob, Action.BROWSE, kind=Kind.QUEUE, name="orders.eu")
    assert not access.can(bob, Action.SEND, kind=Kind.QUEUE, name="billing")


def test_rule__kind_limits_it(bob, grant):
    grant(bob, "#", "send", kind="topic")
    assert access.can(bob, Action.SEND, kind=Kind.TOPIC, name="t")
    assert not access.can(bob, Action.SEND, kind=Kind.QUEUE, name="t")


def test_group_rule__applies_to_members(bob, mallory):
    ops = Group.objects.create(name="ops")
    bob.groups.add(ops)
    access.grant(group=ops, pattern="#", actions=["browse"])
    assert access.can(bob, Action.BROWSE, kind=Kind.QUEUE, name="any")
    assert not access.can(mallory, Action.BROWSE, kind=Kind.QUEUE, name="any")


def test_inactive_user__may_do_nothing(bob, grant):
    grant(bob, "#", "send")
    bob.is_active = False
    bob.save()
    assert not access.can(bob, Action.SEND, kind=Kind.QUEUE, name="q")


def test_require__distinguishes_anonymous_from_forbidden(bob):
    with pytest.raises(NotAuthenticated):
        access.require(AnonymousUser(), Action.SEND, kind=Kind.QUEUE, name="q")
    with pytest.raises(PermissionDenied):
        access.require(bob, Action.SEND, kind=Kind.QUEUE, name="q")
