"""The checker itself: a ledger that never complained would prove nothing."""

from __future__ import annotations

from tests.faults.ledger import FAILED, OK, UNKNOWN, Ledger


def test_ledger__a_clean_history_has_no_violations():
    ledger = Ledger("clean")
    ledger.attempt("a", UNKNOWN)
    ledger.attempt("a", OK, "1")
    ledger.delivered("a", "1", 1, False)
    ledger.delivered("a", "1", 2, True)
    ledger.acked("1", 2)
    f = ledger.check()
    assert (f.attempted, f.confirmed, f.unknown, f.unresolved, f.redelivered) == (1, 1, 1, 0, 1)
    assert (f.lost, f.duplicated, f.phantom, f.after_ack, f.unflagged, f.leased_twice) == (0, 0, 0, 0, 0, 0)


def test_ledger__counts_each_kind_of_violation():
    ledger = Ledger("dirty")
    ledger.attempt("lost", OK, "1")
    ledger.attempt("dup", OK, "2")
    ledger.delivered("dup", "2", 1, False)
    ledger.delivered("dup", "3", 1, False)  # the same key enqueued twice
    ledger.attempt("failed", FAILED)
    ledger.delivered("failed", "4", 1, False)  # a definite failure that was delivered anyway
    ledger.attempt("acked", OK, "5")
    ledger.delivered("acked", "5", 1, False)
    ledger.acked("5", 1)
    ledger.delivered("acked", "5", 2, False)  # delivered after its ack, and not flagged
    ledger.delivered("acked", "5", 2, True)  # the same lease handed out twice
    f = ledger.check()
    assert (f.lost, f.duplicated, f.phantom) == (1, 1, 1)
    assert (f.after_ack, f.unflagged, f.leased_twice) == (2, 1, 1)
