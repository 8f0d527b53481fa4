"""Folds a subject's ledger entries into facts over valid time: consent, account, conversation events."""

from __future__ import annotations

import dataclasses
import operator
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any, TypeVar

from consent_ledger.core.events import EventType
from consent_ledger.core.ledger import SUBJECT_EVENT_TYPES, LedgerEntry
from consent_ledger.core.policy import PolicyTimeline


class ConversationKind(StrEnum):
    STARTED = "started"
    RESUMED = "resumed"
    DELETED = "deleted"
    FEEDBACK = "feedback"
    FLAGGED = "flagged"
    CLEARED = "cleared"


KIND_OF_EVENT: dict[str, ConversationKind] = {
    EventType.CONVERSATION_STARTED: ConversationKind.STARTED,
    EventType.CONVERSATION_RESUMED: ConversationKind.RESUMED,
    EventType.CONVERSATION_DELETED: ConversationKind.DELETED,
    EventType.FEEDBACK_REPORTED: ConversationKind.FEEDBACK,
    EventType.SAFETY_FLAGGED: ConversationKind.FLAGGED,
    EventType.SAFETY_CLEARED: ConversationKind.CLEARED,
}
SPEC_ORDER = operator.attrgetter("occurred_at", "seq")
"""The SPEC's order `(occurred_at, seq)`, of entries and of the conversation facts they become."""
CONVERSATION_EVENT_TYPES = frozenset(KIND_OF_EVENT)
"""The event types that become conversation facts and change no interval."""
ACTIVITY_KINDS = frozenset({ConversationKind.STARTED, ConversationKind.RESUMED})
"""The setting applies to new or resumed chats: only these can count for the `consent` basis."""

FLAG_KINDS = frozenset({ConversationKind.FLAGGED, ConversationKind.CLEARED})

ACCOUNT_EVENT_TYPES = frozenset(
    {EventType.ACCOUNT_REGISTERED, EventType.ACCOUNT_TYPE_CHANGED, EventType.ACCOUNT_DELETED}
)


def none_first(value: Any) -> tuple[bool, Any]:
    return (value is not None, value)


def none_last(value: Any) -> tuple[bool, Any]:
    # An open end (None) is later than every instant.
    return (value is None, value)


class Row:
    """A table row ordered by `sort_key`: rows with None fields must sort, and None does not compare."""

    __slots__ = ()

    def sort_key(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Row) or type(other) is not type(self):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Row) or type(other) is not type(self):
            return NotImplemented
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Row) or type(other) is not type(self):
            return NotImplemented
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Row) or type(other) is not type(self):
            return NotImplemented
        return self.sort_key() >= other.sort_key()


class _Interval(Row):
    """A half-open stretch of valid time [valid_from, valid_to); None ends are unbounded."""

    __slots__ = ()
    valid_from: datetime | None
    valid_to: datetime | None

    def contains(self, moment: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= moment) and (
            self.valid_to is None or moment < self.valid_to
        )


@dataclass(frozen=True, slots=True)
class ConsentInterval(_Interval):
    """Whether training consent is on during [valid_from, valid_to), and what decides it."""

    valid_from: datetime | None
    valid_to: datetime | None
    consent_on: bool
    choice: str | None
    """The last `consent.changed` choice at or before the interval; None = no choice, the policy default."""
    policy_version: str
    source_seq: int | None
    """Seq of the deciding `consent.changed`; None when the policy default decides."""

    def sort_key(self) -> tuple[Any, ...]:
        return (
            none_first(self.valid_from),
            none_last(self.valid_to),
            self.consent_on,
            none_first(self.choice),
            self.policy_version,
            none_first(self.source_seq),
        )


@dataclass(frozen=True, slots=True)
class AccountInterval(_Interval):
    """What is known of the account during [valid_from, valid_to), with the seqs that say so."""

    valid_from: datetime | None
    valid_to: datetime | None
    registered: bool
    account_type: str | None
    deleted: bool
    registered_seq: int | None
    """The first `account.registered`: registered from it on."""
    type_seq: int | None
    """The last `account.registered` / `account.type_changed`: it sets `account_type`."""
    deleted_seq: int | None
    """The first `account.deleted`: never used from it on."""

    def sort_key(self) -> tuple[Any, ...]:
        return (
            none_first(self.valid_from),
            none_last(self.valid_to),
            self.registered,
            none_first(self.account_type),
            self.deleted,
            none_first(self.registered_seq),
            none_first(self.type_seq),
            none_first(self.deleted_seq),
        )


