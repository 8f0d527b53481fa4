"""Shared by the ledger writer's integration tests: events, raw sends, and checks of what the ledger holds."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from fastavro import schemaless_writer

from consent_ledger.adapters.avro.codec import MARKER, default_codec
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.config import Settings
from consent_ledger.core.events import (
    BODY_FIELDS,
    EVENT_TOPICS,
    Event,
    EventType,
    RejectReason,
    event_from_json,
    format_timestamp,
)
from consent_ledger.core.ledger import ChainVerifier
from history_checker import History, fold_chain

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


def avro_record(event: Event, **changes: Any) -> dict[str, Any]:
    """The Avro record of `event` as the codec writes it, with fields overridden (validation bypassed)."""
    record: dict[str, Any] = {
        "event_id": str(event.event_id),
        "event_type": event.event_type.value,
        "subject_id": event.subject_id,
        "occurred_at": int((event.occurred_at - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1)),
        "producer": event.producer,
        "body": dict(event.body),
    }
    record.update(changes)
    return record


def encode_unchecked(record: dict[str, Any], event_type: EventType) -> bytes:
    """Single-object encode a record with the real schema, skipping the contract's validation."""
    version = default_codec().catalogue.latest(event_type)
    out = io.BytesIO()
    out.write(MARKER + version.fingerprint)
    schemaless_writer(out, version.binary_schema, record)
    return out.getvalue()


def add_mix(history: History, people: Sequence[str], count: int) -> None:
    """`count` valid events, then redeliveries (5%), id conflicts (1%), garbage (1%) and future events (0.5%).

    Redeliveries and conflicts come after their originals (same topic and key, so same partition), as a producer
    retry would; all of the tail is shuffled together.
    """
    rng = history.rng
    events = [make_event(rng, rng.choice(people)) for _ in range(count)]
    for event in events:
        history.add_event(event)
    some = max(1, count // 100)
    tomorrow = datetime.now(UTC) + timedelta(days=1)  # far beyond the 5-minute skew, however long the test runs
    tail = [functools.partial(history.add_event, event) for event in rng.sample(events, count // 20)]
    tail += [
        functools.partial(history.add_event, dataclasses.replace(event, producer="another-producer"))
        for event in rng.sample(events, some)
    ]
    tail += [
        functools.partial(
            history.add_bytes,
            rng.choice(EVENT_TOPICS),
            rng.choice(people),
            bytes([rng.randrange(0xC3)]) + rng.randbytes(rng.randrange(40)),
            RejectReason.UNDECODABLE,
        )
        for _ in range(some)
    ]
    tail += [
        functools.partial(
            history.add_event,
            make_event(rng, rng.choice(people), occurred_at=tomorrow),
            expect=RejectReason.OCCURRED_AT_IN_FUTURE,
        )
        for _ in range(max(1, count // 200))
    ]
    rng.shuffle(tail)
    for add in tail:
        add()


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
        return await fold_chain(connection)
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


def writer_env(settings: Settings) -> dict[str, str]:
    """The environment of a `consent-ledger ledger-writer` child: this test's servers, prefix and settings."""
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSENT_LEDGER_")}
    env.update(
        {
            "CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "CONSENT_LEDGER_DATABASE_URL": settings.database_url,
            "CONSENT_LEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "CONSENT_LEDGER_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "CONSENT_LEDGER_WRITER_BATCH_MAX": str(settings.writer_batch_max),
            "CONSENT_LEDGER_MAX_MESSAGE_BYTES": str(settings.max_message_bytes),
        }
    )
    return env


class WriterProcess:
    """`consent-ledger ledger-writer` as a child process, its output appended to one log file."""

    def __init__(self, settings: Settings, log: Path, wait_s: float = 120.0) -> None:
        self.env = writer_env(settings)
        self.log = log
        self.wait_s = wait_s
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consent_ledger", "ledger-writer"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer did not exit within {timeout_s:.0f}s; see {self.tail()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def run_to_the_end(
        self,
        service_db: asyncpg.Connection,
        settings: Settings,
        ends: dict[tuple[str, int], int],
        describe: Callable[[], Awaitable[str]],
    ) -> None:
        """Start, append up to the end of every partition, then stop cleanly with SIGTERM (exit code 0)."""
        self.start()

        async def caught_up() -> bool:
            assert self.running(), f"the writer exited on its own; {self.tail()}"
            return offsets_reached(await stored_offsets(service_db, settings.writer_group_id), ends)

        await wait_until(caught_up, self.wait_s, describe)
        self.signal(signal.SIGTERM)
        assert await self.wait(60) == 0, self.tail()

    def kill(self) -> None:
        """Leave nothing running, whatever happened."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no output)"
        return f"{self.log}:\n" + "\n".join(text.splitlines()[-lines:])
