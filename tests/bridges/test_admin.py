"""Bridges in the console: admins only, state columns, and a token that is never shown back."""

from __future__ import annotations

import pytest

from messaging.bridges.models import Bridge, BridgeState

from .conftest import TARGET

pytestmark = pytest.mark.django_db

CHANGELIST = "/console/bridges/bridge/"


def _form(queue_name: str, **overrides: str) -> dict[str, str]:
    return {
        "name": "to-dc2", "enabled": "on", "source_topic": "", "source_name": queue_name, "target_url": TARGET,
        "target_kind": "queue", "target_name": "inbox", "target_token": "pgs_admin-secret", "batch_size": "50",
        **overrides,
    }  # fmt: skip


def test_changelist__shows_state_columns(client, alice, bridge_factory):
    bridge = bridge_factory()
    BridgeState.objects.filter(pk=bridge.pk).update(forwarded_count=1234, last_error="target answered 503")
    client.force_login(alice)
    page = client.get(CHANGELIST).content.decode()
    assert bridge.name in page and "1234" in page and "target answered 503" in page
    assert "pgs_secret-token" not in page


def test_add__validates_through_the_service_and_stores_the_token(client, alice, queue_factory):
    queue = queue_factory()
    client.force_login(alice)
    refused = client.post(f"{CHANGELIST}add/", _form(queue.name, target_url="http://evil.example"))
    assert refused.status_code == 200 and "PEGASUS_BRIDGE_TARGETS" in refused.content.decode()
    assert client.post(f"{CHANGELIST}add/", _form(queue.name)).status_code == 302
    bridge = Bridge.objects.get(name="to-dc2")
    assert (bridge.target_token, bridge.batch_size) == ("pgs_admin-secret", 50)
    assert BridgeState.objects.filter(pk=bridge.pk).exists()


def test_change__never_renders_the_token_and_blank_keeps_it(client, alice, bridge_factory):
    bridge = bridge_factory()
    client.force_login(alice)
    url = f"{CHANGELIST}{bridge.pk}/change/"
    page = client.get(url).content.decode()
    assert "pgs_secret-token" not in page
    form = _form(bridge.source_name, target_token="", batch_size="7")
    del form["name"]
    assert client.post(url, form).status_code == 302
    bridge.refresh_from_db()
    assert (bridge.target_token, bridge.batch_size) == ("pgs_secret-token", 7)


def test_staff_who_are_not_admins_cannot_see_bridges(client, django_user_model, bridge_factory):
    bridge_factory()
    staff = django_user_model.objects.create_user("carol", is_staff=True, password="pw")
    client.force_login(staff)
    assert client.get(CHANGELIST).status_code == 403


def test_actions__disable_and_enable_with_a_message_for_what_cannot_be_enabled(client, alice, bridge_factory, settings):
    bridge = bridge_factory()
    client.force_login(alice)
    post = {"action": "disable", "_selected_action": [bridge.pk]}
    assert client.post(CHANGELIST, post).status_code == 302
    bridge.refresh_from_db()
    assert bridge.enabled is False
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": []}
    page = client.post(CHANGELIST, {**post, "action": "enable"}, follow=True).content.decode()
    assert "PEGASUS_BRIDGE_TARGETS" in page and "0 bridge(s) enabled" in page
    bridge.refresh_from_db()
    assert bridge.enabled is False
