"""Transaction time: closing, dropping and reopening rows, reading facts as known at an instant."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from consent_history import MICROSECOND, History, day

from consent_ledger.core.bitemporal import (
    BitemporalFacts,
    FactChanges,
    Known,
    KnownFacts,
    diff_facts,
    plan_changes,
)
from consent_ledger.core.facts import ConversationFact, SubjectFacts, fold_subject
from consent_ledger.core.increments import fold_increments
from consent_ledger.core.policy import DEFAULT_TIMELINE


def apply_one_by_one(history: History) -> tuple[BitemporalFacts, list[FactChanges]]:
    facts = BitemporalFacts()
    changes = []
    for count in range(1, len(history.entries) + 1):
        seen = history.entries[:count]
        folded = fold_subject("alice", seen, DEFAULT_TIMELINE)
        changes.append(facts.apply("alice", folded, seen[-1].recorded_at))
    return facts, changes


def test_a_row_true_again_within_its_transaction_is_reopened_not_duplicated() -> None:
    history = History()
    history.register(day(-30))
    started = history.start(day(1))
    first = history.clock
    later = first + timedelta(seconds=1)
    history.choose(day(0), "opt_out", recorded_at=later)  # the start stops counting...
    history.choose(day(0) + MICROSECOND, "opt_in", recorded_at=later)  # ...and counts again
    facts, changes = apply_one_by_one(history)
    counted = ConversationFact("c1", "started", day(1), started, None, True)
    assert changes[2].conversations.closed == (counted,)
    assert changes[3].conversations.reopened == (counted,)
    assert changes[3].conversations.dropped == (replace(counted, counts_for_consent=False),)
    assert facts.history("alice").conversations == (Known(counted, first),)


def test_a_row_added_and_removed_within_its_transaction_is_dropped() -> None:
    history = History()
    moment = history.clock + timedelta(seconds=1)
    history.register(day(-30), recorded_at=moment)
    history.choose(day(1), "opt_out", recorded_at=moment)
    facts, changes = apply_one_by_one(history)
    assert changes[1].consent.dropped, "the open-ended default interval of the first entry is dropped"
    assert not changes[1].consent.closed
    rows = facts.history("alice")
    assert all(row.known_to is None for row in rows.consent)
    assert all(row.known_to is None for row in rows.account)
    assert facts.as_known_at("alice", moment) == fold_subject("alice", history.entries, DEFAULT_TIMELINE)


def test_as_known_at_reads_each_state_of_knowledge() -> None:
    history = History()
    history.register(day(-30))
    history.start(day(1))
    first = history.clock
    history.choose(day(0), "opt_out")
    second = history.clock
    facts, _ = apply_one_by_one(history)
    assert facts.as_known_at("alice", first - timedelta(seconds=1) - MICROSECOND) == SubjectFacts(
        "alice", (), (), ()
    )
    assert facts.as_known_at("alice", first) == fold_subject("alice", history.entries[:2], DEFAULT_TIMELINE)
    assert facts.as_known_at("alice", second - MICROSECOND) == facts.as_known_at("alice", first)
    assert facts.as_known_at("alice", second) == fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    assert facts.as_known_at("bob", second) == SubjectFacts("bob", (), (), ())


def test_transaction_time_cannot_go_back() -> None:
    history = History()
    history.register(day(-30))
    facts, _ = apply_one_by_one(history)
    folded = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    with pytest.raises(ValueError, match="transaction time goes back"):
        facts.apply("alice", folded, history.clock - MICROSECOND)


def test_reapplying_the_same_facts_changes_nothing() -> None:
    history = History()
    history.register(day(-30))
    history.start(day(1))
    facts, _ = apply_one_by_one(history)
    folded = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    before = facts.history("alice")
    assert facts.apply("alice", folded, history.clock + timedelta(days=1)).is_empty
    assert facts.history("alice") == before


def test_diff_facts_lists_removed_and_added_rows_per_table() -> None:
    history = History()
    history.register(day(-30))
    history.start(day(1))
    old = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    history.choose(day(0), "opt_out")
    new = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    removed, added = diff_facts(old, new)
    assert removed.account == added.account == ()
    assert [f.counts_for_consent for f in removed.conversations] == [True]
    assert [f.counts_for_consent for f in added.conversations] == [False]
    assert set(removed.consent) == set(old.consent) - set(new.consent)
    assert set(added.consent) == set(new.consent) - set(old.consent)
    with pytest.raises(ValueError, match="cannot diff"):
        diff_facts(old, SubjectFacts("bob", (), (), ()))


def test_plan_changes_needs_only_open_rows_and_those_closed_now() -> None:
    history = History()
    history.register(day(-30))
    facts = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    now = history.clock
    current = KnownFacts("alice", account=(Known(facts.account[0], now, now),))
    plan = plan_changes(current, facts, now)
    assert plan.account.reopened == facts.account[:1]
    assert plan.account.added == facts.account[1:]
    assert plan.consent.added == facts.consent


def test_fold_increments_yields_one_delta_per_transaction() -> None:
    history = History()
    history.register(day(-30))
    together = history.clock + timedelta(seconds=1)
    history.start(day(1), recorded_at=together)
    history.choose(day(0), "opt_out", recorded_at=together)
    history.resume(day(2))
    deltas, facts = fold_increments("alice", history.entries[:1], history.entries[1:], DEFAULT_TIMELINE)
    assert [d.recorded_at for d in deltas] == [together, history.clock]
    assert facts == fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    # The start never counted as far as any transaction knows: it was added already not counting.
    added = [f for f in deltas[0].added if isinstance(f, ConversationFact)]
    assert [f.counts_for_consent for f in added] == [False]
    assert not deltas[0].removed & deltas[0].added


def test_fold_increments_from_nothing_adds_every_row() -> None:
    history = History()
    history.register(day(-30))
    deltas, facts = fold_increments("alice", [], history.entries, DEFAULT_TIMELINE)
    assert len(deltas) == 1
    assert deltas[0].removed == frozenset()
    assert deltas[0].added == frozenset((*facts.consent, *facts.account))
