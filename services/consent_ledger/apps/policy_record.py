"""Records the policy timeline in the ledger whenever the one in force changes, so audits can show it."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import asyncpg

from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.core.ledger import POLICY_PUBLISHED, EntryContent, canonical_json
from consent_ledger.core.policy import PolicyTimeline, timeline_from_json, timeline_to_json

log = logging.getLogger("consent_ledger.policy")
PRODUCER = "consent-ledger/ledger-writer"


async def record_policy_if_changed(database_url: str, timeline: PolicyTimeline) -> int | None:
    """Append a `policy.published` entry unless the latest one already holds this timeline; returns its seq."""
    document = timeline_to_json(timeline)
    connection = await connect(database_url)
    try:
        async with connection.transaction():
            # Take the append lock first so that two writers starting together record it once.
            await connection.execute(query("ledger", "lock_appends"))
            latest = await connection.fetchval(query("ledger", "latest_policy"))
            if latest is not None and canonical_json(latest) == canonical_json(document):
                return None
            head = await connection.fetchval("SELECT coalesce(max(seq), 0) FROM ledger")
            # Named after the content and its place, so a timeline restored later is a new entry.
            event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"policy/{head}/{canonical_json(document).decode()}")
            content = EntryContent(event_id, POLICY_PUBLISHED, None, datetime.now(UTC), PRODUCER, document)
            outcome = await append(connection, [Candidate(content)])
        seq = outcome.appended[0].seq
        log.info("recorded policy timeline %s at seq %d", timeline.timeline_id, seq)
        return seq
    finally:
        await connection.close()


async def differs_from_recorded(connection: asyncpg.Connection, timeline: PolicyTimeline) -> bool:
    """Whether the last `policy.published` entry holds another timeline (False while none is recorded)."""
    latest = await connection.fetchval(query("ledger", "latest_policy"))
    return latest is not None and canonical_json(latest) != canonical_json(timeline_to_json(timeline))


async def timeline_before(connection: asyncpg.Connection, seq: int) -> PolicyTimeline | None:
    """The timeline recorded last before the entry at `seq`: the one in force when it was appended (a decision
    receipt's answers were given under it). None when no timeline was recorded before it."""
    document = await connection.fetchval(query("ledger", "policy_before"), seq)
    return None if document is None else timeline_from_json(document)
