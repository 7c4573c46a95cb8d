"""The console in a real browser: Playwright driving Debian's chromium against a daphne server.

The test process publishes and consumes through the broker on the same (committed) test database
and watches the console react. Screenshots go to test-artifacts/console/ (git-ignored).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async as sync_to_async  # closes its connection after each call
from playwright.async_api import Browser, Page, async_playwright, expect

from console import rates
from messaging import broker, metrics, tokens

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 20_000  # the overview refreshes every 3 s; a slow shared CI machine gets room
expect.set_options(timeout=WAIT_MS)
XSS_BODY = '<script>alert("body")</script>"><img src=x onerror=alert("img")>'
XSS_HEADER = '"><img src=x onerror=alert("hdr")><script>alert("hdr2")</script>'


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, console_server: Any, alice: Any) -> AsyncIterator[Page]:
    """A logged-in console page; any JavaScript dialog (an XSS firing) fails the test."""
    context = await browser.new_context(base_url=console_server.url, viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.set_default_timeout(WAIT_MS)
    await page.goto("/console/")
    await page.fill("#id_username", "alice")
    await page.fill("#id_password", "pw-alice")
    await page.click("input[type=submit]")
    await expect(page.locator("#overview-body")).to_be_visible()
    yield page
    await context.close()
    assert dialogs == [], f"a script ran: {dialogs}"


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def cell(page: Page, destination: str, column: str) -> Any:
    return page.locator(f'tr[data-destination="{destination}"] td.{column}')


async def db(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One database hop from the test's event loop (the connection is closed after it)."""
    return await sync_to_async(fn)(*args, **kwargs)


async def setup_orders() -> tuple[Any, Any]:
    orders, dlq = await db(_setup_orders)
    return orders, dlq


def _setup_orders() -> tuple[Any, Any]:
    dlq, _ = broker.create_queue(name="orders-dlq")
    orders, _ = broker.create_queue(
        name="orders", settings=broker.QueueSettings(max_deliveries=1, dead_letter_queue="orders-dlq")
    )
    return orders, dlq


async def publish(queue: Any, *bodies: str, **options: Any) -> None:
    await db(broker.publish, queue=queue, messages=[broker.OutgoingMessage(body=b, **options) for b in bodies])


async def receive(queue: Any) -> list[broker.ReceivedMessage]:
    result: list[broker.ReceivedMessage] = await db(broker.receive, queue=queue)
    return result


async def nack(message: broker.ReceivedMessage) -> None:
    await db(broker.nack, receipts=[message.receipt])


