"""Transaction time over the facts: each row is known from one ledger transaction until another replaces it.

A fact row is valid-time data (consent and account intervals, conversation facts); `Known` adds when the
ledger learnt it (`known_from`, a `recorded_at`) and when it stopped being true (`known_to`). New knowledge
never edits the past: rows that stop being true are closed, new rows are added. `plan_changes` is that
rule as a pure function: `BitemporalFacts` (in memory) applies it, and a store of the same rows elsewhere
can apply it too, so the two cannot drift.

Several entries of one transaction share a `recorded_at`, and folding them one by one must leave the
same rows as folding them together (incremental == replay). Hence:
- a row added and removed within one transaction is dropped (a row known for no time is no knowledge);
- a row closed in this transaction and true again before it ends is reopened, not duplicated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from consent_ledger.core.facts import (
    AccountInterval,
    ConsentInterval,
    ConversationFact,
    Row,
    SubjectFacts,
    none_last,
)

F = TypeVar("F", ConsentInterval, AccountInterval, ConversationFact)


# No slots on the generic classes: with slots, Python 3.11 cannot construct `Known[X](...)`.
@dataclass(frozen=True)
class Known(Row, Generic[F]):
    """A fact row with its transaction time: known from `known_from` until `known_to` (None = still)."""

    fact: F
    known_from: datetime
    known_to: datetime | None = None

    def known_at(self, moment: datetime) -> bool:
        return self.known_from <= moment and (self.known_to is None or moment < self.known_to)

    def sort_key(self) -> tuple[Any, ...]:
        return (self.fact.sort_key(), self.known_from, none_last(self.known_to))


@dataclass(frozen=True, slots=True)
class KnownFacts:
    """A subject's rows with their transaction time, per table, each sorted."""

    subject_id: str
    consent: tuple[Known[ConsentInterval], ...] = ()
    account: tuple[Known[AccountInterval], ...] = ()
    conversations: tuple[Known[ConversationFact], ...] = ()


@dataclass(frozen=True)
class TableChanges(Generic[F]):
    """What one transaction does to one table of one subject; every list is sorted."""

    closed: tuple[F, ...] = ()
    """Open rows that stop being true: set known_to = recorded_at."""
    dropped: tuple[F, ...] = ()
    """Open rows added earlier in this same transaction that stop being true: delete them."""
    reopened: tuple[F, ...] = ()
    """Rows closed earlier in this same transaction that are true again: set known_to back to null."""
    added: tuple[F, ...] = ()
    """New rows: known_from = recorded_at, known_to null."""

    @property
    def is_empty(self) -> bool:
        return not (self.closed or self.dropped or self.reopened or self.added)


@dataclass(frozen=True, slots=True)
class FactChanges:
    """What one transaction (`recorded_at`) does to the facts of one subject."""

    subject_id: str
    recorded_at: datetime
    consent: TableChanges[ConsentInterval] = field(default_factory=TableChanges)
    account: TableChanges[AccountInterval] = field(default_factory=TableChanges)
    conversations: TableChanges[ConversationFact] = field(default_factory=TableChanges)

    @property
    def is_empty(self) -> bool:
        return self.consent.is_empty and self.account.is_empty and self.conversations.is_empty


def _diff_rows(old: Iterable[F], new: Iterable[F]) -> tuple[tuple[F, ...], tuple[F, ...]]:
    old_rows, new_rows = set(old), set(new)
    return tuple(sorted(old_rows - new_rows)), tuple(sorted(new_rows - old_rows))


def diff_facts(old: SubjectFacts, new: SubjectFacts) -> tuple[SubjectFacts, SubjectFacts]:
    """Rows only in `old` (removed) and rows only in `new` (added), per table, as two bags of rows.

    The results are SubjectFacts only as containers: their intervals do not cover all time.
    """
    if old.subject_id != new.subject_id:
        raise ValueError(f"cannot diff the facts of {old.subject_id!r} against those of {new.subject_id!r}")
    consent = _diff_rows(old.consent, new.consent)
    account = _diff_rows(old.account, new.account)
    conversations = _diff_rows(old.conversations, new.conversations)
    removed = SubjectFacts(old.subject_id, consent[0], account[0], conversations[0])
    added = SubjectFacts(old.subject_id, consent[1], account[1], conversations[1])
    return removed, added


def _plan_table(current: Sequence[Known[F]], new: Iterable[F], recorded_at: datetime) -> TableChanges[F]:
    for row in current:
        if row.known_from > recorded_at or (row.known_to is not None and row.known_to > recorded_at):
            raise ValueError(
                f"transaction time goes back: a row is known from {row.known_from} to {row.known_to}, "
                f"after {recorded_at}"
            )
    open_since = {row.fact: row.known_from for row in current if row.known_to is None}
    closed_now = {row.fact for row in current if row.known_to == recorded_at}
    removed, added = _diff_rows(open_since, new)
    return TableChanges(
        closed=tuple(f for f in removed if open_since[f] != recorded_at),
        dropped=tuple(f for f in removed if open_since[f] == recorded_at),
        reopened=tuple(f for f in added if f in closed_now),
        added=tuple(f for f in added if f not in closed_now),
    )


