"""Planted bugs: each property of the history checker reports exactly the anomaly planted in a real ledger."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from ledger_support import (
    add_mix,
    ensure_event_topics,
    make_event,
    offsets_reached,
    stored_offsets,
    subjects,
    wait_until,
)

from consent_ledger.adapters.postgres import ledger_store
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.apps.ledger_writer import LedgerWriter
from consent_ledger.config import Settings
from consent_ledger.core.events import RejectReason
from consent_ledger.core.ledger import GENESIS_HASH, EntryContent, chain_hash
from history_checker import History, Outcome, Send, check

WAIT_S = 120.0
CONTENT = "event_id, event_type, subject_id, occurred_at, producer, body"
SOURCE = "source_topic, source_partition, source_offset"


async def ingest(settings: Settings, history: History) -> None:
    """Publish what is queued and run a writer in-process until it has committed every partition's end."""
    assert settings.kafka_bootstrap_servers is not None
    await history.publish(settings.kafka_bootstrap_servers)
    assert all(send.outcome is Outcome.ACKNOWLEDGED for send in history.sends)
    writer = LedgerWriter(settings)
    stop = asyncio.Event()
    await writer.start()
    task = asyncio.create_task(writer.run(stop))
    connection = await asyncpg.connect(settings.admin_database_url)
    try:

        async def caught_up() -> bool:
            assert not task.done(), task
            stored = await stored_offsets(connection, settings.writer_group_id)
            return offsets_reached(stored, history.acknowledged_ends())

        async def describe() -> str:
            return f"ledger holds {await connection.fetchval('SELECT count(*) FROM ledger')}"

        await wait_until(caught_up, WAIT_S, describe)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await writer.stop()
        await connection.close()


async def rechain(connection: asyncpg.Connection) -> None:
    """Renumber from 1 and recompute every hash, so that a planted change breaks nothing but what it targets."""
    rows = await connection.fetch(f"SELECT seq, recorded_at, {CONTENT}, entry_hash FROM ledger ORDER BY seq")
    previous = GENESIS_HASH
    for seq, row in enumerate(rows, start=1):
        content = EntryContent(
            row["event_id"], row["event_type"], row["subject_id"], row["occurred_at"], row["producer"], row["body"]
        )
        entry_hash = chain_hash(previous, seq, row["recorded_at"], content)
        if seq != row["seq"] or entry_hash != bytes(row["entry_hash"]):
            await connection.execute(
                "UPDATE ledger SET seq = $1, entry_hash = $2 WHERE seq = $3 AND event_id = $4",
                seq,
                entry_hash,
                row["seq"],
                row["event_id"],
            )
        previous = entry_hash


async def append_row(connection: asyncpg.Connection, content: EntryContent) -> None:
    """Append an entry at the end, chained, as a writer without dedup or validation would."""
    await connection.execute(
        f"INSERT INTO ledger (seq, recorded_at, {CONTENT}, entry_hash)"
        " SELECT max(seq) + 1, max(recorded_at), $1, $2, $3, $4, $5, $6, $7 FROM ledger",
        content.event_id,
        content.event_type,
        content.subject_id,
        content.occurred_at,
        content.producer,
        dict(content.body),
        bytes(32),
    )
    await rechain(connection)


async def no_unique_event_id(connection: asyncpg.Connection) -> None:
    """The database refuses a second row per event_id; a planted duplicate has to drop that guard first."""
    await connection.execute("ALTER TABLE ledger DROP CONSTRAINT ledger_event_id_key")


@dataclasses.dataclass
class Cast:
    """The sends the planted bugs work on, picked from a real run."""

    once: Send
    """A valid event sent once (no redelivery, no conflict): touching it breaks no other expectation."""
    redelivered: Send
    """The redelivery of an event that is the last of its subject on its topic."""
    future: Send
    """An event rejected for its future occurred_at."""


@pytest.fixture
async def ingested(settings: Settings) -> tuple[Settings, History, Cast]:
    """A real ledger: 400 events over 12 subjects (many per subject and topic), redeliveries, conflicts, bad input."""
    await ensure_event_topics(settings)
    history = History(settings.topics.name, label="planted bugs")
    add_mix(history, subjects(12), 400)
    loner = make_event(history.rng, "the-only-one-of-its-kind")
    history.add_event(loner)
    redelivered = history.add_event(loner)
    await ingest(settings, history)
    counts = Counter(s.event.event_id for s in history.sends if s.event is not None)
    once = [s for s in history.sends if s.event and s.expected_reason is None and counts[s.event.event_id] == 1]
    future = next(s for s in history.sends if s.expected_reason is RejectReason.OCCURRED_AT_IN_FUTURE)
    return settings, history, Cast(history.rng.choice(once), redelivered, future)


