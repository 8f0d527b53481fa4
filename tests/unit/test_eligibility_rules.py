"""SPEC section 5, rule by rule and reason by reason, on small hand-written histories."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from consent_history import MICROSECOND, SWITCH, History, ask, day

from consent_ledger.core.bitemporal import BitemporalFacts
from consent_ledger.core.eligibility import decide_eligibility
from consent_ledger.core.facts import ConsentInterval, fold_subject
from consent_ledger.core.policy import DEFAULT_TIMELINE, PolicyPeriod, PolicyTimeline


def consumer(registered_at: float = -30) -> History:
    history = History()
    history.register(day(registered_at))
    return history


# Rule 1


def test_unknown_account_without_registration() -> None:
    history = History()
    history.start(day(1))
    history.feedback(day(2))
    decision = ask(history.entries, "c1", day(3))
    assert (decision.eligible, decision.reasons, decision.evidence_seqs) == (False, ("unknown_account",), ())


def test_unknown_account_before_the_registration_instant() -> None:
    history = History()
    registered = history.register(day(1))
    history.feedback(day(1))
    assert ask(history.entries, "c1", day(1) - MICROSECOND).reasons == ("unknown_account",)
    decision = ask(history.entries, "c1", day(1))
    assert decision.eligible
    assert registered in decision.evidence_seqs


def test_unknown_account_for_a_subject_the_ledger_never_heard_of() -> None:
    empty = BitemporalFacts().as_known_at("nobody", day(0))
    decision = decide_eligibility(empty, "c1", day(0), DEFAULT_TIMELINE)
    assert decision.reasons == ("unknown_account",)
    assert decision.policy_version == "v2-opt-out"


def test_type_change_without_registration_is_still_an_unknown_account() -> None:
    history = History()
    history.change_type(day(1), "consumer")
    history.start(day(2))
    assert ask(history.entries, "c1", day(3)).reasons == ("unknown_account",)


# Rule 2


def test_account_deleted_from_its_deletion_on() -> None:
    history = History()
    registered = history.register(day(-30))
    history.feedback(day(1))
    deleted = history.delete_account(day(2))
    before = ask(history.entries, "c1", day(2) - MICROSECOND)
    assert (before.eligible, before.basis) == (True, ("feedback",))
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.basis, decision.reasons) == (False, (), ("account_deleted",))
    assert decision.evidence_seqs == (registered, deleted)


def test_account_deleted_rests_on_the_first_deletion() -> None:
    history = consumer()
    first = history.delete_account(day(2))
    history.delete_account(day(1), recorded_at=history.clock + timedelta(hours=1))
    history.delete_account(day(3))
    assert ask(history.entries, "c1", day(2)).evidence_seqs == (1, first + 1)
    assert ask(history.entries, "c1", day(1)).evidence_seqs == (1, first + 1)


def test_account_deleted_outranks_commercial_account() -> None:
    history = consumer()
    history.change_type(day(1), "commercial")
    history.delete_account(day(2))
    assert ask(history.entries, "c1", day(3)).reasons == ("account_deleted",)


# Rule 3


def test_commercial_account_is_never_used() -> None:
    history = History()
    registered = history.register(day(-30), "commercial")
    history.choose(day(-20), "opt_in")
    history.start(day(1))
    history.feedback(day(1))
    history.flag(day(1), "f1")
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.reasons) == (False, ("commercial_account",))
    assert decision.evidence_seqs == (registered,)


def test_commercial_account_turning_consumer_counts_only_later_activity() -> None:
    history = History()
    registered = history.register(day(1), "commercial")
    history.start(day(2))
    changed = history.change_type(day(3), "consumer")
    assert ask(history.entries, "c1", day(2)).reasons == ("commercial_account",)
    # Consent is on by default under v2, but the only activity happened while commercial.
    assert ask(history.entries, "c1", day(3)).reasons == ("no_activity_under_consent",)
    resumed = history.resume(day(4))
    decision = ask(history.entries, "c1", day(4))
    assert (decision.eligible, decision.basis, decision.reasons) == (True, ("consent",), ())
    assert decision.evidence_seqs == (registered, changed, resumed)


def test_consumer_turning_commercial_stops_eligibility() -> None:
    history = consumer()
    history.start(day(1))
    history.feedback(day(1))
    history.change_type(day(2), "commercial")
    assert ask(history.entries, "c1", day(2) - MICROSECOND).eligible
    assert ask(history.entries, "c1", day(2)).reasons == ("commercial_account",)


def test_activity_before_registration_does_not_count() -> None:
    history = History()
    history.start(day(1))
    history.register(day(2))
    # Consent is on by default, but the account type at the start was no type at all, not consumer.
    assert ask(history.entries, "c1", day(3)).reasons == ("no_activity_under_consent",)


# Rule 4


def test_conversation_deleted_from_its_deletion_on() -> None:
    history = consumer()
    history.start(day(1))
    history.flag(day(1), "f1")
    history.feedback(day(1))
    history.start(day(1), "c2")
    deleted = history.delete_conversation(day(2))
    assert ask(history.entries, "c1", day(2) - MICROSECOND).basis == ("consent", "feedback", "safety_flag")
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.reasons) == (False, ("conversation_deleted",))
    assert decision.evidence_seqs == (1, deleted)
    assert ask(history.entries, "c2", day(3)).eligible, "another conversation is not deleted"


def test_conversation_deleted_stays_deleted_when_resumed_later() -> None:
    history = consumer()
    history.start(day(1))
    history.delete_conversation(day(2))
    history.resume(day(3))
    assert ask(history.entries, "c1", day(4)).reasons == ("conversation_deleted",)


# Rule 5: bases


def test_basis_consent_by_default_under_v2() -> None:
    history = consumer()
    started = history.start(day(1))
    decision = ask(history.entries, "c1", day(1))
    assert (decision.eligible, decision.basis, decision.reasons) == (True, ("consent",), ())
    assert decision.policy_version == "v2-opt-out"
    assert decision.evidence_seqs == (1, started)


def test_basis_consent_by_opt_in_under_v1() -> None:
    history = consumer()
    opted_in = history.choose(day(-20), "opt_in")
    started = history.start(day(-10))
    decision = ask(history.entries, "c1", day(-5))
    assert (decision.eligible, decision.basis, decision.policy_version) == (True, ("consent",), "v1-opt-in")
    assert decision.evidence_seqs == (1, opted_in, started)


def test_basis_feedback_after_opt_out() -> None:
    history = consumer()
    history.start(day(1))
    history.choose(day(2), "opt_out")
    feedback = history.feedback(day(3))
    assert ask(history.entries, "c1", day(3) - MICROSECOND).reasons == ("opted_out",)
    decision = ask(history.entries, "c1", day(3))
    assert (decision.eligible, decision.basis, decision.reasons) == (True, ("feedback",), ())
    assert decision.evidence_seqs == (1, feedback)


def test_basis_safety_flag_while_opted_out() -> None:
    history = consumer()
    history.choose(day(-1), "opt_out")
    history.start(day(1))
    flagged = history.flag(day(2), "f1")
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.basis) == (True, ("safety_flag",))
    assert decision.evidence_seqs == (1, flagged)


def test_safety_flag_cleared_removes_the_basis() -> None:
    history = consumer()
    history.choose(day(-1), "opt_out")
    history.flag(day(1), "f1")
    history.clear(day(2), "f1")
    assert ask(history.entries, "c1", day(2) - MICROSECOND).basis == ("safety_flag",)
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.reasons) == (False, ("opted_out",))


def test_clearing_one_flag_leaves_the_others_open() -> None:
    history = consumer()
    history.choose(day(-1), "opt_out")
    history.flag(day(1), "f1")
    second = history.flag(day(1), "f2")
    history.clear(day(2), "f1")
    decision = ask(history.entries, "c1", day(3))
    assert decision.basis == ("safety_flag",)
    assert second in decision.evidence_seqs


def test_a_clearing_on_another_conversation_does_not_clear_this_one() -> None:
    history = consumer()
    history.choose(day(-1), "opt_out")
    history.flag(day(1), "f1")
    history.clear(day(2), "f1", "c2")
    assert ask(history.entries, "c1", day(3)).basis == ("safety_flag",)


def test_all_bases_that_hold_are_listed_in_spec_order() -> None:
    history = consumer()
    history.flag(day(1), "f1")
    history.feedback(day(1))
    history.start(day(1))
    decision = ask(history.entries, "c1", day(1))
    assert decision.basis == ("consent", "feedback", "safety_flag")
    assert decision.evidence_seqs == (1, 2, 3, 4)


# Rule 5: reasons when no basis holds


def test_reason_unknown_conversation() -> None:
    history = consumer()
    history.start(day(1), "c1")
    decision = ask(history.entries, "c2", day(2))
    assert (decision.eligible, decision.reasons) == (False, ("unknown_conversation",))


def test_reason_unknown_conversation_before_its_first_event() -> None:
    history = consumer()
    history.start(day(2))
    assert ask(history.entries, "c1", day(2) - MICROSECOND).reasons == ("unknown_conversation",)


def test_reason_opted_out() -> None:
    history = consumer()
    history.start(day(1))
    opted_out = history.choose(day(2), "opt_out")
    decision = ask(history.entries, "c1", day(2))
    assert (decision.eligible, decision.reasons) == (False, ("opted_out",))
    assert opted_out in decision.evidence_seqs


def test_reason_no_opt_in() -> None:
    history = consumer()
    history.start(day(-10))
    decision = ask(history.entries, "c1", day(-5))
    assert (decision.eligible, decision.reasons, decision.policy_version) == (False, ("no_opt_in",), "v1-opt-in")


def test_reason_no_activity_under_consent() -> None:
    history = consumer()
    history.start(day(-10))  # under v1 with no choice: consent was off
    decision = ask(history.entries, "c1", day(5))
    assert (decision.eligible, decision.reasons, decision.policy_version) == (
        False,
        ("no_activity_under_consent",),
        "v2-opt-out",
    )
    history.resume(day(6))
    assert ask(history.entries, "c1", day(6)).basis == ("consent",)


def test_opt_out_then_resumed_chat() -> None:
    history = consumer()
    started = history.start(day(1))
    history.choose(day(2), "opt_out")
    resumed = history.resume(day(3))
    assert ask(history.entries, "c1", day(1)).eligible
    # An activity that counted does not help while consent is off at `at`.
    assert ask(history.entries, "c1", day(3)).reasons == ("opted_out",)
    opted_in = history.choose(day(4), "opt_in")
    decision = ask(history.entries, "c1", day(4))
    assert decision.basis == ("consent",)
    # The start (under consent) counts; the resume (while opted out) does not.
    assert started in decision.evidence_seqs
    assert resumed not in decision.evidence_seqs
    assert opted_in in decision.evidence_seqs


# Instants: the policy switch and ties


def test_policy_switch_instant() -> None:
    history = consumer()
    history.start(SWITCH - MICROSECOND, "before")
    history.start(SWITCH, "at")
    assert ask(history.entries, "at", SWITCH - MICROSECOND).reasons == ("unknown_conversation",)
    assert ask(history.entries, "before", SWITCH - MICROSECOND).policy_version == "v1-opt-in"
    assert ask(history.entries, "before", SWITCH - MICROSECOND).reasons == ("no_opt_in",)
    at_switch = ask(history.entries, "at", SWITCH)
    assert (at_switch.eligible, at_switch.policy_version) == (True, "v2-opt-out")
    assert ask(history.entries, "before", SWITCH).reasons == ("no_activity_under_consent",)


def test_same_instant_consent_change_after_the_start_by_seq_decides() -> None:
    history = consumer()
    moment = day(1)
    history.start(moment)
    history.choose(moment, "opt_out")
    history.choose(day(2), "opt_in")
    # consent_on(t) takes every change at or before t: the later seq at the same instant wins.
    assert ask(history.entries, "c1", day(2)).reasons == ("no_activity_under_consent",)


def test_same_instant_consent_changes_last_seq_wins() -> None:
    history = consumer()
    moment = day(-5)
    history.choose(moment, "opt_out")
    history.start(moment)
    last = history.choose(moment, "opt_in")
    decision = ask(history.entries, "c1", moment)
    assert decision.basis == ("consent",)
    assert last in decision.evidence_seqs
    facts = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    interval = facts.consent_at(moment)
    assert interval is not None
    assert (interval.valid_from, interval.choice, interval.source_seq) == (moment, "opt_in", last)
    assert all(i.valid_from != i.valid_to for i in facts.consent)


def test_one_microsecond_before_an_opt_in_does_not_count() -> None:
    history = consumer()
    moment = day(-5)
    history.choose(moment, "opt_in")
    history.start(moment - MICROSECOND)
    assert ask(history.entries, "c1", moment).reasons == ("no_activity_under_consent",)
    history.resume(moment)
    assert ask(history.entries, "c1", moment).basis == ("consent",)


def test_events_recorded_in_any_order_are_folded_by_occurred_at() -> None:
    history = consumer()
    history.choose(day(3), "opt_out")
    history.start(day(1))
    assert ask(history.entries, "c1", day(2)).eligible
    assert ask(history.entries, "c1", day(3)).reasons == ("opted_out",)


# Transaction time


def test_late_event_changes_the_answer_only_once_known() -> None:
    history = consumer()
    history.start(day(2))
    known_before = history.clock
    late = history.choose(day(1), "opt_out")
    known_late = history.clock
    assert ask(history.entries, "c1", day(5), known_before).eligible
    assert ask(history.entries, "c1", day(5), known_late - MICROSECOND).eligible
    hindsight = ask(history.entries, "c1", day(5), known_late)
    assert (hindsight.eligible, hindsight.reasons) == (False, ("opted_out",))
    assert late in hindsight.evidence_seqs

    facts = BitemporalFacts()
    for n in range(1, len(history.entries) + 1):
        seen = history.entries[:n]
        facts.apply("alice", fold_subject("alice", seen, DEFAULT_TIMELINE), seen[-1].recorded_at)
    as_then = facts.as_known_at("alice", known_before)
    assert decide_eligibility(as_then, "c1", day(5), DEFAULT_TIMELINE).eligible
    as_now = facts.as_known_at("alice", known_late)
    assert decide_eligibility(as_now, "c1", day(5), DEFAULT_TIMELINE) == hindsight


# Guards


def test_facts_folded_under_another_timeline_are_refused() -> None:
    history = consumer()
    history.start(day(1))
    facts = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    renamed = PolicyTimeline(
        "other", (PolicyPeriod("v1-opt-in", None, False), PolicyPeriod("v3", SWITCH, True))
    )
    with pytest.raises(ValueError, match="folded under 'v2-opt-out'"):
        decide_eligibility(facts, "c1", day(2), renamed)


def test_missing_consent_interval_is_an_error_not_a_default() -> None:
    history = consumer()
    history.start(day(1))
    facts = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    without_consent = dataclasses.replace(facts, consent=())
    with pytest.raises(ValueError, match="no consent interval"):
        decide_eligibility(without_consent, "c1", day(2), DEFAULT_TIMELINE)


def test_consent_intervals_split_at_each_change_and_the_switch() -> None:
    history = consumer()
    history.choose(day(-3), "opt_in")
    history.choose(day(2), "opt_out")
    facts = fold_subject("alice", history.entries, DEFAULT_TIMELINE)
    assert facts.consent == (
        ConsentInterval(None, day(-3), False, None, "v1-opt-in", None),
        ConsentInterval(day(-3), SWITCH, True, "opt_in", "v1-opt-in", 2),
        ConsentInterval(SWITCH, day(2), True, "opt_in", "v2-opt-out", 2),
        ConsentInterval(day(2), None, False, "opt_out", "v2-opt-out", 3),
    )