async def test_console__operator_walkthrough(page: Page) -> None:
    orders, dlq = await setup_orders()
    await expect(cell(page, "orders", "depth")).to_have_text("0")

    # The overview refreshes itself: a publish shows up without a reload, and so do its rates
    # (this process counted the publish; a server process flushes its own counts the same way).
    await db(metrics.drain)
    await publish(orders, '{"order": 1, "items": ["tea"]}', "second", "third", content_type="application/json")
    await db(rates.flush)
    await expect(cell(page, "orders", "depth")).to_have_text("3")
    await expect(page.locator("svg.broker-chart text").first).to_have_text("0.3/s")  # 3 in one 10 s bucket
    await shot(page, "01-overview-after-publish")

    # A poison message is dead-lettered to orders-dlq; another one stays out to a consumer.
    await nack((await receive(orders))[0])
    held = (await receive(orders))[0]
    await expect(cell(page, "orders-dlq", "depth")).to_have_text("1")
    await expect(cell(page, "orders", "in-flight")).to_have_text("1")

    # Browse without consuming, then open one message.
    await page.click('tr[data-destination="orders"] th a')
    await expect(page.locator("#messages tbody tr")).to_have_count(2)
    await shot(page, "02-browse")
    await page.locator("#messages tbody tr").first.locator("td a").click()
    await expect(page.locator("#message-body")).to_have_text("second")
    await expect(page.locator("#message-state")).to_contain_text("leased")
    await page.go_back()

    # Purge: the confirmation states the count; the leased message stays.
    await page.click("#purge-link")
    await expect(page.locator("#purge-count")).to_contain_text("removes 1 ready or scheduled message from orders")
    await shot(page, "04-purge-confirm")
    await page.click("#confirm-purge")
    await expect(page.locator(".messagelist")).to_contain_text("Purged 1 messages from orders")
    await expect(page.locator("#stat-depth")).to_have_text("0")
    await expect(page.locator("#stat-in-flight")).to_have_text("1")
    assert held.receipt  # still the consumer's to ack

    # Retry the dead letter to its origin from the dead-letter queue's page.
    await page.goto(f"/console/q/{dlq.pk}/")
    await expect(page.locator("#messages tbody tr")).to_have_count(1)
    await page.locator("#messages tbody tr td a").click()
    await expect(page.locator("#message-body")).to_contain_text('"items": [\n    "tea"')  # pretty-printed JSON
    await expect(page.locator(".message-meta")).to_contain_text("nacked, from orders")
    await shot(page, "03-dead-letter")
    await page.go_back()
    await page.locator("input.select-row").first.check()
    await page.select_option("#bulk-action", "retry")
    await page.click("#bulk-apply")
    await expect(page.locator(".messagelist")).to_contain_text("1 of 1 selected dead letters sent back")
    await expect(page.locator("#messages tbody")).to_contain_text("No messages")
    await shot(page, "05-retried")
    await page.goto("/console/")
    await expect(cell(page, "orders", "depth")).to_have_text("1")
    await expect(cell(page, "orders-dlq", "depth")).to_have_text("0")

    # Both actions are in the audit log, with who and how many.
    await page.click("text=Audit log")
    rows = page.locator("#result_list tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text("retry")
    await expect(rows.nth(0)).to_contain_text("orders-dlq")
    await expect(rows.nth(1)).to_contain_text("purge")
    await expect(rows.nth(1)).to_contain_text("alice")
    await shot(page, "06-audit-log")


async def test_console__bodies_and_headers_never_run(page: Page) -> None:
    orders, _ = await setup_orders()
    await publish(orders, XSS_BODY, headers={"evil": XSS_HEADER, XSS_HEADER[:40]: "x"})
    await publish(orders, XSS_BODY, content_type="application/json")
    await page.goto(f"/console/q/{orders.pk}/")
    await expect(page.locator("#messages tbody tr")).to_have_count(2)
    await expect(page.locator("#messages")).to_contain_text('<script>alert("body")</script>')
    for i in range(2):
        await page.goto(f"/console/q/{orders.pk}/")
        await page.locator("#messages tbody tr").nth(i).locator("td a").click()
        await expect(page.locator("#message-body")).to_have_text(XSS_BODY)
        assert await page.locator("img[src=x]").count() == 0
        assert await page.evaluate("typeof window.__pwned") == "undefined"
    await expect(page.locator("#message-headers")).to_be_hidden()  # the JSON one has no headers
    await page.go_back()
    await page.locator("#messages tbody tr").first.locator("td a").click()
    await expect(page.locator("#message-headers")).to_contain_text(XSS_HEADER)
    await shot(page, "07-escaped-message")


async def test_console__rates_of_server_traffic(page: Page, console_server: Any, alice: Any) -> None:
    """Publishes and receives through the server's REST API show up as rates: the server process
    counts them in memory and its background thread flushes them (console/rates.py)."""
    token = await db(tokens.create_token, user=alice)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"{console_server.url}/api/v1", headers=headers) as api:
        assert (await api.post("/queues", json={"name": "rated"})).status_code == 201
        await expect(cell(page, "rated", "depth")).to_have_text("0")
        published = await api.post("/queues/rated/messages", json={"messages": [{"body": str(i)} for i in range(5)]})
        assert published.status_code == 201
        received = await api.post("/queues/rated/receive", json={"max_messages": 5})
        assert len(received.json()["messages"]) == 5
    # 5 messages in one 10-second bucket: a peak of 0.5/s, once the server has flushed (every 5 s).
    await expect(page.locator('tr[data-destination="rated"] td.chart svg title')).to_contain_text("peak 0.5/s")
    await expect(cell(page, "rated", "in-flight")).to_have_text("5")
    await expect(page.locator('tr[data-destination="rated"] span.rate-published')).not_to_have_text("0.0")
    await shot(page, "08-rates")
