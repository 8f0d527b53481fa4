"""The ledger in PostgreSQL: gapless, chained appends with their Kafka offsets, and reads of entries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from consent_ledger.adapters.postgres.queries import query
from consent_ledger.core.events import RejectReason, format_timestamp
from consent_ledger.core.ledger import (
    GENESIS_HASH,
    CanonicalPieces,
    EntryContent,
    LedgerEntry,
    append_entries,
    canonical_pieces,
)

ONE_MICROSECOND = timedelta(microseconds=1)
LEDGER_COLUMNS = (
    "seq", "recorded_at", "event_id", "event_type", "subject_id", "occurred_at", "producer", "body",
    "entry_hash", "source_topic", "source_partition", "source_offset",
)


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a message was read: the Kafka coordinates stored with its entry or rejection."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Candidate:
    """A decoded, valid event waiting for its place in the ledger."""

    content: EntryContent
    source: SourceRef | None = None
    raw: bytes = b""
    """The message bytes as consumed, kept in case the event is rejected after decoding."""
    pieces: CanonicalPieces = field(init=False)
    """Its canonical bytes but for its place: written now, not under the append lock (docs/adr/0002)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", canonical_pieces(self.content))


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input refused entry, with its reason and the original bytes."""

    reason: RejectReason
    detail: str
    source: SourceRef
    raw: bytes
    field: str | None = None
    event_id: uuid.UUID | None = None


@dataclass
class AppendOutcome:
    appended: list[LedgerEntry] = field(default_factory=list)
    duplicates: int = 0
    already_committed: int = 0
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    entry_hash: bytes
    recorded_at: datetime | None


def entry_from_row(row: Sequence[Any]) -> LedgerEntry:
    """An entry from a row that starts with LEDGER_COLUMNS[:9] (every entry query selects them so, in order).

    By position, not by name: a Record's name lookups made this a tenth of the fold's and the replay's time.
    """
    seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash = tuple(row)[:9]
    content = EntryContent(event_id, event_type, subject_id, occurred_at, producer, body)
    return LedgerEntry(seq, recorded_at, content, bytes(entry_hash))


async def read_head(connection: asyncpg.Connection) -> Head:
    row = await connection.fetchrow(query("ledger", "head"))
    if row is None:
        return Head(0, GENESIS_HASH, None)
    return Head(row["seq"], bytes(row["entry_hash"]), row["recorded_at"])


async def append(
    connection: asyncpg.Connection,
    candidates: Sequence[Candidate],
    rejections: Sequence[Rejection] = (),
    *,
    group_id: str | None = None,
    next_offsets: Mapping[tuple[str, int], int] | None = None,
    max_future_skew: timedelta | None = None,
) -> AppendOutcome:
    """Append valid, new events and store rejections; call inside a transaction, which then commits both.

    With `group_id`, messages below the group's stored offsets are dropped as already committed (another
    writer got there first, before a rebalance) and `next_offsets` are saved in the same transaction.
    """
    assert connection.is_in_transaction(), "append must run inside the caller's transaction"
    # Before the lock, so that other appenders wait less (docs/adr/0002): the entries already holding the
    # candidates' event ids.
    seen_upto, known = await _known_contents(connection, candidates)
    await connection.execute(query("ledger", "lock_appends"))
    outcome = AppendOutcome()
    if group_id is not None:
        candidates, rejections = await _drop_committed(connection, group_id, candidates, rejections, outcome)
    place = await connection.fetchrow(query("ledger", "head_and_clock"))
    head_seq: int = place["seq"]
    head_hash = GENESIS_HASH if place["entry_hash"] is None else bytes(place["entry_hash"])
    clock: datetime = place["clock"]
    # Strictly after the previous transaction: "known at the head's recorded_at" then means "up to its seq".
    recorded_at = clock if place["recorded_at"] is None else max(clock, place["recorded_at"] + ONE_MICROSECOND)
    rejected = list(rejections)
    acceptable = _refuse_unstorable(_refuse_future(candidates, clock, max_future_skew, rejected), rejected)
    if acceptable and head_seq > seen_upto:  # appended since the look-up: only those entries can be new matches
        known.update(await _contents_by_event_id(connection, acceptable, latest=head_seq - seen_upto))
    fresh = _dedup(known, acceptable, rejected, outcome)
    entries = append_entries(head_hash, head_seq, recorded_at, (c.content for c in fresh),
                             (c.pieces for c in fresh))
    if entries:
        records = [_ledger_record(e, c.source) for e, c in zip(entries, fresh, strict=True)]
        await connection.copy_records_to_table("ledger", columns=LEDGER_COLUMNS, records=records)
    if rejected:
        await connection.executemany(query("ledger", "insert_rejection"), [_rejection_record(r) for r in rejected])
    if group_id is not None and next_offsets:
        await connection.executemany(
            query("ledger", "save_offset"),
            [(group_id, topic, partition, offset) for (topic, partition), offset in next_offsets.items()],
        )
    outcome.appended = entries
    outcome.rejected = rejected
    return outcome


async def _drop_committed(
    connection: asyncpg.Connection,
    group_id: str,
    candidates: Sequence[Candidate],
    rejections: Sequence[Rejection],
    outcome: AppendOutcome,
) -> tuple[list[Candidate], list[Rejection]]:
    topics = sorted({c.source.topic for c in candidates if c.source} | {r.source.topic for r in rejections})
    stored = {
        (row["topic"], row["partition"]): row["next_offset"]
        for row in await connection.fetch(query("ledger", "stored_offsets"), group_id, topics)
    }

    def pending(source: SourceRef | None) -> bool:
        return source is None or source.offset >= stored.get((source.topic, source.partition), 0)

    kept_candidates = [c for c in candidates if pending(c.source)]
    kept_rejections = [r for r in rejections if pending(r.source)]
    outcome.already_committed = (
        len(candidates) + len(rejections) - len(kept_candidates) - len(kept_rejections)
    )
    return kept_candidates, kept_rejections


def _refuse_future(
    candidates: Sequence[Candidate], clock: datetime, max_skew: timedelta | None, rejected: list[Rejection]
) -> list[Candidate]:
    if max_skew is None:
        return list(candidates)
    kept = []
    for candidate in candidates:
        if candidate.content.occurred_at > clock + max_skew and candidate.source is not None:
            rejected.append(_reject(
                candidate, RejectReason.OCCURRED_AT_IN_FUTURE,
                f"occurred_at {format_timestamp(candidate.content.occurred_at)} is more than {max_skew} after "
                f"the ledger clock {format_timestamp(clock)}", "occurred_at",
            ))
        else:
            kept.append(candidate)
    return kept


# asyncpg writes these two instants as PostgreSQL's -infinity and infinity, and reads those back as naive datetimes:
# an event stamped with one would be stored as another value and break every reader of the ledger.
_DRIVER_INFINITIES = (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))


def _refuse_unstorable(candidates: Sequence[Candidate], rejected: list[Rejection]) -> list[Candidate]:
    kept = []
    for candidate in candidates:
        if candidate.content.occurred_at in _DRIVER_INFINITIES and candidate.source is not None:
            rejected.append(_reject(
                candidate, RejectReason.INVALID_FIELD,
                f"occurred_at {format_timestamp(candidate.content.occurred_at)} cannot be stored: the PostgreSQL "
                "driver takes it for infinity", "occurred_at",
            ))
        else:
            kept.append(candidate)
    return kept


async def _known_contents(
    connection: asyncpg.Connection, candidates: Sequence[Candidate]
) -> tuple[int, dict[uuid.UUID, EntryContent]]:
    """The ledger's head seq, then the contents of the entries holding the candidates' event ids: all of them up to
    that seq (appends commit in seq order, so a later statement sees every entry up to it)."""
    if not candidates:  # nothing to look up, then or under the lock
        return 0, {}
    seen_upto: int = await connection.fetchval(query("ledger", "head_seq"))
    return seen_upto, await _contents_by_event_id(connection, candidates)


async def _contents_by_event_id(
    connection: asyncpg.Connection, candidates: Sequence[Candidate], *, latest: int | None = None
) -> dict[uuid.UUID, EntryContent]:
    """The entries holding the candidates' event ids: anywhere, or among the `latest` entries (seq gapless)."""
    event_ids = list({c.content.event_id for c in candidates})
    if latest is None:
        rows = await connection.fetch(query("ledger", "entries_by_event_id"), event_ids)
    else:
        rows = await connection.fetch(query("ledger", "latest_entries_by_event_id"), event_ids, latest)
    return {row["event_id"]: entry_from_row(row).content for row in rows}