Plant = Callable[[asyncpg.Connection], Awaitable[None]]


def planted_bugs(history: History, cast: Cast) -> dict[str, tuple[Plant, History]]:
    """Per anomaly kind: a change to the ledger (or to what the send log says) that must produce it alone."""
    assert cast.once.event is not None
    assert cast.future.event is not None
    assert cast.redelivered.where is not None
    victim = cast.once.event
    topic, partition, offset = cast.redelivered.where

    def relabelled(outcome: Outcome) -> History:
        """The same history, with the victim's send logged as `outcome`."""
        copied = copy.deepcopy(history)
        copied.sends[cast.once.number].outcome = outcome
        return copied

    async def lose(connection: asyncpg.Connection) -> None:
        await connection.execute("DELETE FROM ledger WHERE event_id = $1", victim.event_id)
        await rechain(connection)

    async def duplicate(connection: asyncpg.Connection) -> None:
        await no_unique_event_id(connection)
        await append_row(connection, EntryContent.of_event(victim))

    async def never_sent(connection: asyncpg.Connection) -> None:
        await append_row(connection, EntryContent.of_event(make_event(history.rng, "nobody-sent-this")))

    async def accept_bad(connection: asyncpg.Connection) -> None:
        await append_row(connection, EntryContent.of_event(cast.future.event))  # type: ignore[arg-type]

    async def alter(connection: asyncpg.Connection) -> None:
        await connection.execute("UPDATE ledger SET producer = 'altered' WHERE event_id = $1", victim.event_id)
        await rechain(connection)

    async def reorder(connection: asyncpg.Connection) -> None:
        """Swap two consecutive entries of one subject on one topic, with their sources: appended out of order."""
        rows = await connection.fetch(f"SELECT seq, subject_id, {SOURCE} FROM ledger WHERE subject_id IS NOT NULL")
        last: dict[tuple[str, str], int] = {}
        for row in sorted(rows, key=lambda r: r["seq"]):
            key = (row["subject_id"], row["source_topic"])
            if key in last:
                first, second = last[key], row["seq"]
                break
            last[key] = row["seq"]
        columns = f"{CONTENT}, {SOURCE}"
        values = [await connection.fetchrow(f"SELECT {columns} FROM ledger WHERE seq = $1", s) for s in (first, second)]
        await no_unique_event_id(connection)
        placeholders = ", ".join(f"${n}" for n in range(2, 11))
        for seq, row in ((first, values[1]), (second, values[0])):
            assert row is not None
            await connection.execute(f"UPDATE ledger SET ({columns}) = ({placeholders}) WHERE seq = $1", seq, *row)
        await rechain(connection)

    async def from_redelivery(connection: asyncpg.Connection) -> None:
        """Stored from a later delivery than the first: the first was dropped (the source is not hashed)."""
        await connection.execute(
            f"UPDATE ledger SET ({SOURCE}) = ($1, $2, $3) WHERE event_id = $4",
            topic,
            partition,
            offset,
            cast.redelivered.event.event_id,  # type: ignore[union-attr]
        )

    def one_rejection(change: str) -> Plant:
        async def plant(connection: asyncpg.Connection) -> None:
            await connection.execute(
                f"{change} WHERE id = (SELECT min(id) FROM rejected_events WHERE reason = 'undecodable')"
            )

        return plant

    def rejection_at(where: tuple[str, int, int], raw: bytes) -> Plant:
        async def plant(connection: asyncpg.Connection) -> None:
            await connection.execute(
                f"INSERT INTO rejected_events (reason, detail, {SOURCE}, raw) VALUES ('undecodable', 'planted', $1,"
                " $2, $3, $4)",
                *where,
                raw,
            )

        return plant

    async def break_hash(connection: asyncpg.Connection) -> None:
        await connection.execute(
            "UPDATE ledger SET entry_hash = $1 WHERE seq = (SELECT max(seq) / 2 FROM ledger)", history.rng.randbytes(32)
        )

    async def gap(connection: asyncpg.Connection) -> None:
        await connection.execute("UPDATE ledger SET seq = seq + 1 WHERE seq = (SELECT max(seq) FROM ledger)")

    async def back_in_time(connection: asyncpg.Connection) -> None:
        await connection.execute(
            "UPDATE ledger SET recorded_at = recorded_at - interval '1 day' WHERE seq = (SELECT max(seq) FROM ledger)"
        )
        await rechain(connection)

    async def offsets_behind(connection: asyncpg.Connection) -> None:
        await connection.execute(
            "UPDATE consumer_offsets SET next_offset = next_offset - 1 WHERE (topic, partition) = ($1, $2)",
            topic,
            partition,
        )

    async def nothing(connection: asyncpg.Connection) -> None:
        return None

    return {
        "lost": (lose, history),
        "duplicated": (duplicate, history),
        "never_sent": (never_sent, history),
        "accepted_bad": (accept_bad, history),
        "altered": (alter, history),
        "order": (reorder, history),
        "not_first_delivery": (from_redelivery, history),
        "rejection_missing": (one_rejection("DELETE FROM rejected_events"), history),
        "rejection_wrong_reason": (one_rejection("UPDATE rejected_events SET reason = 'unknown_schema'"), history),
        "rejection_bytes": (one_rejection("UPDATE rejected_events SET raw = raw || '\\x00'::bytea"), history),
        "rejected_valid": (rejection_at(cast.redelivered.where, cast.redelivered.value), history),
        "rejection_never_sent": (rejection_at((topic, partition, 10**9), b"never sent"), history),
        "chain": (break_hash, history),
        "seq_gap": (gap, history),
        "time_backwards": (back_in_time, history),
        "offsets_behind": (offsets_behind, history),
        # What the send log says decides too: indeterminate is at most once, failed is never.
        "none: indeterminate and stored": (nothing, relabelled(Outcome.INDETERMINATE)),
        "none: indeterminate and absent": (lose, relabelled(Outcome.INDETERMINATE)),
        "duplicated: indeterminate and stored twice": (duplicate, relabelled(Outcome.INDETERMINATE)),
        "never_sent: failed and stored": (nothing, relabelled(Outcome.FAILED)),
    }


