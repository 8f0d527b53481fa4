"""Builds ledger entries for the eligibility tests, and asks questions the three ways the system can."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from consent_ledger.core.eligibility import Decision, decide_eligibility, decide_from_entries
from consent_ledger.core.facts import SubjectFacts, fold_subject
from consent_ledger.core.ledger import GENESIS_HASH, EntryContent, LedgerEntry, chain_hash
from consent_ledger.core.policy import DEFAULT_TIMELINE, PolicyTimeline
from spec_reference import SWITCH

MICROSECOND = timedelta(microseconds=1)
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def day(offset: float) -> datetime:
    """An instant `offset` days after the policy switch (negative: before it)."""
    return SWITCH + timedelta(days=offset)


class History:
    """A ledger being written: each entry gets the next seq and, unless told, a later recorded_at."""

    def __init__(self, subject_id: str = "alice") -> None:
        self.subject_id = subject_id
        self.entries: list[LedgerEntry] = []
        self.clock = datetime(2026, 1, 1, tzinfo=UTC)
        self._previous_hash = GENESIS_HASH

    def record(
        self,
        event_type: str,
        occurred_at: datetime,
        *,
        subject_id: str | None = None,
        recorded_at: datetime | None = None,
        receipt: bool = False,
        **body: str,
    ) -> int:
        """Append one entry (a receipt has no subject); returns its seq."""
        seq = len(self.entries) + 1
        if recorded_at is None:
            recorded_at = self.clock + timedelta(seconds=1)
        assert recorded_at >= self.clock, "recorded_at is non-decreasing in seq"
        self.clock = recorded_at
        subject = None if receipt else subject_id or self.subject_id
        content = EntryContent(uuid.UUID(int=seq), event_type, subject, occurred_at, "test", dict(body))
        self._previous_hash = chain_hash(self._previous_hash, seq, recorded_at, content)
        self.entries.append(LedgerEntry(seq, recorded_at, content, self._previous_hash))
        return seq

    def register(self, at: datetime, account_type: str = "consumer", **kw: Any) -> int:
        return self.record("account.registered", at, account_type=account_type, **kw)

    def change_type(self, at: datetime, account_type: str, **kw: Any) -> int:
        return self.record("account.type_changed", at, account_type=account_type, **kw)

    def delete_account(self, at: datetime, **kw: Any) -> int:
        return self.record("account.deleted", at, **kw)

    def choose(self, at: datetime, choice: str, **kw: Any) -> int:
        return self.record("consent.changed", at, choice=choice, source="settings", **kw)

    def start(self, at: datetime, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record("conversation.started", at, conversation_id=conversation_id, **kw)

    def resume(self, at: datetime, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record("conversation.resumed", at, conversation_id=conversation_id, **kw)

    def delete_conversation(self, at: datetime, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record("conversation.deleted", at, conversation_id=conversation_id, **kw)

    def feedback(self, at: datetime, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record("feedback.reported", at, conversation_id=conversation_id, rating="report", **kw)

    def flag(self, at: datetime, flag_id: str, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record(
            "safety.flagged", at, conversation_id=conversation_id, flag_id=flag_id, category="harm", **kw
        )

    def clear(self, at: datetime, flag_id: str, conversation_id: str = "c1", **kw: Any) -> int:
        return self.record("safety.cleared", at, conversation_id=conversation_id, flag_id=flag_id, **kw)


def audit_rows(facts: SubjectFacts, conversation_id: str, at: datetime) -> SubjectFacts:
    """Only the rows the audit API loads from PostgreSQL for one question."""
    return SubjectFacts(
        facts.subject_id,
        tuple(i for i in facts.consent if i.contains(at)),
        tuple(i for i in facts.account if i.contains(at)),
        tuple(f for f in facts.conversations if f.conversation_id == conversation_id and f.occurred_at <= at),
    )


def ask(
    entries: Iterable[LedgerEntry],
    conversation_id: str,
    at: datetime,
    known_at: datetime = FAR_FUTURE,
    *,
    subject_id: str = "alice",
    timeline: PolicyTimeline = DEFAULT_TIMELINE,
) -> Decision:
    """The reference answer, after checking the audit API's way (full fold, partial rows) agrees with it."""
    entries = list(entries)
    reference = decide_from_entries(entries, subject_id, conversation_id, at, known_at, timeline)
    known = [e for e in entries if e.recorded_at <= known_at]
    facts = fold_subject(subject_id, known, timeline)
    assert decide_eligibility(audit_rows(facts, conversation_id, at), conversation_id, at, timeline) == reference
    return reference
