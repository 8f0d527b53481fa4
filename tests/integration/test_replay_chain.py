"""The replay checks the chain in its shards, in subject order: it finds what a walk from seq 1 finds."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from ledger_support import verify_chain

from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.apps.replay import run_replay
from consent_ledger.config import Settings
from consent_ledger.core.ledger import POLICY_PUBLISHED, EntryContent

T0 = datetime(2025, 9, 1, tzinfo=UTC)
SUBJECTS = [f"subject-{n:02d}" for n in range(30)]


def event(subject: str, event_type: str, day: int, **body: str) -> Candidate:
    return Candidate(EntryContent(uuid.uuid4(), event_type, subject, T0 + timedelta(days=day), "test", body))


async def build(settings: Settings) -> dict[str, list[int]]:
    """Four transactions of one event per subject, a policy entry (no subject) after the second; each subject's
    seqs, and the policy's under "policy"."""
    transactions = [
        [event(s, "account.registered", 0, account_type="consumer") for s in SUBJECTS],
        [event(s, "conversation.started", 2, conversation_id=f"{s}-c") for s in SUBJECTS],
        [Candidate(EntryContent(uuid.uuid4(), POLICY_PUBLISHED, None, T0, "test", {"timeline_id": "x"}))],
        [event(s, "consent.changed", 1, choice="opt_out", source="settings") for s in SUBJECTS],
        [event(s, "conversation.resumed", 3, conversation_id=f"{s}-c") for s in SUBJECTS],
    ]
    seqs: dict[str, list[int]] = {}
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        for candidates in transactions:
            async with connection.transaction():
                for entry in (await append(connection, candidates)).appended:
                    seqs.setdefault(entry.subject_id or "policy", []).append(entry.seq)
    finally:
        await connection.close()
    return seqs


async def tampered(connection: asyncpg.Connection, sql: str, *args: object) -> None:
    # As a superuser past the append-only guard: what `verify` and `replay` are there to catch.
    async with connection.transaction():
        await connection.execute("SET LOCAL session_replication_role = replica")
        await connection.execute(sql, *args)


Tamper = Callable[[asyncpg.Connection, dict[str, list[int]]], Awaitable[int | None]]


async def nothing(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    return None


async def two_bodies_in_two_shards(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    # The first subjects' shard holds the later break: the report must take the lower seq from the other shard.
    low, high = seqs[SUBJECTS[-1]][1], seqs[SUBJECTS[0]][3]
    for seq in (low, high):
        await tampered(admin, "UPDATE ledger SET body = jsonb_set(body, '{forged}', 'true') WHERE seq = $1", seq)
    return low


async def an_entry_deleted(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    gone = seqs[SUBJECTS[7]][2]
    await tampered(admin, "DELETE FROM ledger WHERE seq = $1", gone)
    return gone + 1


async def the_first_entry_deleted(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    await tampered(admin, "DELETE FROM ledger WHERE seq = 1")
    return 2


async def recorded_back_in_time(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    moved = seqs[SUBJECTS[20]][3]
    await tampered(admin, "UPDATE ledger SET recorded_at = recorded_at - interval '1 day' WHERE seq = $1", moved)
    return moved


async def the_policy_entry_altered(admin: asyncpg.Connection, seqs: dict[str, list[int]]) -> int | None:
    policy = seqs["policy"][0]
    await tampered(admin, "UPDATE ledger SET producer = 'forged' WHERE seq = $1", policy)
    return policy


@pytest.mark.parametrize("tamper", [nothing, two_bodies_in_two_shards, an_entry_deleted, the_first_entry_deleted,
                                    recorded_back_in_time, the_policy_entry_altered])
async def test_the_replay_finds_the_break_a_walk_from_seq_1_finds(
    settings: Settings, admin_db: asyncpg.Connection, tmp_path: Path,
    tamper: Tamper,
) -> None:
    seqs = await build(settings)
    first_bad = await tamper(admin_db, seqs)
    report_path = tmp_path / "replay.json"

    await run_replay(settings, report_path=report_path, until=None, policy_file=None, progress=False)

    assert settings.database_url is not None
    walk = await verify_chain(settings.database_url)
    found = walk.first_break
    assert (found.seq if found else None) == first_bad
    assert json.loads(report_path.read_text())["chain"] == {
        "verified_entries": walk.checked,
        "first_bad_seq": first_bad,
        "detail": found.detail if found else None,
    }


async def test_a_replay_until_a_cut_checks_the_chain_up_to_it(
    settings: Settings, admin_db: asyncpg.Connection, tmp_path: Path,
) -> None:
    seqs = await build(settings)
    cut_seq = seqs["policy"][0]
    cut = await admin_db.fetchval("SELECT recorded_at FROM ledger WHERE seq = $1", cut_seq)
    report_path = tmp_path / "replay.json"

    # Broken after the cut: not part of what was known then.
    after = seqs[SUBJECTS[3]][3]
    await tampered(admin_db, "UPDATE ledger SET producer = 'forged' WHERE seq = $1", after)
    await run_replay(settings, report_path=report_path, until=cut, policy_file=None, progress=False)
    assert json.loads(report_path.read_text())["chain"] == {
        "verified_entries": cut_seq, "first_bad_seq": None, "detail": None,
    }

    # Broken before it.
    before = seqs[SUBJECTS[3]][1]
    await tampered(admin_db, "UPDATE ledger SET producer = 'forged' WHERE seq = $1", before)
    await run_replay(settings, report_path=report_path, until=cut, policy_file=None, progress=False)
    assert json.loads(report_path.read_text())["chain"]["first_bad_seq"] == before
