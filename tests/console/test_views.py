"""The console's pages and actions through Django's test client (the browser tests are in test_browser.py)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from django.urls import reverse

from console.models import AuditEntry
from messaging import broker, queries
from messaging.models import Consumer, Delivery, State

pytestmark = pytest.mark.django_db

XSS_BODY = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
XSS_HEADER = '"><img src=x onerror=alert(3)><script>alert(4)</script>'


@pytest.fixture
def console(client, alice):
    client.force_login(alice)
    return client


def url(name, *args):
    return reverse(f"admin:{name}", args=args)


def find(pattern, html):
    found = re.search(pattern, html, re.S)
    assert found is not None, pattern
    return found.group(1)


def cursors(queue):
    return [m.cursor for m in queries.browse(queue, limit=1000)]


def test_console__staff_only(client, bob, queue_factory):
    q = queue_factory()
    for path in (url("index"), url("console_destination", q.pk), url("console_transactions")):
        assert client.get(path).status_code == 302  # to the login page
    client.force_login(bob)  # not staff
    assert client.get(url("index")).status_code == 302
    assert client.post(url("console_purge", q.pk)).status_code == 302


def test_console__staff_without_browse_permission_gets_403(client, django_user_model, queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    staff = django_user_model.objects.create_user("carol", is_staff=True)
    client.force_login(staff)
    assert client.get(url("index")).status_code == 200
    assert client.get(url("console_destination", q.pk)).status_code == 403
    assert client.post(url("console_purge", q.pk)).status_code == 403
    assert queries.queue_stats(q)["depth"] == 1


def test_console__actions_need_csrf(alice, queue_factory, publish):
    from django.test import Client

    q = queue_factory()
    publish(q, "a")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    for name in ("console_purge", "console_pause", "console_redrive", "console_bulk"):
        assert strict.post(url(name, q.pk), {"action": "delete", "cursor": cursors(q)}).status_code == 403
    txn = broker.begin()
    broker.prepare(transaction_id=txn.id)
    assert strict.post(url("console_transaction", txn.id, "commit")).status_code == 403
    assert queries.queue_stats(q)["depth"] == 1 and not AuditEntry.objects.exists()


def test_overview__lists_destinations_with_stats(console, queue_factory, publish):
    q = queue_factory("orders", max_deliveries=1, dead_letter_queue=queue_factory("orders-dlq").name)
    publish(q, "a", "b", "c")
    publish(q, "later", delay_seconds=60)
    [m] = broker.receive(queue=q)
    topic, _ = broker.create_topic(name="events")
    broker.create_subscription(topic=topic, name="audit")
    page = console.get(url("index"))
    assert page.status_code == 200
    html = page.content.decode()
    row = find(r'<tr class="" data-destination="orders">(.*?)</tr>', html)
    assert re.search(r'class="num depth">2<', row) and re.search(r'class="num in-flight">1<', row)
    assert re.search(r'class="num scheduled">1<', row)
    assert 'data-destination="events"' in html and 'data-destination="events/audit"' in html
    assert "<svg" in html and "Content-Security-Policy" in page.headers
    body = console.get(url("console_overview_body"))
    assert body.status_code == 200 and b"orders" in body.content
    broker.nack(receipts=[m.receipt])  # dead-lettered to orders-dlq
    html = console.get(url("console_overview_body")).content.decode()
    row = find(r'data-destination="orders">(.*?)</tr>', html)
    assert re.search(r'class="num dead-lettered">1<', row)


def test_browse__keyset_pages_without_consuming(console, queue_factory, publish):
    q = queue_factory()
    publish(q, *[f"m{i:03d}" for i in range(120)])
    first = console.get(url("console_destination", q.pk))
    assert first.status_code == 200
    html = first.content.decode()
    assert html.count('class="select-row"') == 50 and "m000" in html and "m050" not in html
    nxt = find(r'href="\?([^"]*)" id="next-page"', html).replace("&amp;", "&")
    second = console.get(url("console_destination", q.pk) + "?" + nxt).content.decode()
    assert "m050" in second and "m049" not in second
    assert queries.queue_stats(q)["depth"] == 120  # nothing leased
    assert all(d.delivery_count == 0 for d in Delivery.objects.all())


def test_browse__filters_by_state_and_header(console, queue_factory, publish):
    q = queue_factory()
    publish(q, "red-one", headers={"color": "red"})
    publish(q, "blue-one", headers={"color": "blue"})
    broker.receive(queue=q)  # red-one is in flight
    html = console.get(url("console_destination", q.pk), {"header": "color", "value": "blue"}).content.decode()
    assert "blue-one" in html and "red-one" not in html
    html = console.get(url("console_destination", q.pk), {"state": "in_flight"}).content.decode()
    assert "red-one" in html and "blue-one" not in html
    bad = console.get(url("console_destination", q.pk), {"header": "a__contains", "value": "x"})
    assert bad.status_code == 200 and b"double underscore" in bad.content


def test_message__text_json_and_binary(console, queue_factory, publish):
    q = queue_factory()
    publish(q, '{"b": 1, "a": [1, 2]}', content_type="application/json")
    publish(q, base64.b64encode(bytes(range(40))).decode(), content_type="application/octet-stream")
    publish(q, "plain < text")
    json_m, bin_m, text_m = queries.browse(q)
    html = console.get(url("console_message", q.pk, json_m.cursor)).content.decode()
    assert "{\n  &quot;b&quot;: 1,\n  &quot;a&quot;: [\n    1," in html
    html = console.get(url("console_message", q.pk, bin_m.cursor)).content.decode()
    assert "binary, 40 bytes" in html and "00000000  00 01 02 03" in html
    html = console.get(url("console_message", q.pk, text_m.cursor)).content.decode()
    assert "plain &lt; text" in html and "priority" in html and "delivery count" in html
    assert console.get(url("console_message", q.pk, "d999999")).status_code == 404


def test_message_and_browse__never_render_bodies_or_headers_unescaped(console, queue_factory, publish):
    q = queue_factory()
    publish(q, XSS_BODY, headers={XSS_HEADER[:50]: XSS_HEADER, "x": XSS_BODY})
    publish(q, XSS_BODY, content_type="application/json")
    publish(q, json.dumps({"k": XSS_BODY}), content_type="application/json")
    pages = [console.get(url("console_destination", q.pk)), console.get(url("console_overview_body"))]
    pages += [console.get(url("console_message", q.pk, c)) for c in cursors(q)]
    for page in pages:
        html = page.content.decode()
        assert page.status_code == 200
        assert (
            "<script>alert" not in html
            and "<img src=x" not in html
            and "onerror=alert" not in html.replace("&quot;&gt;&lt;img src=x onerror=alert", "")
        )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[2].content.decode()


def test_purge__confirmation_states_the_count_and_keeps_leased(console, queue_factory, publish):
    q = queue_factory("jobs")
    publish(q, "a", "b", "c")
    [leased] = broker.receive(queue=q)
    page = console.get(url("console_purge", q.pk)).content.decode()
    assert re.search(r"removes <strong>2</strong> ready or scheduled messages", page)
    response = console.post(url("console_purge", q.pk))
    assert response.status_code == 302
    assert queries.queue_stats(q)["in_flight"] == 1 and queries.queue_stats(q)["depth"] == 0
    assert broker.ack(receipts=[leased.receipt]) == ["ok"]
    entry = AuditEntry.objects.get()
    assert (entry.username, entry.action, entry.target, entry.messages, entry.outcome) == (
        "alice", "purge", "jobs", 2, "ok",
    )  # fmt: skip
    assert "Purged 2 messages" in console.get(url("console_destination", q.pk)).content.decode()


def test_bulk__delete_move_copy_priority_are_audited(console, queue_factory, publish):
    q, other = queue_factory("src"), queue_factory("dst")
    publish(q, "a", "b", "c", "d")
    a, b, c, d = cursors(q)
    assert console.post(url("console_bulk", q.pk), {"action": "delete", "cursor": [a]}).status_code == 302
    console.post(url("console_bulk", q.pk), {"action": "move", "cursor": [b], "target": "dst"})
    console.post(url("console_bulk", q.pk), {"action": "copy", "cursor": [c], "target": "dst"})
    console.post(url("console_bulk", q.pk), {"action": "priority", "cursor": [d], "priority": "9"})
    assert sorted(m.body for m in queries.browse(q)) == ["c", "d"]
    assert sorted(m.body for m in queries.browse(other)) == ["b", "c"]
    assert broker.receive(queue=q)[0].body == "d"
    log = list(AuditEntry.objects.order_by("id").values_list("action", "target", "messages", "details"))
    assert log == [
        ("delete", "src", 1, {"selected": 1}),
        ("move", "src", 1, {"selected": 1, "target": "dst"}),
        ("copy", "src", 1, {"selected": 1, "target": "dst"}),
        ("priority", "src", 1, {"selected": 1, "priority": 9}),
    ]


def test_bulk__refusals_change_nothing(console, queue_factory, publish):
    q = queue_factory("src")
    publish(q, "a")
    picked = cursors(q)
    console.post(url("console_bulk", q.pk), {"action": "move", "cursor": picked, "target": "missing"})
    console.post(url("console_bulk", q.pk), {"action": "priority", "cursor": picked})
    console.post(url("console_bulk", q.pk), {"action": "delete", "cursor": ["garbage"]})
    console.post(url("console_bulk", q.pk), {"action": "delete"})
    assert [m.body for m in queries.browse(q)] == ["a"]
    assert list(AuditEntry.objects.values_list("action", "outcome")) == [("delete", "invalid_request")]


def test_retry__selected_and_all_dead_letters(console, queue_factory, publish):
    dlq = queue_factory("dlq")
    work = queue_factory("work", max_deliveries=1, dead_letter_queue="dlq")
    publish(work, "x", "y", "z")
    broker.nack(receipts=[m.receipt for m in broker.receive(queue=work, max_messages=3)])
    x = next(m.cursor for m in queries.browse(dlq) if m.body == "x")
    html = console.get(url("console_message", dlq.pk, x)).content.decode()
    assert "retry to work" in html and "nacked" in html
    console.post(url("console_bulk", dlq.pk), {"action": "retry", "cursor": [x]})
    assert [m.body for m in queries.browse(work)] == ["x"]
    console.post(url("console_redrive", dlq.pk))
    assert sorted(m.body for m in queries.browse(work)) == ["x", "y", "z"] and queries.browse(dlq) == []
    assert list(AuditEntry.objects.order_by("id").values_list("action", "messages")) == [("retry", 1), ("retry_all", 2)]


def test_pause_and_resume(console, queue_factory, publish):
    q = queue_factory()
    publish(q, "a")
    console.post(url("console_pause", q.pk), {"paused": "1"})
    assert broker.receive(queue=broker.get_queue(name=q.name)) == []
    assert "paused" in console.get(url("console_destination_stats", q.pk)).content.decode()
    console.post(url("console_pause", q.pk), {"paused": "0"})
    assert len(broker.receive(queue=broker.get_queue(name=q.name))) == 1
    assert list(AuditEntry.objects.order_by("id").values_list("action", flat=True)) == ["pause", "resume"]


def test_next_redirect__stays_on_this_host(console, queue_factory):
    q = queue_factory()
    response = console.post(url("console_pause", q.pk), {"paused": "1", "next": "https://evil.example/"})
    assert response["Location"] == url("console_destination", q.pk)


def test_transactions__list_and_finish_prepared(console, queue_factory, publish):
    q = queue_factory()
    open_txn, prepared, other = broker.begin(), broker.begin(), broker.begin()
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="staged")], transaction_id=prepared.id)
    broker.publish(queue=q, messages=[broker.OutgoingMessage(body="gone")], transaction_id=other.id)
    broker.prepare(transaction_id=prepared.id)
    broker.prepare(transaction_id=other.id)
    html = console.get(url("console_transactions")).content.decode()
    assert open_txn.id in html and prepared.id in html
    console.post(url("console_transaction", prepared.id, "commit"))
    console.post(url("console_transaction", other.id, "rollback"))
    console.post(url("console_transaction", open_txn.id, "commit"))  # open: refused
    assert [m.body for m in queries.browse(q)] == ["staged"]
    assert broker.get_transaction(transaction_id=open_txn.id).state == "open"
    log = list(AuditEntry.objects.order_by("id").values_list("action", "outcome"))
    assert log == [
        ("transaction_commit", "ok"),
        ("transaction_rollback", "ok"),
        ("transaction_commit", "transaction_state"),
    ]


def test_consumers__live_ones_listed(console, queue_factory, alice):
    from messaging import clock

    q = queue_factory("feed")
    now = clock.now()
    Consumer.objects.create(
        connection="ws-1234", user=alice, queue=q, protocol="stomp", prefetch=10, unacked=3,
        connected_at=now, heartbeat_at=now,
    )  # fmt: skip
    html = console.get(url("console_consumers")).content.decode()
    assert "ws-1234" in html and "feed" in html and ">10<" in html and ">3<" in html


def test_audit_log__viewable_and_read_only(console, queue_factory, publish):
    q = queue_factory("jobs")
    publish(q, "a")
    console.post(url("console_purge", q.pk))
    page = console.get(url("console_auditentry_changelist"))
    assert page.status_code == 200 and b"purge" in page.content and b"jobs" in page.content
    entry = AuditEntry.objects.get()
    assert console.post(url("console_auditentry_delete", entry.pk), {"post": "yes"}).status_code == 403
    assert console.get(url("console_auditentry_add")).status_code == 403


def test_static_assets_are_local(console):
    html = console.get(url("index")).content.decode()
    assert "/static/console/console.js" in html and "/static/console/console.css" in html
    assert not re.search(r'(src|href)="https?://', html)


def test_leased_rows_untouched_by_every_action(console, queue_factory, publish):
    q = queue_factory()
    queue_factory("other")
    publish(q, "a")
    picked = cursors(q)
    [m] = broker.receive(queue=q)
    for data in (
        {"action": "delete"}, {"action": "move", "target": "other"}, {"action": "copy", "target": "other"},
        {"action": "retry"}, {"action": "priority", "priority": "1"},
    ):  # fmt: skip
        console.post(url("console_bulk", q.pk), {**data, "cursor": picked})
    console.post(url("console_purge", q.pk))
    assert Delivery.objects.get().state == State.LEASED
    assert broker.ack(receipts=[m.receipt]) == ["ok"]


def test_browse__filtered_pages_scan_a_bounded_window(queue_factory, publish):
    """A rare match deep in a queue is reached by paging on, each page reading at most `scan` rows."""
    q = queue_factory()
    publish(q, *[f"m{i}" for i in range(30)])
    publish(q, "needle", headers={"kind": "rare"})
    rows, resume = queries.browse_window(q, header=("kind", "rare"), scan=10)
    assert rows == [] and resume is not None
    seen = []
    while resume is not None:
        rows, resume = queries.browse_window(q, header=("kind", "rare"), scan=10, after=resume)
        seen += [m.body for m in rows]
    assert seen == ["needle"]
    rows, resume = queries.browse_window(q, state="ready", limit=5, scan=100)
    assert [m.body for m in rows] == ["m0", "m1", "m2", "m3", "m4"] and resume == rows[-1].cursor


def test_browse_page__filtered_continuation_link(console, queue_factory, publish, monkeypatch):
    q = queue_factory()
    publish(q, *[f"m{i}" for i in range(5)])
    publish(q, "needle", headers={"kind": "rare"})
    real = queries.browse_window
    monkeypatch.setattr(queries, "browse_window", lambda *a, **kw: real(*a, **{**kw, "scan": 3}))
    html = console.get(url("console_destination", q.pk), {"header": "kind", "value": "rare"}).content.decode()
    assert "needle" not in html and "searches on" in html
    nxt = find(r'href="\?([^"]*)" id="next-page"', html).replace("&amp;", "&")
    html = console.get(url("console_destination", q.pk) + "?" + nxt).content.decode()
    assert "needle" in html


def test_transactions__staff_see_and_finish_only_their_own(client, django_user_model, alice):
    carol = django_user_model.objects.create_user("carol", is_staff=True)
    mine, hers = broker.begin(user=carol), broker.begin(user=alice)
    for txn in (mine, hers):
        broker.prepare(transaction_id=txn.id)
    client.force_login(carol)
    html = client.get(url("console_transactions")).content.decode()
    assert mine.id in html and hers.id not in html
    assert client.post(url("console_transaction", hers.id, "commit")).status_code == 404
    client.post(url("console_transaction", mine.id, "rollback"))
    assert broker.get_transaction(transaction_id=mine.id).state == "rolled_back"
    assert broker.get_transaction(transaction_id=hers.id).state == "prepared"


def test_subscription__browse_and_purge(console):
    topic, _ = broker.create_topic(name="events")
    sub, _ = broker.create_subscription(topic=topic, name="audit")
    broker.publish(topic=topic, messages=[broker.OutgoingMessage(body="evt-1"), broker.OutgoingMessage(body="evt-2")])
    html = console.get(url("console_destination", sub.pk)).content.decode()
    assert "Subscription events/audit" in html and "evt-1" in html and "evt-2" in html
    console.post(url("console_purge", sub.pk))
    assert queries.browse(sub) == []
    assert AuditEntry.objects.get().target == "events/audit"
