"""The state tables in PostgreSQL: however the feed is batched or redelivered, the rows equal one fold."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from ledger_support import wait_until
from prometheus_client import REGISTRY

from consent_ledger.adapters.kafka.ledger_feed import Announcement, announcement_messages, tick_message
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres import state_store
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.adapters.postgres.state_store import TABLE_OF, plan_writes
from consent_ledger.apps import stream_processor
from consent_ledger.apps.stream_processor import SubjectFolder
from consent_ledger.config import Settings
from consent_ledger.core.facts import fold_subject
from consent_ledger.core.increments import fold_increments
from consent_ledger.core.ledger import EntryContent, LedgerEntry
from consent_ledger.core.state import current_state

T0 = datetime(2025, 9, 1, tzinfo=UTC)
ROWS = {
    "consent_intervals": "valid_from, valid_to, consent_on, choice, policy_version, source_seq, known_from, known_to",
    "account_intervals": "valid_from, valid_to, registered, account_type, deleted, registered_seq, type_seq, "
                         "deleted_seq, known_from, known_to",
    "conversation_facts": "conversation_id, kind, occurred_at, seq, flag_id, counts_for_consent, known_from, known_to",
}


async def ledger(connection: asyncpg.Connection, subject: str) -> list[LedgerEntry]:
    """Three transactions; the second holds a late opt-out and a resume, so facts close and reopen within it."""
    def content(event_type: str, day: int, **body: str) -> Candidate:
        return Candidate(EntryContent(uuid.uuid4(), event_type, subject, T0 + timedelta(days=day), "test", body))

    transactions = [
        [content("account.registered", 0, account_type="consumer"),
         content("conversation.started", 40, conversation_id="c1")],
        [content("consent.changed", 35, choice="opt_out", source="support"),
         content("consent.changed", 36, choice="opt_in", source="settings"),
         content("conversation.resumed", 45, conversation_id="c1")],
        [content("safety.flagged", 50, conversation_id="c1", flag_id="f", category="x")],
    ]
    entries: list[LedgerEntry] = []
    for candidates in transactions:
        async with connection.transaction():
            entries += (await append(connection, candidates)).appended
    return entries


def replayed(entries: list[LedgerEntry]) -> dict[str, list[tuple[object, ...]]]:
    """The rows a compliance replay writes for these entries: the same fold, all at once."""
    assert entries[0].subject_id is not None
    changes, _ = fold_increments(entries[0].subject_id, [], entries, load_timeline(None))
    inserts = plan_writes(changes).inserts
    return {TABLE_OF[cls]: sorted((row[2:] for row in inserts.get(cls, [])), key=repr) for cls in TABLE_OF}


async def rows(connection: asyncpg.Connection, subject: str) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: sorted((tuple(r) for r in await connection.fetch(
            f"SELECT {columns} FROM {table} WHERE subject_id = $1", subject)), key=repr)
        for table, columns in ROWS.items()
    }


@pytest.fixture
async def ledger_db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """The service role with the service's JSON codecs, to append entries as the writer does."""
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.mark.parametrize("cache", [10_000, 0], ids=["cached", "no-cache"])
@pytest.mark.parametrize("seed", range(6))
async def test_any_batching_and_redelivery_gives_the_rows_of_one_fold(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection, seed: int, cache: int
) -> None:
    """Without a cache every batch starts from what is stored: each subject's folded history, read again."""
    folder = SubjectFolder(settings.model_copy(update={"processor_cache_subjects": cache}), load_timeline(None))
    await folder.start()
    try:
        entries = await ledger(ledger_db, "split")
        messages = [(0, m) for e in entries for m in announcement_messages([Announcement(e.subject_id, e.seq)])]
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(messages)), 3))
        # At-least-once: after a restart, delivery resumes a little before where it had got to.
        batches = [messages[max(0, a - rng.randrange(3)):b]
                   for a, b in zip([0, *cuts], [*cuts, len(messages)], strict=True)]
        for batch in batches:
            await folder.fold_batch(batch)
        await folder.fold_batch([(0, tick_message(entries[-1].seq, 1))])
    finally:
        await folder.stop()
    expected = replayed(entries)
    assert all(expected.values()), expected
    assert await rows(service_db, "split") == expected, f"batches {[len(b) for b in batches]}"
    assert await stored_current_state(service_db, "split") == folded_current_state(entries)
    progress = await service_db.fetchval("SELECT watermark_seq FROM processor_progress WHERE partition = 0")
    assert progress == entries[-1].seq


