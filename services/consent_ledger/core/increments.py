"""Incremental folding: what each newly recorded entry changes in a subject's facts, in transaction time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby

from consent_ledger.core.facts import (
    CONVERSATION_EVENT_TYPES,
    AccountInterval,
    ConsentInterval,
    ConversationFact,
    SubjectFacts,
    fold_subject,
    with_conversation_events,
)
from consent_ledger.core.ledger import LedgerEntry
from consent_ledger.core.policy import PolicyTimeline

Fact = ConsentInterval | AccountInterval | ConversationFact


@dataclass(frozen=True, slots=True)
class FactChange:
    """Facts that stopped and started being known at one transaction time (`recorded_at`)."""

    subject_id: str
    recorded_at: datetime
    removed: frozenset[Fact]
    added: frozenset[Fact]


def all_facts(facts: SubjectFacts) -> frozenset[Fact]:
    return frozenset((*facts.consent, *facts.account, *facts.conversations))


def fold_increments(
    subject_id: str, history: Sequence[LedgerEntry], fresh: Sequence[LedgerEntry], timeline: PolicyTimeline,
    facts: SubjectFacts | None = None,
) -> tuple[list[FactChange], SubjectFacts]:
    """Fold `fresh` entries (seq order, after `history`) one transaction time at a time.

    Entries that share a `recorded_at` were committed together, so nobody could know the state between
    them: they are folded as one step. `facts`, when given, must be the fold of `history` (a caller that
    kept it saves folding the history again).

    A step of conversation events only (most steps) adds their facts to the kept ones instead of folding the
    whole history again: the same facts (a property test holds the two ways equal), at the cost of the step.
    """
    known = list(history)
    if facts is None:
        # A subject with no entries has no rows at all, even though folding nothing gives default intervals.
        facts = fold_subject(subject_id, known, timeline) if known else SubjectFacts(subject_id, (), (), ())
    changes = []
    for recorded_at, grouped in groupby(fresh, key=lambda entry: entry.recorded_at):
        group = [entry for entry in grouped if entry.subject_id == subject_id]
        known.extend(group)
        if facts.consent and all(entry.event_type in CONVERSATION_EVENT_TYPES for entry in group):
            facts, added = with_conversation_events(facts, group)
            if added:
                changes.append(FactChange(subject_id, recorded_at, frozenset(), frozenset(added)))
            continue
        new_facts = fold_subject(subject_id, known, timeline)
        before, after = all_facts(facts), all_facts(new_facts)
        if before != after:
            changes.append(FactChange(subject_id, recorded_at, before - after, after - before))
        facts = new_facts
    return changes, facts