def _dedup(
    known: dict[uuid.UUID, EntryContent], candidates: list[Candidate], rejected: list[Rejection],
    outcome: AppendOutcome,
) -> list[Candidate]:
    """Same event_id and same content: stored once. Same event_id, other content: `event_id_conflict`."""
    fresh = []
    for candidate in candidates:
        earlier = known.get(candidate.content.event_id)
        if earlier is None:
            known[candidate.content.event_id] = candidate.content
            fresh.append(candidate)
        elif earlier.same_as(candidate.content):
            outcome.duplicates += 1
        elif candidate.source is not None:
            rejected.append(_reject(
                candidate, RejectReason.EVENT_ID_CONFLICT,
                f"event_id {candidate.content.event_id} is already in the ledger with a different content",
                "event_id",
            ))
        else:
            raise ValueError(f"event_id {candidate.content.event_id} is already in the ledger")
    return fresh


def _reject(candidate: Candidate, reason: RejectReason, detail: str, field_name: str) -> Rejection:
    assert candidate.source is not None
    return Rejection(reason, detail, candidate.source, candidate.raw, field_name, candidate.content.event_id)


def _ledger_record(entry: LedgerEntry, source: SourceRef | None) -> tuple[Any, ...]:
    c = entry.content
    return (
        entry.seq, entry.recorded_at, c.event_id, c.event_type, c.subject_id, c.occurred_at, c.producer,
        dict(c.body), entry.entry_hash,
        source.topic if source else None, source.partition if source else None, source.offset if source else None,
    )


def _rejection_record(r: Rejection) -> tuple[Any, ...]:
    return (r.reason.value, r.detail, r.field, r.event_id, r.source.topic, r.source.partition, r.source.offset, r.raw)


async def stream_entries(
    connection: asyncpg.Connection, *, after_seq: int = 0, until_seq: int | None = None, batch: int = 10_000
) -> AsyncIterator[list[LedgerEntry]]:
    """The ledger in seq order, in batches of at most `batch` entries: bounded memory at any size."""
    last = after_seq
    upper = until_seq if until_seq is not None else 2**62
    while True:
        rows = await connection.fetch(query("ledger", "entries_from"), last, upper, batch)
        if not rows:
            return
        entries = [entry_from_row(row) for row in rows]
        yield entries
        last = entries[-1].seq