@pytest.mark.parametrize("seed", range(4))
async def test_entries_lost_by_the_feed_are_folded_from_the_ledger(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection, seed: int
) -> None:
    """faust may drop feed messages while it recovers a partition: the tick still brings every entry in."""
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    try:
        lossy = await ledger(ledger_db, "lossy")
        rng = random.Random(seed)
        delivered = [e for e in lossy if rng.random() < 0.5]  # half of the messages never arrive
        announced = [Announcement(e.subject_id, e.seq) for e in delivered]
        await folder.fold_batch([(0, m) for m in announcement_messages(announced)])
        await folder.fold_batch([(0, tick_message(lossy[-1].seq, 1))])
    finally:
        await folder.stop()
    assert await rows(service_db, "lossy") == replayed(lossy), [e.seq for e in delivered]


async def stored_current_state(connection: asyncpg.Connection, subject: str) -> object:
    return orjson.loads(await connection.fetchval("SELECT state FROM subject_current_state WHERE subject_id = $1",
                                                  subject))


def folded_current_state(entries: list[LedgerEntry]) -> object:
    assert entries[0].subject_id is not None
    return orjson.loads(orjson.dumps(current_state(fold_subject(entries[0].subject_id, entries, load_timeline(None)))))


async def test_a_subject_folded_twice_in_one_transaction_continues_from_its_own_rows(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection
) -> None:
    """A tick promising more of a subject folded earlier in the same transaction, with nothing cached: the second
    round continues from what the first folded (not committed yet), and rows and current state equal one fold."""
    entries = await ledger(ledger_db, "twice")
    folder = SubjectFolder(settings.model_copy(update={"processor_cache_subjects": 0}), load_timeline(None))
    await folder.start()
    try:
        first = [Announcement(e.subject_id, e.seq) for e in entries[:2]]
        await folder.fold_batch([(0, m) for m in announcement_messages(first)])
        # The consent changes and the resume are announced; the flag after them only promised by the tick.
        assert [e.event_type for e in entries[2:]] == [
            "consent.changed", "consent.changed", "conversation.resumed", "safety.flagged"]
        second = [Announcement(e.subject_id, e.seq) for e in entries[2:5]]
        await folder.fold_batch([(0, m) for m in announcement_messages(second)] + [
            (0, tick_message(entries[-1].seq, 1))])
    finally:
        await folder.stop()
    assert await rows(service_db, "twice") == replayed(entries)
    assert await stored_current_state(service_db, "twice") == folded_current_state(entries)


