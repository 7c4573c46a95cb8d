"""Transactions over HTTP: begin, staged publish and ack, prepare, commit, rollback, recovery list."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api, error_code

pytestmark = pytest.mark.django_db


@pytest.fixture
def q(admin_api: Api) -> str:
    admin_api.post("/queues", {"name": "q"})
    return "q"


def _bodies(api: Api) -> list[str]:
    return [m["body"] for m in api.post("/queues/q/receive", {"max_messages": 10}).json()["messages"]]


def test_commit__applies_staged_publishes_and_acks(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "old"})
    old = user_api.post("/queues/q/receive").json()["messages"][0]
    r = user_api.post("/transactions")
    assert r.status_code == 201 and r.json()["state"] == "open"
    txn = r.json()["id"]
    assert user_api.post("/queues/q/messages", {"body": "new", "transaction": txn}).status_code == 201
    assert user_api.post("/ack", {"receipts": [old["receipt"]], "transaction": txn}).status_code == 200
    assert _bodies(user_api) == []  # staged: invisible
    r = user_api.post(f"/transactions/{txn}/commit")
    assert r.status_code == 200 and r.json()["state"] == "committed" and r.json()["finished_at"]
    assert user_api.post(f"/transactions/{txn}/commit").json()["state"] == "committed"  # a retry
    assert _bodies(user_api) == ["new"]


def test_rollback__discards_publishes_and_redelivers_acks(user_api: Api, q: str):
    user_api.post("/queues/q/messages", {"body": "old"})
    old = user_api.post("/queues/q/receive").json()["messages"][0]
    txn = user_api.post("/transactions").json()["id"]
    user_api.post("/queues/q/messages", {"messages": [{"body": "a"}, {"body": "b"}], "transaction": txn})
    user_api.post("/ack", {"receipts": [old["receipt"]], "transaction": txn})
    assert user_api.post(f"/transactions/{txn}/rollback").json()["state"] == "rolled_back"
    assert _bodies(user_api) == ["old"]
    r = user_api.post(f"/transactions/{txn}/commit")
    assert r.status_code == 409 and error_code(r) == "transaction_state"
    r = user_api.post("/queues/q/messages", {"body": "late", "transaction": txn})
    assert r.status_code == 409


def test_prepare__listed_for_recovery_then_committed(user_api: Api, q: str):
    txn = user_api.post("/transactions").json()["id"]
    other = user_api.post("/transactions").json()["id"]
    user_api.post("/queues/q/messages", {"body": "x", "transaction": txn})
    r = user_api.post(f"/transactions/{txn}/prepare")
    assert r.status_code == 200 and r.json()["state"] == "prepared" and r.json()["prepared_at"]
    assert [t["id"] for t in user_api.get("/transactions", state="prepared").json()["transactions"]] == [txn]
    assert {t["id"] for t in user_api.get("/transactions").json()["transactions"]} == {txn, other}
    assert user_api.get(f"/transactions/{txn}").json()["state"] == "prepared"
    user_api.post(f"/transactions/{txn}/commit")
    assert _bodies(user_api) == ["x"]
    assert user_api.get("/transactions", state="bogus").status_code == 400


def test_transactions__unknown_or_someone_elses_is_404(user_api: Api, api_for, mallory):
    r = user_api.post("/transactions/nope/commit")
    assert r.status_code == 404 and error_code(r) == "transaction_not_found"
    txn = user_api.post("/transactions").json()["id"]
    assert api_for(mallory).post(f"/transactions/{txn}/rollback").status_code == 404
    assert api_for(mallory).get("/transactions").json() == {"transactions": []}
    assert user_api.post("/transactions/" + "x" * 41 + "/commit").status_code == 400


def test_transactions__unknown_transaction_on_publish_is_404(user_api: Api, q: str):
    r = user_api.post("/queues/q/messages", {"body": "x", "transaction": "nope"})
    assert r.status_code == 404 and error_code(r) == "transaction_not_found"
    assert _bodies(user_api) == []
