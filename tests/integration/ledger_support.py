"""Shared by the ledger writer's integration tests: events, raw sends, and checks of what the ledger holds."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import stream_entries
from consent_ledger.config import Settings
from consent_ledger.core.events import BODY_FIELDS, EVENT_TOPICS, Event, EventType, event_from_json, format_timestamp
from consent_ledger.core.ledger import ChainVerifier

# Unicode, quotes and spaces in keys and fields, so the round trip through Kafka and jsonb is exercised.
_SUBJECT_STEMS = ["subject", "Ünïcødé-主体", "emoji-🙂🔬", "with space", "quote\"s'and\\slash", "ß漢字"]
START = datetime(2025, 1, 1, tzinfo=UTC)


def subjects(count: int) -> list[str]:
    return [f"{_SUBJECT_STEMS[index % len(_SUBJECT_STEMS)]}-{index}" for index in range(count)]


def make_event(
    rng: random.Random,
    subject_id: str,
    *,
    event_type: EventType | None = None,
    occurred_at: datetime | None = None,
    producer: str = "integration-test",
) -> Event:
    """A valid event with short fields (well under 1 KiB encoded); `rng` makes the stream reproducible."""
    kind = event_type if event_type is not None else rng.choice(list(EventType))
    body = {
        name: rng.choice(allowed) if allowed is not None else f"{name}-{rng.randrange(1000)}-ü"
        for name, allowed in BODY_FIELDS[kind].items()
    }
    moment = occurred_at if occurred_at is not None else START + timedelta(microseconds=rng.randrange(10**13))
    return event_from_json({
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "event_type": kind.value,
        "subject_id": subject_id,
        "occurred_at": format_timestamp(moment),
        "producer": producer,
        "body": body,
    })


def event_topic_names(settings: Settings) -> list[str]:
    return [settings.topics.name(topic) for topic in EVENT_TOPICS]


async def ensure_event_topics(settings: Settings) -> list[str]:
    """Create the event topics (and the dead-letter topic) up front, as a deployment would."""
    assert settings.kafka_bootstrap_servers is not None
    names = event_topic_names(settings)
    await ensure_topics(
        settings.kafka_bootstrap_servers, [*names, settings.topics.dead_letter], settings.topic_partitions, 1
    )
    return names


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes
    value: bytes


async def send_raw(servers: str, messages: Sequence[Message]) -> list[RecordMetadata]:
    """Send raw bytes in order (acks=all) and return where each landed; fails if any is not acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, acks="all", enable_idempotence=False, linger_ms=5, max_batch_size=262_144
    )
    await producer.start()
    try:
        futures = [await producer.send(m.topic, m.value, key=m.key) for m in messages]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def end_offsets_of(metadata: Sequence[RecordMetadata]) -> dict[tuple[str, int], int]:
    """The next offset of each partition written to, from the producer's acknowledgements.

    Not ListOffsets: the embedded Tansu broker answers it with its last batch's base offset + 1.
    """
    ends: dict[tuple[str, int], int] = {}
    for meta in metadata:
        key = (meta.topic, meta.partition)
        ends[key] = max(ends.get(key, 0), meta.offset + 1)
    return ends


async def stored_offsets(connection: asyncpg.Connection, group_id: str) -> dict[tuple[str, int], int]:
    rows = await connection.fetch(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1", group_id
    )
    return {(row["topic"], row["partition"]): row["next_offset"] for row in rows}


def offsets_reached(stored: dict[tuple[str, int], int], ends: dict[tuple[str, int], int]) -> bool:
    """Every partition with messages has its stored next offset at the log end."""
    return all(stored.get(tp, 0) >= end for tp, end in ends.items() if end > 0)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, describe: Callable[[], Awaitable[str]], poll_s: float = 0.2
) -> None:
    """Poll `check` until it holds; fail with `describe()` once `timeout_s` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:.0f}s: {await describe()}")
        await asyncio.sleep(poll_s)


async def verify_chain(database_url: str) -> ChainVerifier:
    """Fold the whole ledger through a `ChainVerifier` (the same fold `consent-ledger verify` uses)."""
    connection = await connect(database_url)
    try:
        verifier = ChainVerifier()
        async for entries in stream_entries(connection, batch=5000):
            verifier.feed(entries)
        return verifier
    finally:
        await connection.close()


async def assert_ledger_sound(
    connection: asyncpg.Connection,
    database_url: str,
    expected_event_ids: set[uuid.UUID],
    *,
    entries_without_subject: int = 0,
) -> None:
    """The ledger holds exactly `expected_event_ids`, once each, at seqs 1..N, in time order, chained.

    Entries without a subject (the policy timeline the writer service records) are counted, not matched.
    """
    rows = await connection.fetch("SELECT seq, event_id, subject_id, recorded_at FROM ledger ORDER BY seq")
    event_ids = [row["event_id"] for row in rows if row["subject_id"] is not None]
    assert len(event_ids) == len(set(event_ids)), "an event_id is in the ledger twice"
    missing = expected_event_ids - set(event_ids)
    extra = set(event_ids) - expected_event_ids
    assert not missing, f"{len(missing)} events missing from the ledger, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected events in the ledger, e.g. {sorted(extra)[:3]}"
    assert len(event_ids) == len(expected_event_ids)
    assert len(rows) - len(event_ids) == entries_without_subject, "entries without a subject"
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1)), "seq has gaps"
    times = [row["recorded_at"] for row in rows]
    assert all(a <= b for a, b in itertools.pairwise(times)), "recorded_at goes back in time"
    verifier = await verify_chain(database_url)
    assert verifier.first_break is None, f"chain broken: {verifier.first_break}"
    assert verifier.checked == len(rows)


async def run_cli(*args: str, env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    """Run `consent-ledger ARGS` as a subprocess; its exit code and combined output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consent_ledger", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()