async def test_a_tick_promising_many_subjects_is_folded_a_share_per_transaction(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition with no progress recorded (a rebuild): its first tick promises every subject. They are folded
    a share per transaction, not all histories at once, and the tick is recorded when nothing is left behind."""
    monkeypatch.setattr(stream_processor, "PROMISED_PER_TRANSACTION", 4)
    subjects = [f"many-{i:02d}" for i in range(10)]
    entries = {subject: await ledger(ledger_db, subject) for subject in subjects}
    head = max(e.seq for mine in entries.values() for e in mine)
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    try:
        await folder.fold_batch([(0, tick_message(head, 1))])
    finally:
        await folder.stop()
    for subject in subjects:
        assert await rows(service_db, subject) == replayed(entries[subject]), subject
    # Each transaction leaves its id on the fold-state rows it wrote: 4 + 4 + 2 subjects.
    assert await service_db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM subject_fold_state WHERE subject_id LIKE 'many-%'") == 3
    assert await service_db.fetchval("SELECT watermark_seq FROM processor_progress WHERE partition = 0") == head


async def test_a_batch_of_many_subjects_is_folded_a_chunk_of_subjects_at_a_time_in_its_one_transaction(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a batch holds in hand is a chunk's entries and histories, however many subjects it announces; the
    chunks are locked in subject order, and the batch is still one transaction with the rows of one fold."""
    monkeypatch.setattr(stream_processor, "SUBJECTS_PER_CHUNK", 3)
    locked: list[list[str]] = []
    lock = state_store.lock_fold_state

    async def locking(connection: asyncpg.Connection, subjects: list[str]) -> dict[str, state_store.FoldState]:
        locked.append(list(subjects))
        return await lock(connection, subjects)

    monkeypatch.setattr(state_store, "lock_fold_state", locking)
    subjects = [f"chunked-{i:02d}" for i in range(10)]
    entries = {subject: await ledger(ledger_db, subject) for subject in subjects}
    announced = [Announcement(subject, e.seq) for subject in reversed(subjects) for e in entries[subject]]
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    try:
        folded = await folder.fold_batch([(0, m) for m in announcement_messages(announced)])
    finally:
        await folder.stop()
    assert folded == sum(len(mine) for mine in entries.values())
    assert locked == [subjects[0:3], subjects[3:6], subjects[6:9], subjects[9:]]
    for subject in subjects:
        assert await rows(service_db, subject) == replayed(entries[subject]), subject
    assert await service_db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM subject_fold_state WHERE subject_id LIKE 'chunked-%'") == 1


def ticks_recorded(checked_by: str) -> float:
    return REGISTRY.get_sample_value("consent_ledger_ticks_recorded_total", {"checked_by": checked_by}) or 0.0


async def test_a_tick_skips_the_ledger_scan_only_after_an_unbroken_run_of_offsets_from_one_that_held(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection
) -> None:
    """The first tick a worker sees is checked; so is one after a gap (lost messages), and the loss is folded."""
    entries = await ledger(ledger_db, "runs")
    first, second, lost = entries[:2], entries[2:4], entries[4:]

    def announced(part: list[LedgerEntry]) -> list[bytes]:
        return [m for e in part for m in announcement_messages([Announcement(e.subject_id, e.seq)])]

    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    checked, trusted = ticks_recorded("ledger"), ticks_recorded("feed")
    try:
        one = [*announced(first), tick_message(first[-1].seq, 1)]
        await folder.fold_batch([(0, m) for m in one], list(range(len(one))))
        two = [*announced(second), tick_message(second[-1].seq, 1)]
        await folder.fold_batch([(0, m) for m in two], list(range(len(one), len(one) + len(two))))
        # The announcements of `lost` were at the next offsets and never arrived: only the tick after them did.
        await folder.fold_batch([(0, tick_message(lost[-1].seq, 1))], [len(one) + len(two) + len(lost)])
    finally:
        await folder.stop()
    assert (ticks_recorded("ledger") - checked, ticks_recorded("feed") - trusted) == (2, 1)
    assert await rows(service_db, "runs") == replayed(entries)
    progress = await service_db.fetchval("SELECT watermark_seq FROM processor_progress WHERE partition = 0")
    assert progress == entries[-1].seq


def fold_retries(sqlstate: str = "40P01") -> float:
    return REGISTRY.get_sample_value("consent_ledger_fold_retries_total", {"sqlstate": sqlstate}) or 0.0


def fold_retries_by_sqlstate() -> dict[str, float]:
    return {sample.labels["sqlstate"]: sample.value for family in REGISTRY.collect()
            if family.name == "consent_ledger_fold_retries" for sample in family.samples
            if sample.name.endswith("_total")}


async def test_a_fold_rolled_back_by_a_deadlock_is_folded_again(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection, admin_db: asyncpg.Connection
) -> None:
    """Two workers folding one partition in a rebalance can lock its subjects in opposite orders: PostgreSQL
    aborts one transaction, and that worker folds its batch again instead of failing."""
    first, second = await ledger(ledger_db, "dl-a"), await ledger(ledger_db, "dl-b")
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    retries = fold_retries()
    try:
        # Both subjects folded once, so both have fold-state rows to lock.
        early = [Announcement(e.subject_id, e.seq) for e in (first[0], second[0])]
        await folder.fold_batch([(0, m) for m in announcement_messages(early)])
        rest = [Announcement(e.subject_id, e.seq) for e in (*first[1:], *second[1:])]
        async with admin_db.transaction():
            # The other worker: its own detector waits longer, so PostgreSQL aborts the folder's transaction.
            await admin_db.execute("SET LOCAL deadlock_timeout = '20s'")
            await admin_db.execute("SELECT 1 FROM subject_fold_state WHERE subject_id = 'dl-b' FOR UPDATE")
            folding = asyncio.create_task(folder.fold_batch([(0, m) for m in announcement_messages(rest)]))
            # The folder locks dl-a, then waits for dl-b; taking dl-a closes the cycle.
            async def folder_waits() -> bool:
                return bool(await admin_db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                ))

            async def activity() -> str:
                return repr(await admin_db.fetch("SELECT pid, state, wait_event_type, query FROM pg_stat_activity"))

            await wait_until(folder_waits, 20, activity, poll_s=0.02)
            await admin_db.execute("SELECT 1 FROM subject_fold_state WHERE subject_id = 'dl-a' FOR UPDATE")
        await asyncio.wait_for(folding, 30)
    finally:
        await folder.stop()
    assert fold_retries() - retries == 1
    assert await rows(service_db, "dl-a") == replayed(first)
    assert await rows(service_db, "dl-b") == replayed(second)