@dataclass(frozen=True, slots=True)
class ConversationFact(Row):
    """One event about a conversation; `counts_for_consent` says whether it is activity under consent."""

    conversation_id: str
    kind: str
    occurred_at: datetime
    seq: int
    flag_id: str | None
    counts_for_consent: bool
    """A start or resume at a time t with consent_on(t) and a consumer account at t."""

    def sort_key(self) -> tuple[Any, ...]:
        return (
            self.occurred_at,
            self.seq,
            self.conversation_id,
            self.kind,
            none_first(self.flag_id),
            self.counts_for_consent,
        )


_I = TypeVar("_I", bound=_Interval)


def _containing(intervals: Iterable[_I], moment: datetime) -> _I | None:
    # A linear scan: the audit API hands in partial facts (only the rows around `at`), in any order.
    return next((interval for interval in intervals if interval.contains(moment)), None)


@dataclass(frozen=True, slots=True, order=True)
class SubjectFacts:
    """Everything eligibility needs about one subject, each table sorted by its rows' order."""

    subject_id: str
    consent: tuple[ConsentInterval, ...]
    account: tuple[AccountInterval, ...]
    conversations: tuple[ConversationFact, ...]

    def consent_at(self, moment: datetime) -> ConsentInterval | None:
        return _containing(self.consent, moment)

    def account_at(self, moment: datetime) -> AccountInterval | None:
        return _containing(self.account, moment)


def consent_on(facts: SubjectFacts, moment: datetime) -> bool:
    """SPEC `consent_on(t)`, read from the consent interval containing `moment`."""
    interval = facts.consent_at(moment)
    if interval is None:
        raise ValueError(f"the facts of {facts.subject_id!r} have no consent interval containing {moment}")
    return interval.consent_on


def _segments(starts: Sequence[datetime]) -> Iterator[tuple[datetime | None, datetime | None]]:
    """[None, s0), [s0, s1), ..., [sn, None): consecutive stretches covering all time."""
    return pairwise([None, *starts, None])


def _by_instant(entries: Iterable[LedgerEntry]) -> dict[datetime, list[LedgerEntry]]:
    grouped: dict[datetime, list[LedgerEntry]] = defaultdict(list)
    for entry in entries:
        grouped[entry.occurred_at].append(entry)
    return grouped


def _consent_intervals(history: Sequence[LedgerEntry], timeline: PolicyTimeline) -> list[ConsentInterval]:
    changes = _by_instant(e for e in history if e.event_type == EventType.CONSENT_CHANGED)
    starts = sorted(set(changes) | set(timeline.boundaries))
    intervals: list[ConsentInterval] = []
    deciding: LedgerEntry | None = None
    for valid_from, valid_to in _segments(starts):
        if valid_from is not None and valid_from in changes:
            # Same-instant changes: the last by seq decides from that instant on.
            deciding = changes[valid_from][-1]
        period = timeline.periods[0] if valid_from is None else timeline.in_force(valid_from)
        choice = None if deciding is None else str(deciding.body["choice"])
        on = period.default_consent_on if choice is None else choice == "opt_in"
        source_seq = None if deciding is None else deciding.seq
        intervals.append(
            ConsentInterval(valid_from, valid_to, on, choice, period.policy_version, source_seq)
        )
    return intervals


@dataclass(slots=True)
class _AccountState:
    registered_seq: int | None = None
    account_type: str | None = None
    type_seq: int | None = None
    deleted_seq: int | None = None

    def apply(self, entry: LedgerEntry) -> None:
        if entry.event_type == EventType.ACCOUNT_REGISTERED and self.registered_seq is None:
            self.registered_seq = entry.seq
        if entry.event_type in (EventType.ACCOUNT_REGISTERED, EventType.ACCOUNT_TYPE_CHANGED):
            self.account_type = str(entry.body["account_type"])
            self.type_seq = entry.seq
        if entry.event_type == EventType.ACCOUNT_DELETED and self.deleted_seq is None:
            self.deleted_seq = entry.seq

    def interval(self, valid_from: datetime | None, valid_to: datetime | None) -> AccountInterval:
        return AccountInterval(
            valid_from,
            valid_to,
            registered=self.registered_seq is not None,
            account_type=self.account_type,
            deleted=self.deleted_seq is not None,
            registered_seq=self.registered_seq,
            type_seq=self.type_seq,
            deleted_seq=self.deleted_seq,
        )


