"""Scenario 3: kill -9 of the server while transactions publish, prepare, commit and roll back.

Two workers run transactions over REST: open, publish three messages into it, prepare about half
of them, then commit (70 %) or roll back (30 %). Every step is retried until the broker answers
for sure (commit and rollback are idempotent, a publish repeats its dedup_id); the final state
of each transaction is read back from the broker. A killer thread kill -9s daphne meanwhile,
and a consumer takes messages throughout and acks 70 % of its batches inside transactions of
its own (committed or rolled back: the messages of a rolled-back ack come back, flagged).
Besides, a few transactions are prepared and left so across a kill: after the restart they
must all be listed as prepared, and are then finished (half committed, half rolled back).

Messages of rolled-back transactions ever delivered = 0; committed transactions partly
delivered = 0 (all three of its messages, or it is lost); prepared transactions recovered = all.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from messaging import broker
from tests.faults.harness import Rest, drain, killer, scale
from tests.faults.ledger import FAILED, OK, Ledger, assert_clean

pytestmark = pytest.mark.django_db(transaction=True)
PER_TXN = 3


def _until(call: Any, deadline: float) -> Any:
    """Repeat a REST call until it gets an answer that is not a connection failure or 5xx."""
    while time.monotonic() < deadline:
        response = call()
        if response is not None and response.status_code < 500:
            return response
        time.sleep(0.05)
    raise AssertionError("no definite answer before the deadline")


class Worker:
    def __init__(self, rest: Rest, n: int, ledger: Ledger, deadline: float) -> None:
        self.rest, self.n, self.ledger, self.deadline = rest, n, ledger, deadline
        self.rng = random.Random(n)
        self.outcomes: dict[str, tuple[str, list[str]]] = {}  # txn id -> (final state, keys)

    def one(self, j: int, *, finish: bool = True) -> str:
        begun = _until(lambda: self.rest.post("/transactions", {}), self.deadline)
        txn: str = begun.json()["id"]
        keys = [f"t{self.n}-{j}-{k}" for k in range(PER_TXN)]
        for key in keys:
            body = {"body": key, "dedup_id": key, "transaction": txn}
            _until(lambda body=body: self.rest.post("/queues/s3/messages", body), self.deadline)
        if self.rng.random() < 0.5 or not finish:
            _until(lambda: self.rest.post(f"/transactions/{txn}/prepare", {}), self.deadline)
        if finish:
            how = "commit" if self.rng.random() < 0.7 else "rollback"
            _until(lambda: self.rest.post(f"/transactions/{txn}/{how}", {}), self.deadline)
        self.outcomes[txn] = ("", keys)
        return txn

    def settle(self) -> None:
        """Read every transaction's final state back from the broker."""
        for txn, (_, keys) in self.outcomes.items():
            state = _until(lambda txn=txn: self.rest.get(f"/transactions/{txn}"), self.deadline).json()["state"]
            self.outcomes[txn] = (state, keys)
            for key in keys:
                self.ledger.attempt(key, OK if state == "committed" else FAILED)


class TxnAcks:
    """Acks inside transactions: commit (half of them) makes them count, rollback sends the messages back
    (redelivered). An ack counts in the ledger only once its transaction is known committed."""

    def __init__(self, rest: Rest, ledger: Ledger, deadline: float) -> None:
        self.rest, self.ledger, self.deadline = rest, ledger, deadline
        self.rng = random.Random(33)
        self.committed = self.rolled_back = 0

    def ack(self, messages: list[dict[str, Any]]) -> None:
        txn = _until(lambda: self.rest.post("/transactions", {}), self.deadline).json()["id"]
        body = {"receipts": [m["receipt"] for m in messages], "transaction": txn}
        answer = self.rest.post("/ack", body)  # once: a lost answer leaves the outcome unknown
        how = "commit" if self.rng.random() < 0.5 else "rollback"
        _until(lambda: self.rest.post(f"/transactions/{txn}/{how}", {}), self.deadline)
        state = _until(lambda: self.rest.get(f"/transactions/{txn}"), self.deadline).json()["state"]
        if state == "committed":
            self.committed += 1
            if answer is not None and answer.status_code == 200:
                for m, result in zip(messages, answer.json()["results"], strict=True):
                    if result["status"] == "ok":
                        self.ledger.acked(m["id"], m["delivery_count"])
        else:
            self.rolled_back += 1