def plan_changes(current: KnownFacts, new: SubjectFacts, recorded_at: datetime) -> FactChanges:
    """What a transaction at `recorded_at` must do so that the subject's open rows become `new`.

    `current` needs only the subject's open rows and those closed at `recorded_at`; older rows are ignored.
    """
    if current.subject_id != new.subject_id:
        raise ValueError(f"cannot plan the facts of {new.subject_id!r} over those of {current.subject_id!r}")
    return FactChanges(
        new.subject_id,
        recorded_at,
        consent=_plan_table(current.consent, new.consent, recorded_at),
        account=_plan_table(current.account, new.account, recorded_at),
        conversations=_plan_table(current.conversations, new.conversations, recorded_at),
    )


class _Table(Generic[F]):
    """One subject's rows of one table, indexed for the two lookups a transaction needs."""

    def __init__(self) -> None:
        self.open: dict[F, datetime] = {}
        """fact -> known_from of the rows still known."""
        self.closed: dict[datetime, dict[F, datetime]] = {}
        """known_to -> fact -> known_from of the rows no longer known."""

    def rows(self) -> list[Known[F]]:
        rows = [Known(fact, since) for fact, since in self.open.items()]
        for until, facts in self.closed.items():
            rows.extend(Known(fact, since, until) for fact, since in facts.items())
        return sorted(rows)

    def touched_by(self, recorded_at: datetime) -> tuple[Known[F], ...]:
        """The rows a transaction at `recorded_at` may change: open ones and those it closed itself."""
        rows = [Known(fact, since) for fact, since in self.open.items()]
        closed_now = self.closed.get(recorded_at, {})
        rows.extend(Known(fact, since, recorded_at) for fact, since in closed_now.items())
        return tuple(rows)

    def execute(self, changes: TableChanges[F], recorded_at: datetime) -> None:
        closed_now = self.closed.setdefault(recorded_at, {})
        for fact in changes.closed:
            closed_now[fact] = self.open.pop(fact)
        for fact in changes.dropped:
            del self.open[fact]
        for fact in changes.reopened:
            self.open[fact] = closed_now.pop(fact)
        for fact in changes.added:
            self.open[fact] = recorded_at
        if not closed_now:
            del self.closed[recorded_at]

    def known_at(self, moment: datetime) -> tuple[F, ...]:
        return tuple(sorted(row.fact for row in self.rows() if row.known_at(moment)))


@dataclass
class _SubjectTables:
    consent: _Table[ConsentInterval] = field(default_factory=_Table)
    account: _Table[AccountInterval] = field(default_factory=_Table)
    conversations: _Table[ConversationFact] = field(default_factory=_Table)


class BitemporalFacts:
    """Every subject's fact rows over valid time and transaction time, in memory."""

    def __init__(self) -> None:
        self._subjects: dict[str, _SubjectTables] = {}

    def subjects(self) -> tuple[str, ...]:
        return tuple(sorted(self._subjects))

    def apply(self, subject_id: str, new_facts: SubjectFacts, recorded_at: datetime) -> FactChanges:
        """Make `new_facts` the subject's known facts from `recorded_at` on; returns what changed."""
        if new_facts.subject_id != subject_id:
            raise ValueError(f"facts of {new_facts.subject_id!r} applied to subject {subject_id!r}")
        tables = self._subjects.setdefault(subject_id, _SubjectTables())
        current = KnownFacts(
            subject_id,
            tables.consent.touched_by(recorded_at),
            tables.account.touched_by(recorded_at),
            tables.conversations.touched_by(recorded_at),
        )
        changes = plan_changes(current, new_facts, recorded_at)
        tables.consent.execute(changes.consent, recorded_at)
        tables.account.execute(changes.account, recorded_at)
        tables.conversations.execute(changes.conversations, recorded_at)
        return changes

    def history(self, subject_id: str) -> KnownFacts:
        """All rows of the subject, those still known and those replaced."""
        tables = self._subjects.get(subject_id)
        if tables is None:
            return KnownFacts(subject_id)
        return KnownFacts(
            subject_id,
            tuple(tables.consent.rows()),
            tuple(tables.account.rows()),
            tuple(tables.conversations.rows()),
        )

    def as_known_at(self, subject_id: str, known_at: datetime) -> SubjectFacts:
        """The facts as the ledger knew them at `known_at` (no rows for a subject not yet known)."""
        tables = self._subjects.get(subject_id)
        if tables is None:
            return SubjectFacts(subject_id, (), (), ())
        return SubjectFacts(
            subject_id,
            tables.consent.known_at(known_at),
            tables.account.known_at(known_at),
            tables.conversations.known_at(known_at),
        )

