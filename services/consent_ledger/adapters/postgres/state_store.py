"""The bitemporal state tables in PostgreSQL: batched, idempotent writes of fact changes, and as-of reads."""

from __future__ import annotations

import hashlib
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import asyncpg

from consent_ledger.adapters.postgres.queries import query
from consent_ledger.core.events import format_timestamp
from consent_ledger.core.facts import AccountInterval, ConsentInterval, ConversationFact, SubjectFacts
from consent_ledger.core.increments import Fact, FactChange
from consent_ledger.core.ledger import canonical_json

TABLE_OF: Mapping[type[Any], str] = {
    ConsentInterval: "consent_intervals",
    AccountInterval: "account_intervals",
    ConversationFact: "conversation_facts",
}
COLUMNS_OF: Mapping[type[Any], tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in TABLE_OF}
# attrgetter, not dataclasses.astuple: astuple deep-copies every value and dominated the fold's profile.
_VALUES_OF: Mapping[type[Any], Callable[[Any], tuple[Any, ...]]] = {
    cls: operator.attrgetter(*columns) for cls, columns in COLUMNS_OF.items()
}


def fact_values(fact: Fact) -> tuple[Any, ...]:
    return _VALUES_OF[type(fact)](fact)


def fact_hash(fact: Fact) -> bytes:
    """Identity of a fact's content: the open version of a fact is unique per subject."""
    values = [format_timestamp(v) if isinstance(v, datetime) else v for v in fact_values(fact)]
    return hashlib.sha256(canonical_json([type(fact).__name__, *values])).digest()[:16]


@dataclass
class WritePlan:
    """Rows to close (open before this batch) and rows to insert (with their whole known range)."""

    closes: dict[type[Any], list[tuple[str, bytes, datetime]]] = field(default_factory=lambda: defaultdict(list))
    inserts: dict[type[Any], list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))


def plan_writes(changes: Iterable[FactChange]) -> WritePlan:
    """Collapse a batch of changes, in order, into one UPDATE and one INSERT per table.

    A fact added and removed within the batch becomes one closed row; one added and removed at the same
    transaction time is never visible and is not written.
    """
    opened: dict[tuple[str, Fact], datetime] = {}
    plan = WritePlan()
    for change in changes:
        for fact in change.removed:
            since = opened.pop((change.subject_id, fact), None)
            if since is None:
                plan.closes[type(fact)].append((change.subject_id, fact_hash(fact), change.recorded_at))
            elif since < change.recorded_at:
                plan.inserts[type(fact)].append(_row(change.subject_id, fact, since, change.recorded_at))
        for fact in change.added:
            opened[(change.subject_id, fact)] = change.recorded_at
    for (subject_id, fact), since in opened.items():
        plan.inserts[type(fact)].append(_row(subject_id, fact, since, None))
    return plan


def _row(subject_id: str, fact: Fact, known_from: datetime, known_to: datetime | None) -> tuple[Any, ...]:
    return (subject_id, fact_hash(fact), *fact_values(fact), known_from, known_to)


async def write_plan(connection: asyncpg.Connection, plan: WritePlan) -> int:
    """Apply a plan inside the caller's transaction; returns the number of rows touched."""
    touched = 0
    for cls, closes in plan.closes.items():
        subjects, hashes, known_to = zip(*closes, strict=True)
        status = await connection.execute(
            f"""UPDATE {TABLE_OF[cls]} t SET known_to = v.known_to
                FROM unnest($1::text[], $2::bytea[], $3::timestamptz[]) AS v(subject_id, fact_hash, known_to)
                WHERE t.subject_id = v.subject_id AND t.fact_hash = v.fact_hash AND t.known_to IS NULL""",
            list(subjects), list(hashes), list(known_to),
        )
        touched += int(status.split()[-1])
        # A fact opened and closed at one transaction time was never visible: no row at all.
        await connection.execute(
            f"DELETE FROM {TABLE_OF[cls]} WHERE subject_id = ANY($1::text[]) AND known_to = known_from",
            list(set(subjects)),
        )
    for cls, rows in plan.inserts.items():
        rows = await _reopen(connection, cls, rows)
        columns = ("subject_id", "fact_hash", *COLUMNS_OF[cls], "known_from", "known_to")
        await connection.copy_records_to_table(TABLE_OF[cls], columns=columns, records=rows)
        touched += len(rows)
    return touched


