"""Tokens and access rules in the console: created, shown once, revoked, every change audited."""

from __future__ import annotations

import re

import pytest

from console.models import AuditEntry
from messaging import access, tokens
from messaging.access import Action, Kind
from messaging.models import AccessRule, ApiToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, alice):
    client.force_login(alice)
    return client


def test_token__created_in_the_console_is_shown_once_and_stored_hashed(admin_client, bob):
    response = admin_client.post(
        "/console/messaging/apitoken/add/", {"user": bob.pk, "name": "ci", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )  # fmt: skip
    assert response.status_code == 200
    [raw] = re.findall(r"pgs_[A-Za-z0-9_-]{20,}", response.content.decode())
    token = ApiToken.objects.get(user=bob, name="ci")
    assert token.key_hash == tokens.hash_token(raw) and raw not in str(token.__dict__)
    assert tokens.authenticate(raw) == bob
    page = admin_client.get(f"/console/messaging/apitoken/{token.pk}/change/").content.decode()
    assert raw not in page  # never shown again
    assert AuditEntry.objects.filter(action="api_token.add", username="alice").exists()


def test_token__revoked_in_the_console_is_refused_and_audited(admin_client, bob):
    raw = tokens.create_token(user=bob, name="old")
    token = ApiToken.objects.get(user=bob, name="old")
    response = admin_client.post(
        "/console/messaging/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}, follow=True
    )
    assert response.status_code == 200
    assert tokens.authenticate(raw) is None and not tokens.is_active(token.pk)
    entry = AuditEntry.objects.get(action="api_token.revoke")
    assert entry.username == "alice" and entry.messages == 1


def test_access_rule__changes_are_audited_and_take_effect(admin_client, bob):
    response = admin_client.post(
        "/console/messaging/accessrule/add/",
        {"user": bob.pk, "kind": "any", "pattern": "orders.*", "send": "on", "consume": "on"},
        follow=True,
    )
    assert response.status_code == 200
    rule = AccessRule.objects.get(user=bob)
    assert access.can(bob, Action.SEND, kind=Kind.QUEUE, name="orders.eu")
    admin_client.post(
        f"/console/messaging/accessrule/{rule.pk}/change/",
        {"user": bob.pk, "kind": "any", "pattern": "orders.*", "send": "on"},
    )
    assert not access.can(bob, Action.CONSUME, kind=Kind.QUEUE, name="orders.eu")
    admin_client.post(f"/console/messaging/accessrule/{rule.pk}/delete/", {"post": "yes"})
    assert not access.can(bob, Action.SEND, kind=Kind.QUEUE, name="orders.eu")
    actions = list(AuditEntry.objects.filter(username="alice").values_list("action", flat=True))
    assert {"access_rule.add", "access_rule.change", "access_rule.delete"} <= set(actions)


def test_group_membership_changes_are_audited(admin_client, bob):
    from django.contrib.auth.models import Group

    response = admin_client.post("/console/auth/group/add/", {"name": "producers"}, follow=True)
    assert response.status_code == 200 and Group.objects.filter(name="producers").exists()
    assert AuditEntry.objects.filter(action="group.add", target="producers").exists()


def test_security_pages__are_for_superusers_only(client, django_user_model):
    staff = django_user_model.objects.create_user("carol", is_staff=True, password="x")
    client.force_login(staff)
    for url in ("/console/messaging/apitoken/", "/console/messaging/accessrule/", "/console/auth/user/"):
        assert client.get(url).status_code == 403, url