async def test_the_checker_reports_each_planted_bug_and_nothing_else(
    ingested: tuple[Settings, History, Cast], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, history, cast = ingested
    connection = await connect(settings.admin_database_url or "")
    found: dict[str, set[str]] = {}
    try:
        clean = await check(history, connection, group_id=settings.writer_group_id, system_entries=0)
        print(clean.summary())
        clean.assert_clean()
        for name, (plant, log) in planted_bugs(history, cast).items():
            transaction = connection.transaction()
            await transaction.start()
            try:
                # Replica mode skips the append-only triggers: what a superuser (or a bug with rights) could do.
                await connection.execute("SET LOCAL session_replication_role = replica")
                await plant(connection)
                report = await check(log, connection, group_id=settings.writer_group_id, system_entries=0)
            finally:
                await transaction.rollback()
            expected = set() if name.startswith("none") else {name.split(":")[0]}
            found[name] = report.kinds()
            print(f"planted {name}: {len(report.anomalies)} anomalies {[str(a) for a in report.anomalies[:1]]}")
            assert report.kinds() == expected, (name, report.anomalies)
            assert len(report.anomalies) == len(expected), (name, report.anomalies)
    finally:
        await connection.close()
    assert len(found) == 20

    # The planted bug the issue names: a writer that skips dedup stores redeliveries again.
    def no_dedup(_known: object, candidates: list[ledger_store.Candidate], *_: object) -> list[ledger_store.Candidate]:
        return list(candidates)

    # A new consumer group, resuming from the stored offsets: the embedded broker takes ~20 s to let a new member
    # into the group the first writer just left, and ~5 s to form a new one.
    settings = settings.model_copy(update={"writer_group": f"{settings.writer_group}-no-dedup"})
    admin = await asyncpg.connect(settings.admin_database_url)
    try:
        await no_unique_event_id(admin)  # else the database refuses the duplicates, and the writer crashes instead
        await admin.execute(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)"
            " SELECT $1, topic, partition, next_offset FROM consumer_offsets",
            settings.writer_group_id,
        )
    finally:
        await admin.close()
    monkeypatch.setattr(ledger_store, "_dedup", no_dedup)
    # Only ids sent once: redelivering one whose id was also sent with other content would make the no-dedup
    # writer store that conflict too, a second anomaly (seen with seed 2126586753).
    sent = Counter(s.event.event_id for s in history.sends if s.event)
    stored = [s.event for s in history.sends
              if s.event and s.expected_reason is None and s.where and sent[s.event.event_id] == 1]
    redelivered = {e.event_id: e for e in history.rng.sample(stored, 5)}
    for event in redelivered.values():
        history.add_event(event)
    await ingest(settings, history)
    report = await check(history, settings.admin_database_url or "", group_id=settings.writer_group_id)
    print(f"dedup disabled: {report.summary()}")
    assert report.kinds() == {"duplicated"}, report.anomalies
    assert len(report.anomalies) == len(redelivered)
