"""Properties of the fold on random histories: the stored facts answer like the ledger, and like the SPEC.

Three independent ways to answer a question must agree on every instant and every state of knowledge:
- `decide_eligibility` on facts built incrementally, entry by entry, read back as known at `known_at`;
- `decide_from_entries`, which folds exactly the SPEC's view of the ledger;
- `spec_answer` (tests/spec_reference.py), a naive reading of SPEC section 5 straight off the events (no facts at all).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from consent_history import MICROSECOND, SWITCH, History, audit_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from consent_ledger.core.bitemporal import BitemporalFacts, Known, KnownFacts
from consent_ledger.core.eligibility import decide_eligibility, decide_from_entries
from consent_ledger.core.facts import consent_on, fold_subject
from consent_ledger.core.increments import Fact, FactChange, all_facts, fold_increments
from consent_ledger.core.ledger import LedgerEntry
from consent_ledger.core.policy import DEFAULT_TIMELINE
from spec_reference import spec_account_type, spec_answer, spec_consent_on

# Few instants, close to the switch, so that ties and one-microsecond gaps happen often.
INSTANTS = (
    SWITCH - timedelta(days=2),
    SWITCH - timedelta(days=1),
    SWITCH - MICROSECOND,
    SWITCH,
    SWITCH + MICROSECOND,
    SWITCH + timedelta(days=1),
)
SUBJECTS = ("s1", "s2")
CONVERSATIONS = ("c1", "c2", "c3")
# Weighted by repetition towards what makes questions interesting: activity, consent changes, flags and
# their clearing; account deletions and receipts (which the fold ignores) are rare.
EVENT_TYPES = (
    "conversation.started",
    "consent.changed",
    "safety.flagged",
    "conversation.resumed",
    "consent.changed",
    "safety.cleared",
    "conversation.started",
    "consent.changed",
    "feedback.reported",
    "conversation.resumed",
    "safety.flagged",
    "safety.cleared",
    "conversation.deleted",
    "account.type_changed",
    "account.registered",
    "account.deleted",
    "decision.recorded",
)
ACCOUNT_TYPES = ("consumer", "consumer", "consumer", "commercial")

EventSpec = tuple[str, str, datetime, dict[str, str]]


@st.composite
def event_specs(draw: st.DrawFn, subjects: Sequence[str], conversations: Sequence[str]) -> EventSpec:
    event_type = draw(st.sampled_from(EVENT_TYPES))
    subject = draw(st.sampled_from(subjects))
    occurred_at = draw(st.sampled_from(INSTANTS))
    conversation = draw(st.sampled_from(conversations))
    flag_id = draw(st.sampled_from(("f1", "f1", "f2")))
    body: dict[str, str] = {
        "consent.changed": {"choice": draw(st.sampled_from(("opt_in", "opt_out"))), "source": "settings"},
        "account.registered": {"account_type": draw(st.sampled_from(ACCOUNT_TYPES))},
        "account.type_changed": {"account_type": draw(st.sampled_from(ACCOUNT_TYPES))},
        "safety.flagged": {"conversation_id": conversation, "flag_id": flag_id, "category": "harm"},
        "safety.cleared": {"conversation_id": conversation, "flag_id": flag_id},
        "feedback.reported": {"conversation_id": conversation, "rating": "report"},
        "decision.recorded": {"decision_id": "d1"},
        "account.deleted": {},
    }.get(event_type, {"conversation_id": conversation})
    return event_type, subject, occurred_at, body


@st.composite
def ledgers(draw: st.DrawFn) -> list[LedgerEntry]:
    subjects = SUBJECTS[: draw(st.integers(1, 2))]
    conversations = CONVERSATIONS[: draw(st.sampled_from((1, 1, 2, 3)))]
    specs = draw(st.lists(event_specs(subjects, conversations), min_size=1, max_size=14))
    for subject in subjects:
        # Most subjects register (usually early, as consumers), or most answers would be unknown_account.
        if draw(st.integers(0, 4)) > 0:
            registered_at = draw(st.sampled_from((INSTANTS[0], *INSTANTS)))
            account = {"account_type": draw(st.sampled_from(ACCOUNT_TYPES))}
            position = draw(st.sampled_from((0, draw(st.integers(0, len(specs))))))
            specs.insert(position, ("account.registered", subject, registered_at, account))
    history = History()
    for event_type, subject, occurred_at, body in specs:
        # A gap of zero puts several entries in one transaction (one recorded_at).
        gap = timedelta(seconds=draw(st.sampled_from((0, 1, 0))))
        history.record(
            event_type,
            occurred_at,
            subject_id=subject,
            recorded_at=history.clock + gap,
            receipt=event_type == "decision.recorded",
            **body,
        )
    return history.entries


def subjects_of(entries: Iterable[LedgerEntry]) -> list[str]:
    return sorted({e.subject_id for e in entries if e.subject_id is not None})


def instants_to_ask(entries: Sequence[LedgerEntry]) -> list[datetime]:
    moments = {SWITCH, SWITCH - MICROSECOND, SWITCH - timedelta(days=365)}
    for entry in entries:
        moments |= {entry.occurred_at - MICROSECOND, entry.occurred_at, entry.occurred_at + MICROSECOND}
    return sorted(moments)


def knowledge_states(entries: Sequence[LedgerEntry]) -> list[datetime]:
    """Before anything was recorded, then after each transaction."""
    return sorted({entries[0].recorded_at - MICROSECOND, *(e.recorded_at for e in entries)})


def incremental(entries: Sequence[LedgerEntry]) -> BitemporalFacts:
    """What the stream processors do: after each entry, refold its subject and apply at its recorded_at."""
    facts = BitemporalFacts()
    for count, entry in enumerate(entries, start=1):
        if entry.subject_id is not None:
            folded = fold_subject(entry.subject_id, entries[:count], DEFAULT_TIMELINE)
            facts.apply(entry.subject_id, folded, entry.recorded_at)
    return facts


def replayed(entries: Sequence[LedgerEntry]) -> BitemporalFacts:
    """What compliance replay does: fold the whole ledger once per transaction, for the subjects it touched."""
    facts = BitemporalFacts()
    for recorded_at in sorted({e.recorded_at for e in entries}):
        known = [e for e in entries if e.recorded_at <= recorded_at]
        touched = subjects_of(e for e in entries if e.recorded_at == recorded_at)
        for subject in touched:
            facts.apply(subject, fold_subject(subject, known, DEFAULT_TIMELINE), recorded_at)
    return facts


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


@PROPERTY_SETTINGS
@given(ledgers())
def test_stored_facts_answer_like_the_ledger_and_the_spec(entries: list[LedgerEntry]) -> None:
    stored = incremental(entries)
    for subject in [*subjects_of(entries), "stranger"]:
        for known_at in knowledge_states(entries):
            facts = stored.as_known_at(subject, known_at)
            for at in instants_to_ask(entries):
                for conversation in [*CONVERSATIONS, "never-seen"]:
                    reference = decide_from_entries(
                        entries, subject, conversation, at, known_at, DEFAULT_TIMELINE
                    )
                    assert decide_eligibility(facts, conversation, at, DEFAULT_TIMELINE) == reference
                    rows = audit_rows(facts, conversation, at)
                    assert decide_eligibility(rows, conversation, at, DEFAULT_TIMELINE) == reference
                    first_reason = reference.reasons[0] if reference.reasons else None
                    answer = (reference.eligible, reference.basis, first_reason, reference.policy_version)
                    assert answer == spec_answer(entries, subject, conversation, at, known_at)
                    assert reference.eligible == (reference.reasons == ())


@PROPERTY_SETTINGS
@given(ledgers())
def test_incremental_facts_equal_a_replay_per_transaction(entries: list[LedgerEntry]) -> None:
    built, replay = incremental(entries), replayed(entries)
    assert built.subjects() == replay.subjects() == tuple(subjects_of(entries))
    for subject in built.subjects():
        assert built.history(subject) == replay.history(subject)
        for row in all_rows(built.history(subject)):
            assert row.known_to is None or row.known_from < row.known_to, "no row is known for no time"


def all_rows(history: KnownFacts) -> list[Known[Any]]:
    return [*history.consent, *history.account, *history.conversations]


def _rows_from_deltas(entries: Sequence[LedgerEntry], subject: str) -> set[Known[Any]]:
    mine = [e for e in entries if e.subject_id == subject]
    deltas, final = fold_increments(subject, [], mine, DEFAULT_TIMELINE)
    assert final == fold_subject(subject, entries, DEFAULT_TIMELINE)
    open_since: dict[Fact, datetime] = {}
    rows: set[Known[Any]] = set()
    for delta in deltas:
        assert not delta.removed & delta.added
        for fact in delta.removed:
            rows.add(Known[Any](fact, open_since.pop(fact), delta.recorded_at))
        for fact in delta.added:
            open_since[fact] = delta.recorded_at
    return rows | {Known[Any](fact, since) for fact, since in open_since.items()}


@PROPERTY_SETTINGS
@given(ledgers())
def test_fold_increments_deltas_rebuild_the_replay(entries: list[LedgerEntry]) -> None:
    replay = replayed(entries)
    for subject in subjects_of(entries):
        assert _rows_from_deltas(entries, subject) == set(all_rows(replay.history(subject)))


def naive_increments(subject: str, entries: Sequence[LedgerEntry]) -> list[FactChange]:
    """Fold the whole known history again after every transaction, and diff: the definition of a step."""
    changes, known, before = [], [], frozenset[Fact]()
    for recorded_at in sorted({e.recorded_at for e in entries}):
        known.extend(e for e in entries if e.recorded_at == recorded_at)
        after = all_facts(fold_subject(subject, known, DEFAULT_TIMELINE))
        if after != before:
            changes.append(FactChange(subject, recorded_at, before - after, after - before))
        before = after
    return changes


@PROPERTY_SETTINGS
@given(ledgers())
def test_fold_increments_equals_folding_everything_again_at_each_transaction(entries: list[LedgerEntry]) -> None:
    """The shortcut for steps of conversation events only changes no delta and no fact."""
    for subject in subjects_of(entries):
        mine = [e for e in entries if e.subject_id == subject]
        changes, facts = fold_increments(subject, [], mine, DEFAULT_TIMELINE)
        assert changes == naive_increments(subject, mine)
        assert facts == fold_subject(subject, mine, DEFAULT_TIMELINE)


@PROPERTY_SETTINGS
@given(ledgers(), st.data())
def test_folding_in_batches_with_kept_facts_equals_folding_at_once(
    entries: list[LedgerEntry], data: st.DataObject
) -> None:
    """What a processor does: fold a few entries per batch, handing back the facts it kept from the last one."""
    for subject in subjects_of(entries):
        mine = [e for e in entries if e.subject_id == subject]
        at_once, final = fold_increments(subject, [], mine, DEFAULT_TIMELINE)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(mine)), max_size=4), label="batch boundaries"))
        deltas, history, facts = [], [], None
        for start, end in pairwise([0, *cuts, len(mine)]):
            if start == end:
                continue
            changes, facts = fold_increments(subject, history, mine[start:end], DEFAULT_TIMELINE, facts)
            deltas.extend(changes)
            history.extend(mine[start:end])
        assert facts == final
        # A transaction split over two batches gives two deltas at one time; together they are the one delta.
        merged: dict[datetime, tuple[set[Fact], set[Fact]]] = {}
        for delta in deltas:
            removed, added = merged.setdefault(delta.recorded_at, (set(), set()))
            for fact in delta.removed:
                if fact in added:
                    added.discard(fact)
                else:
                    removed.add(fact)
            for fact in delta.added:
                if fact in removed:
                    removed.discard(fact)
                else:
                    added.add(fact)
        merged_nonempty = {t: (r, a) for t, (r, a) in merged.items() if r or a}
        assert merged_nonempty == {d.recorded_at: (set(d.removed), set(d.added)) for d in at_once}


@PROPERTY_SETTINGS
@given(ledgers(), st.randoms(use_true_random=False))
def test_intervals_cover_all_time_and_match_the_spec(entries: list[LedgerEntry], rng: random.Random) -> None:
    shuffled = list(entries)
    rng.shuffle(shuffled)
    for subject in subjects_of(entries):
        facts = fold_subject(subject, entries, DEFAULT_TIMELINE)
        assert fold_subject(subject, shuffled, DEFAULT_TIMELINE) == facts, "arrival order does not matter"
        for table in (facts.consent, facts.account):
            assert table[0].valid_from is None
            assert table[-1].valid_to is None
            for earlier, later in pairwise(table):
                assert earlier.valid_to is not None
                assert earlier.valid_to == later.valid_from
                assert earlier.valid_from is None or earlier.valid_from < earlier.valid_to
        view = sorted((e for e in entries if e.subject_id == subject), key=lambda e: (e.occurred_at, e.seq))
        for at in instants_to_ask(entries):
            assert consent_on(facts, at) == spec_consent_on(view, at)
            account = facts.account_at(at)
            assert account is not None
            assert account.account_type == spec_account_type(view, at)
            kinds = {e.event_type for e in view if e.occurred_at <= at}
            assert account.registered == ("account.registered" in kinds)
            assert account.deleted == ("account.deleted" in kinds)
            consent = facts.consent_at(at)
            assert consent is not None
            assert consent.policy_version == ("v2-opt-out" if at >= SWITCH else "v1-opt-in")