def test_kill9_during_transactions__all_or_nothing(daphne, admin_token):
    broker.create_queue(name="s3", settings=broker.QueueSettings(visibility_timeout_seconds=5))
    server = daphne()
    ledger = Ledger("3 kill -9 during transactions")
    deadline = time.monotonic() + scale(60, 600)
    stop = threading.Event()
    workers = [Worker(Rest(server.url, admin_token), n, ledger, deadline) for n in range(2)]
    consumer = Rest(server.url, admin_token)

    def work(w: Worker) -> None:
        j = 0
        while not stop.is_set():
            w.one(j)
            j += 1

    txn_acks = TxnAcks(consumer, ledger, deadline)
    batches: list[int] = []

    def consume() -> None:
        while not stop.is_set():
            got = consumer.receive("/queues/s3/receive", ledger, max_messages=10, wait=0.5)
            batches.append(len(got))
            if got and txn_acks.rng.random() < 0.7:
                txn_acks.ack(got)
            else:
                consumer.ack(got, ledger)
            time.sleep(0.3)  # let batches build up

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    threads.append(threading.Thread(target=consume, daemon=True))
    for t in threads:
        t.start()
    killer(server, cycles=scale(3, 20), low=0.5, high=1.5, seed=3, stop=threading.Event()).join()
    stop.set()
    for t in threads:
        t.join(60)

    # Prepared transactions survive a kill -9 and are listed for recovery afterwards.
    left = [workers[0].one(10_000 + i, finish=False) for i in range(scale(4, 10))]
    server.kill9()
    server.start()
    listed = {
        t["id"] for t in _until(lambda: consumer.get("/transactions?state=prepared"), deadline).json()["transactions"]
    }
    recovered = sorted(set(left) & listed)
    for i, txn in enumerate(recovered):
        how = "commit" if i % 2 == 0 else "rollback"
        _until(lambda txn=txn, how=how: consumer.post(f"/transactions/{txn}/{how}", {}), deadline)

    for w in workers:
        w.settle()
    committed = {t: keys for w in workers for t, (state, keys) in w.outcomes.items() if state == "committed"}
    drain(consumer, "/queues/s3/receive", ledger, expected=lambda: ledger.confirmed_keys() <= ledger.delivered_keys(),
          deadline=time.monotonic() + 60)  # fmt: skip
    delivered = ledger.delivered_keys()
    states = [state for w in workers for state, _ in w.outcomes.values()]
    finished_not_committed = [keys for w in workers for state, keys in w.outcomes.values() if state != "committed"]
    ledger.extra.update(
        kills=server.kills,
        committed=states.count("committed"),
        rolled_back=states.count("rolled_back"),
        unfinished=len(states) - states.count("committed") - states.count("rolled_back"),
        rolled_back_delivered=len(delivered & {k for keys in finished_not_committed for k in keys}),
        partly_visible=sum(1 for keys in committed.values() if 0 < len(set(keys) & delivered) < PER_TXN),
        batches=sum(1 for b in batches if b),
        ack_txns_committed=txn_acks.committed,
        ack_txns_rolled_back=txn_acks.rolled_back,
        prepared_left=len(left),
        prepared_recovered=len(recovered),
        http_500=sum(r.statuses.get(500, 0) for r in [consumer, *(w.rest for w in workers)]),
    )  # fmt: skip
    figures = ledger.report()
    for r in [consumer, *(w.rest for w in workers)]:
        r.close()
    assert figures.extra["unfinished"] == 0
    assert figures.extra["rolled_back_delivered"] == 0
    assert figures.extra["partly_visible"] == 0
    assert figures.extra["prepared_recovered"] == figures.extra["prepared_left"]
    assert figures.extra["committed"] > 0 and figures.extra["rolled_back"] > 0
    assert figures.extra["http_500"] == 0
    assert_clean(figures)