async def test_a_fold_whose_session_is_lost_is_folded_again_on_a_new_one(
    settings: Settings, service_db: asyncpg.Connection, ledger_db: asyncpg.Connection, admin_db: asyncpg.Connection
) -> None:
    """PostgreSQL restarting, failing over or ending a session under the folder: the batch is folded again on a
    new session, once, instead of the worker restarting (a rebalance and a cold cache)."""
    entries = await ledger(ledger_db, "lost")
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    before = fold_retries_by_sqlstate()
    try:
        await folder.fold_batch([(0, m) for m in announcement_messages([Announcement("lost", entries[0].seq)])])
        rest = [Announcement(e.subject_id, e.seq) for e in entries[1:]]
        async with admin_db.transaction():
            # Hold the subject so that the folder's transaction is open, waiting, when its session is ended.
            await admin_db.execute("SELECT 1 FROM subject_fold_state WHERE subject_id = 'lost' FOR UPDATE")
            folding = asyncio.create_task(folder.fold_batch([(0, m) for m in announcement_messages(rest)]))
            waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"

            async def folder_waits() -> bool:
                return bool(await admin_db.fetchval(waiting))

            async def activity() -> str:
                return repr(await admin_db.fetch("SELECT pid, state, wait_event_type, query FROM pg_stat_activity"))

            await wait_until(folder_waits, 20, activity, poll_s=0.02)
            assert await admin_db.fetchval(f"SELECT pg_terminate_backend(({waiting}))")
        await asyncio.wait_for(folding, 30)
    finally:
        await folder.stop()
    after = fold_retries_by_sqlstate()
    retried = {state: count - before.get(state, 0.0) for state, count in after.items() if count != before.get(state)}
    # Ended while waiting: 57P01 from the server, or 08003 when the client sees the session closed first.
    assert list(retried.values()) == [1.0], retried
    assert set(retried) <= {"57P01", "08003"}, retried
    assert await rows(service_db, "lost") == replayed(entries)