async def _reopen(connection: asyncpg.Connection, cls: type[Any], rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Extend a row closed at exactly the time a new version of the same fact starts, instead of adding one.

    A ledger transaction split over two processor batches closes a fact in the first and finds it again in
    the second: one row, as a replay that sees the whole transaction at once would write.
    """
    reopened = await connection.fetch(
        f"""UPDATE {TABLE_OF[cls]} t SET known_to = v.known_to
            FROM unnest($1::text[], $2::bytea[], $3::timestamptz[], $4::timestamptz[])
                 AS v(subject_id, fact_hash, known_from, known_to)
            WHERE t.subject_id = v.subject_id AND t.fact_hash = v.fact_hash AND t.known_to = v.known_from
            RETURNING t.subject_id, t.fact_hash, v.known_from""",
        [r[0] for r in rows], [r[1] for r in rows], [r[-2] for r in rows], [r[-1] for r in rows],
    )
    if not reopened:
        return rows
    extended = {(r["subject_id"], bytes(r["fact_hash"]), r["known_from"]) for r in reopened}
    return [r for r in rows if (r[0], r[1], r[-2]) not in extended]


async def lock_fold_state(connection: asyncpg.Connection, subjects: Sequence[str]) -> dict[str, int]:
    """Lock the subjects' fold state for this transaction (new subjects too); 0 where nothing is folded yet."""
    await connection.execute(query("state", "claim_fold_state"), sorted(subjects))
    rows = await connection.fetch(query("state", "lock_fold_state"), sorted(subjects))
    return {row["subject_id"]: row["folded_seq"] for row in rows}


async def save_fold_state(
    connection: asyncpg.Connection, folded: Mapping[str, tuple[int, datetime]]
) -> None:
    if folded:
        subjects = list(folded)
        await connection.execute(
            query("state", "save_fold_state"),
            subjects, [folded[s][0] for s in subjects], [folded[s][1] for s in subjects],
        )


async def save_progress(connection: asyncpg.Connection, app_id: str, watermarks: Mapping[int, int]) -> None:
    if watermarks:
        partitions = sorted(watermarks)
        await connection.execute(
            query("state", "save_progress"), app_id, partitions, [watermarks[p] for p in partitions]
        )


async def folded_watermark(connection: asyncpg.Connection, app_id: str, partitions: int) -> int:
    """Every entry up to this seq is folded: the lowest watermark over all partitions (0 if one is missing)."""
    rows = await connection.fetch(query("state", "progress"), app_id)
    if len(rows) < partitions:
        return 0
    return int(min(row["watermark_seq"] for row in rows))


async def facts_at(
    connection: asyncpg.Connection, items: Sequence[tuple[str, str]], at: datetime, known_at: datetime
) -> dict[str, SubjectFacts]:
    """For each (subject, conversation): the rows that decide eligibility at `at` as known at `known_at`.

    Three queries whatever the number of items: the consent and account intervals containing `at`, and
    the facts of the asked conversations up to `at`.
    """
    subjects = sorted({subject for subject, _ in items})
    consent: dict[str, list[ConsentInterval]] = defaultdict(list)
    account: dict[str, list[AccountInterval]] = defaultdict(list)
    conversations: dict[str, list[ConversationFact]] = defaultdict(list)
    for row in await connection.fetch(query("state", "consent_at"), subjects, at, known_at):
        consent[row["subject_id"]].append(ConsentInterval(*_values(row, ConsentInterval)))
    for row in await connection.fetch(query("state", "account_at"), subjects, at, known_at):
        account[row["subject_id"]].append(AccountInterval(*_values(row, AccountInterval)))
    rows = await connection.fetch(
        query("state", "conversation_facts_until"),
        [s for s, _ in items], [c for _, c in items], at, known_at,
    )
    for row in rows:
        conversations[row["subject_id"]].append(ConversationFact(*_values(row, ConversationFact)))
    return {
        subject: SubjectFacts(
            subject,
            tuple(sorted(consent[subject])),
            tuple(sorted(account[subject])),
            tuple(sorted(conversations[subject])),
        )
        for subject in subjects
    }


def _values(row: Mapping[str, Any], cls: type[Any]) -> list[Any]:
    return [row[name] for name in COLUMNS_OF[cls]]


async def consent_timeline(
    connection: asyncpg.Connection, subject_id: str, known_at: datetime
) -> list[ConsentInterval]:
    rows = await connection.fetch(query("state", "consent_timeline"), subject_id, known_at)
    return [ConsentInterval(*_values(row, ConsentInterval)) for row in rows]