def _same_content(a: AccountInterval, b: AccountInterval) -> bool:
    # Field by field rather than dataclasses.replace: this runs once per account interval of every fold.
    return (
        a.registered == b.registered
        and a.account_type == b.account_type
        and a.deleted == b.deleted
        and a.registered_seq == b.registered_seq
        and a.type_seq == b.type_seq
        and a.deleted_seq == b.deleted_seq
    )


def _account_intervals(history: Sequence[LedgerEntry]) -> list[AccountInterval]:
    events = _by_instant(e for e in history if e.event_type in ACCOUNT_EVENT_TYPES)
    state = _AccountState()
    intervals: list[AccountInterval] = []
    for valid_from, valid_to in _segments(sorted(events)):
        for entry in events.get(valid_from, []) if valid_from is not None else []:
            state.apply(entry)
        interval = state.interval(valid_from, valid_to)
        if intervals and _same_content(intervals[-1], interval):
            # A repeated registration or deletion says nothing new: one row, not two identical ones.
            intervals[-1] = dataclasses.replace(intervals[-1], valid_to=valid_to)
        else:
            intervals.append(interval)
    return intervals


def _at(intervals: Sequence[_I], starts: Sequence[datetime], moment: datetime) -> _I:
    # intervals[0] starts at None and intervals[k] at starts[k - 1], so bisect finds the container.
    return intervals[bisect_right(starts, moment)]


def _conversation_facts(
    history: Sequence[LedgerEntry], consent: Sequence[ConsentInterval], account: Sequence[AccountInterval]
) -> list[ConversationFact]:
    consent_starts = [i.valid_from for i in consent[1:] if i.valid_from is not None]
    account_starts = [i.valid_from for i in account[1:] if i.valid_from is not None]
    facts: list[ConversationFact] = []
    for entry in history:
        kind = KIND_OF_EVENT.get(entry.event_type)
        if kind is None:
            continue
        counts = (
            kind in ACTIVITY_KINDS
            and _at(consent, consent_starts, entry.occurred_at).consent_on
            and _at(account, account_starts, entry.occurred_at).account_type == "consumer"
        )
        flag_id = entry.body.get("flag_id") if kind in FLAG_KINDS else None
        facts.append(
            ConversationFact(
                str(entry.body["conversation_id"]),
                kind.value,
                entry.occurred_at,
                entry.seq,
                None if flag_id is None else str(flag_id),
                counts,
            )
        )
    return facts


def with_conversation_events(
    facts: SubjectFacts, entries: Sequence[LedgerEntry]
) -> tuple[SubjectFacts, list[ConversationFact]]:
    """`facts` (a fold of a non-empty history) after conversation events only, and the facts they add.

    Equal to folding the whole history again, at the cost of the new events alone: a conversation event changes
    no consent or account interval, and its fact depends only on itself and the intervals at its instant.
    """
    if not facts.consent or not facts.account:
        raise ValueError(f"the facts of {facts.subject_id!r} are not a fold: they have no intervals to read")
    if any(e.event_type not in CONVERSATION_EVENT_TYPES for e in entries):
        raise ValueError("with_conversation_events folds conversation events only")
    added = _conversation_facts(sorted(entries, key=SPEC_ORDER), facts.consent, facts.account)
    conversations = tuple(sorted((*facts.conversations, *added), key=SPEC_ORDER))
    return SubjectFacts(facts.subject_id, facts.consent, facts.account, conversations), added


def subject_history(subject_id: str, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """The subject's entries of the ten subject event types, in SPEC order `(occurred_at, seq)`."""
    mine = (e for e in entries if e.subject_id == subject_id and e.event_type in SUBJECT_EVENT_TYPES)
    return sorted(mine, key=SPEC_ORDER)


def fold_subject(subject_id: str, entries: Iterable[LedgerEntry], timeline: PolicyTimeline) -> SubjectFacts:
    """Fold the entries of `subject_id` (others, and receipts or policies, are ignored) in any order."""
    history = subject_history(subject_id, entries)
    consent = _consent_intervals(history, timeline)
    account = _account_intervals(history)
    conversations = _conversation_facts(history, consent, account)
    return SubjectFacts(subject_id, tuple(consent), tuple(account), tuple(conversations))
