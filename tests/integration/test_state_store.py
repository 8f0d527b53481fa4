"""The state tables in PostgreSQL: however the feed is batched or redelivered, the rows equal one fold."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from consent_ledger.adapters.kafka.ledger_feed import entry_message, tick_message
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.apps.stream_processor import SubjectFolder
from consent_ledger.config import Settings
from consent_ledger.core.ledger import EntryContent, LedgerEntry

T0 = datetime(2025, 9, 1, tzinfo=UTC)
ROWS = {
    "consent_intervals": "valid_from, valid_to, consent_on, choice, policy_version, source_seq, known_from, known_to",
    "account_intervals": "valid_from, valid_to, registered, account_type, deleted, registered_seq, type_seq, "
                         "deleted_seq, known_from, known_to",
    "conversation_facts": "conversation_id, kind, occurred_at, seq, flag_id, counts_for_consent, known_from, known_to",
}


def ledger(subject: str) -> list[LedgerEntry]:
    """Three transactions; the second holds a late opt-out and a resume, so facts close and reopen within it."""
    def entry(seq: int, recorded: int, event_type: str, day: int, **body: str) -> LedgerEntry:
        content = EntryContent(uuid.uuid4(), event_type, subject, T0 + timedelta(days=day), "test", body)
        return LedgerEntry(seq, T0 + timedelta(days=100, seconds=recorded), content, bytes(32))

    return [
        entry(1, 1, "account.registered", 0, account_type="consumer"),
        entry(2, 1, "conversation.started", 40, conversation_id="c1"),
        entry(3, 2, "consent.changed", 35, choice="opt_out", source="support"),
        entry(4, 2, "consent.changed", 36, choice="opt_in", source="settings"),
        entry(5, 2, "conversation.resumed", 45, conversation_id="c1"),
        entry(6, 3, "safety.flagged", 50, conversation_id="c1", flag_id="f", category="x"),
    ]


async def rows(connection: asyncpg.Connection, subject: str) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: sorted((tuple(r) for r in await connection.fetch(
            f"SELECT {columns} FROM {table} WHERE subject_id = $1", subject)), key=repr)
        for table, columns in ROWS.items()
    }


@pytest.mark.parametrize("seed", range(6))
async def test_any_batching_and_redelivery_gives_the_rows_of_one_fold(
    settings: Settings, service_db: asyncpg.Connection, seed: int
) -> None:
    timeline = load_timeline(None)
    whole = SubjectFolder(settings, timeline)
    split = SubjectFolder(settings, timeline)
    await whole.start()
    await split.start()
    try:
        await whole.fold_batch([(0, entry_message(e)) for e in ledger("whole")])
        messages = [(0, entry_message(e)) for e in ledger("split")]
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(messages)), 3))
        # At-least-once: after a restart, delivery resumes a little before where it had got to.
        batches = [messages[max(0, a - rng.randrange(3)):b]
                   for a, b in zip([0, *cuts], [*cuts, len(messages)], strict=True)]
        for batch in batches:
            await split.fold_batch(batch)
        await split.fold_batch([(0, tick_message(6))])
    finally:
        await whole.stop()
        await split.stop()
    expected = await rows(service_db, "whole")
    assert all(expected.values()), expected
    assert await rows(service_db, "split") == expected, f"batches {[len(b) for b in batches]}"
    assert await service_db.fetchval("SELECT watermark_seq FROM processor_progress WHERE partition = 0") == 6
