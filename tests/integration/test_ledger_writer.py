"""The ledger writer's acceptance criteria against the real broker and PostgreSQL: exactly once, every
rejection kept with its reason, gapless chained seqs, rebalances, and append-only enforced by the database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from ledger_support import (
    Message,
    assert_ledger_sound,
    avro_record,
    encode_unchecked,
    end_offsets_of,
    ensure_event_topics,
    make_event,
    offsets_reached,
    run_cli,
    send_raw,
    stored_offsets,
    subjects,
    verify_chain,
    wait_until,
)

from consent_ledger.adapters.avro.codec import HEADER_SIZE, MARKER, decode_event, default_codec, encode_event
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, SourceRef, append
from consent_ledger.apps.ledger_writer import BrokerLogLost, LedgerWriter
from consent_ledger.config import Settings
from consent_ledger.core.events import BODY_FIELDS, EVENT_TOPICS, Event, EventType, InvalidEvent, RejectReason
from consent_ledger.core.ledger import EntryContent

SEED = 20251001
VALID_EVENTS = 10_000
DUPLICATE_SHARE = 0.05
BAD_PER_KIND = 200  # 2% of the valid events, for each kind of bad input
MAX_MESSAGE_BYTES = 1024  # the smallest the settings allow; valid events here stay well below it
WAIT_S = 120.0


# ---------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Scenario:
    """Messages in send order, with what the writer must make of each."""

    messages: list[Message] = dataclasses.field(default_factory=list)
    expected_reason: list[RejectReason | None] = dataclasses.field(default_factory=list)
    original_of: list[uuid.UUID | None] = dataclasses.field(default_factory=list)
    """The event_id of a first delivery of a valid event (None for redeliveries and bad input)."""
    valid_ids: set[uuid.UUID] = dataclasses.field(default_factory=set)


def _undecodable(rng: random.Random, valid: Event, index: int) -> bytes:
    variant = index % 4
    if variant == 0:  # random garbage that does not even open with the single-object marker
        return bytes([rng.randrange(0xC3)]) + rng.randbytes(rng.randrange(0, 300))
    if variant == 1:  # shorter than the header
        return MARKER[: rng.randrange(3)] + rng.randbytes(rng.randrange(0, 6))
    if variant == 2:  # a real event cut short
        raw = encode_event(valid)
        return raw[: rng.randrange(HEADER_SIZE + 1, len(raw) - 1)]
    return encode_event(valid) + rng.randbytes(rng.randrange(1, 8))  # trailing bytes after a record


def _unknown_schema(rng: random.Random, valid: Event) -> bytes:
    catalogue = default_codec().catalogue
    while True:
        fingerprint = rng.randbytes(8)
        if catalogue.by_fingerprint(fingerprint) is None:
            return MARKER + fingerprint + encode_event(valid)[HEADER_SIZE:]


def _invalid_field(valid: Event, index: int) -> bytes:
    text_field = next((name for name, allowed in BODY_FIELDS[valid.event_type].items() if allowed is None), None)
    variants: list[dict[str, Any]] = [
        {"producer": ""},
        {"subject_id": "s" * 200},
        {"event_id": "not-a-uuid"},
        {"producer": "bell\x07in the name"},
        {"event_type": "account.deleted" if valid.event_type is not EventType.ACCOUNT_DELETED else "safety.cleared"},
    ]
    if text_field is not None:
        variants.append({"body": {**valid.body, text_field: ""}})
    return encode_unchecked(avro_record(valid, **variants[index % len(variants)]), valid.event_type)


def _oversized(rng: random.Random, subject_id: str, index: int) -> bytes:
    if index % 2:
        return rng.randbytes(rng.randrange(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES))
    # A valid event in every other respect: the size limit comes before any decoding.
    event = make_event(rng, subject_id, event_type=EventType.SAFETY_FLAGGED)
    big = dataclasses.replace(event, producer="🙂" * 256, body={name: "🙂" * 256 for name in event.body})
    raw = encode_event(big)
    assert len(raw) > MAX_MESSAGE_BYTES
    return raw


def build_scenario(settings: Settings, rng: random.Random) -> Scenario:
    """10,000 valid events, 5% redelivered, and 2% of each kind of bad input, shuffled together.

    Redeliveries and id conflicts go after their original on the same partition (same topic and key),
    as a producer retry would; everything else is in random order.
    """
    topic = settings.topics.name
    people = subjects(400)
    valid = [make_event(rng, rng.choice(people)) for _ in range(VALID_EVENTS)]
    # (sort key, message, expected reason, event_id if the first delivery of a valid event)
    keyed: list[tuple[float, Message, RejectReason | None, uuid.UUID | None]] = []
    first_key: dict[uuid.UUID, float] = {}
    for event in valid:
        first_key[event.event_id] = rng.random()
        message = Message(topic(event.topic), event.subject_id.encode(), encode_event(event))
        keyed.append((first_key[event.event_id], message, None, event.event_id))

    def after(event: Event) -> float:
        return rng.uniform(first_key[event.event_id], 1.0)

    for event in rng.sample(valid, int(VALID_EVENTS * DUPLICATE_SHARE)):
        keyed.append((after(event), Message(topic(event.topic), event.subject_id.encode(), encode_event(event)),
                      None, None))
    for event in rng.sample(valid, BAD_PER_KIND):
        conflicting = dataclasses.replace(event, producer="another-producer")
        keyed.append((after(event), Message(topic(event.topic), event.subject_id.encode(), encode_event(conflicting)),
                      RejectReason.EVENT_ID_CONFLICT, None))

    def bad(reason: RejectReason, topic_name: str, key: str, value: bytes) -> None:
        keyed.append((rng.random(), Message(topic_name, key.encode(), value), reason, None))

    for index in range(BAD_PER_KIND):
        fresh = make_event(rng, rng.choice(people))
        bad(RejectReason.UNDECODABLE, topic(rng.choice(EVENT_TOPICS)), fresh.subject_id,
            _undecodable(rng, fresh, index))
        fresh = make_event(rng, rng.choice(people))
        bad(RejectReason.UNKNOWN_SCHEMA, topic(fresh.topic), fresh.subject_id, _unknown_schema(rng, fresh))
        fresh = make_event(rng, rng.choice(people))
        bad(RejectReason.INVALID_FIELD, topic(fresh.topic), fresh.subject_id, _invalid_field(fresh, index))
        # A day ahead: far beyond the 5-minute skew, however long the test runs.
        fresh = make_event(rng, rng.choice(people), occurred_at=datetime.now(UTC) + timedelta(days=1))
        bad(RejectReason.OCCURRED_AT_IN_FUTURE, topic(fresh.topic), fresh.subject_id, encode_event(fresh))
        fresh = make_event(rng, rng.choice(people))
        elsewhere = rng.choice([t for t in EVENT_TOPICS if t != fresh.topic])
        bad(RejectReason.WRONG_TOPIC, topic(elsewhere), fresh.subject_id, encode_event(fresh))
        subject_id = rng.choice(people)
        bad(RejectReason.OVERSIZED, topic(rng.choice(EVENT_TOPICS)), subject_id, _oversized(rng, subject_id, index))

    keyed.sort(key=lambda item: item[0])
    scenario = Scenario(valid_ids={event.event_id for event in valid})
    assert len(scenario.valid_ids) == VALID_EVENTS
    for _, message, reason, original in keyed:
        scenario.messages.append(message)
        scenario.expected_reason.append(reason)
        scenario.original_of.append(original)
    _check_inputs(scenario)
    return scenario


def _check_inputs(scenario: Scenario) -> None:
    """Guard the generator itself: each bad input fails the codec as intended, each good one decodes."""
    for message, reason in zip(scenario.messages, scenario.expected_reason, strict=True):
        if reason is RejectReason.OVERSIZED:
            assert len(message.value) > MAX_MESSAGE_BYTES
            continue
        assert len(message.value) <= MAX_MESSAGE_BYTES
        if reason in (RejectReason.UNDECODABLE, RejectReason.UNKNOWN_SCHEMA, RejectReason.INVALID_FIELD):
            with pytest.raises(InvalidEvent) as caught:
                decode_event(message.value)
            assert caught.value.reason is reason, caught.value.detail
        else:
            decode_event(message.value)


# ---------------------------------------------------------------------------------------------- writers


@contextlib.asynccontextmanager
async def running_writer(settings: Settings) -> AsyncIterator[tuple[LedgerWriter, asyncio.Event, asyncio.Task[None]]]:
    """A started writer running in a task; stopped (batch finished, clients closed) on exit."""
    writer = LedgerWriter(settings)
    stop = asyncio.Event()
    await writer.start()
    task = asyncio.create_task(writer.run(stop))
    try:
        yield writer, stop, task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 60)
        finally:
            await writer.stop()


def failed(*tasks: asyncio.Task[None]) -> None:
    """Re-raise a writer's failure at once instead of waiting for the deadline."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise AssertionError("a ledger writer failed") from task.exception()


async def dead_letter_sources(settings: Settings, expected: int) -> dict[str, tuple[str, bytes]]:
    """Read the dead-letter topic from the start until `expected` distinct sources are seen (or time out)."""
    assert settings.kafka_bootstrap_servers is not None
    consumer = AIOKafkaConsumer(
        settings.topics.dead_letter, bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[str, tuple[str, bytes]] = {}
    try:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while len(seen) < expected and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    headers = {name: value.decode() for name, value in record.headers}
                    seen[headers["source"]] = (headers["reason"], record.value)
        return seen
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------------------- tests


async def test_ten_thousand_events_with_duplicates_and_bad_input(
    settings: Settings, service_db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"max_message_bytes": MAX_MESSAGE_BYTES})
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    scenario = build_scenario(settings, random.Random(SEED))
    await ensure_event_topics(settings)

    async with running_writer(settings) as (writer, _, task):
        metadata = await send_raw(settings.kafka_bootstrap_servers, scenario.messages)
        ends = end_offsets_of(metadata)

        async def done() -> bool:
            failed(task)
            return offsets_reached(await stored_offsets(service_db, settings.writer_group_id), ends)

        async def progress() -> str:
            entries = await service_db.fetchval("SELECT count(*) FROM ledger")
            rejected = await service_db.fetchval("SELECT count(*) FROM rejected_events")
            return f"ledger {entries}/{len(scenario.valid_ids)}, rejected {rejected}"

        await wait_until(done, WAIT_S, progress)

    # The ledger: every distinct valid event once, at the offset of its first delivery, chained.
    await assert_ledger_sound(service_db, settings.database_url, scenario.valid_ids)
    first_delivery = {
        original: (meta.topic, meta.partition, meta.offset)
        for original, meta in zip(scenario.original_of, metadata, strict=True) if original is not None
    }
    stored_sources = {
        row["event_id"]: (row["source_topic"], row["source_partition"], row["source_offset"])
        for row in await service_db.fetch("SELECT event_id, source_topic, source_partition, source_offset FROM ledger")
    }
    assert stored_sources == first_delivery
    assert writer.appended == len(scenario.valid_ids)

    # The rejected store: every bad input, with its reason and its original bytes, and nothing else.
    expected_rejections = {
        (meta.topic, meta.partition, meta.offset): (reason.value, message.value)
        for meta, reason, message in zip(metadata, scenario.expected_reason, scenario.messages, strict=True)
        if reason is not None
    }
    assert len(expected_rejections) == 7 * BAD_PER_KIND
    rows = await service_db.fetch(
        "SELECT source_topic, source_partition, source_offset, reason, raw, event_id FROM rejected_events"
    )
    stored_rejections = {
        (row["source_topic"], row["source_partition"], row["source_offset"]): (row["reason"], bytes(row["raw"]))
        for row in rows
    }
    wrong = {
        key: (stored_rejections.get(key, ("absent", b""))[0], expected[0])
        for key, expected in expected_rejections.items() if stored_rejections.get(key) != expected
    }
    assert not wrong, f"{len(wrong)} inputs not stored with their reason and bytes, e.g. {list(wrong.items())[:5]}"
    assert stored_rejections.keys() == expected_rejections.keys(), "the rejected store holds unexpected inputs"
    conflicts = [row for row in rows if row["reason"] == RejectReason.EVENT_ID_CONFLICT.value]
    assert {row["event_id"] for row in conflicts} <= scenario.valid_ids

    # Offsets committed with the rows: exactly the log ends, no further.
    assert await stored_offsets(service_db, settings.writer_group_id) == ends

    # The dead-letter topic: one message per rejection (at least once), with reason and bytes.
    dead = await dead_letter_sources(settings, len(expected_rejections))
    expected_dead = {f"{t}/{p}/{o}": value for (t, p, o), value in expected_rejections.items()}
    assert dead.keys() == expected_dead.keys(), (
        f"dead letters for {len(dead)} sources, {len(expected_dead)} rejections"
    )
    assert dead == expected_dead


async def test_two_writers_in_one_group_share_the_stream_through_a_rebalance(
    settings: Settings, service_db: asyncpg.Connection
) -> None:
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    servers = settings.kafka_bootstrap_servers
    rng = random.Random(SEED + 1)
    people = subjects(300)
    events = [make_event(rng, rng.choice(people)) for _ in range(9000)]
    chunks = [events[:3000], events[3000:6000], events[6000:]]

    def messages(chunk: Sequence[Event]) -> list[Message]:
        # Each chunk carries redeliveries of 5% of its events, after the originals.
        sent = [*chunk, *rng.sample(list(chunk), len(chunk) // 20)]
        return [Message(settings.topics.name(e.topic), e.subject_id.encode(), encode_event(e)) for e in sent]

    await ensure_event_topics(settings)
    metadata = []
    count = "SELECT count(*) FROM ledger"
    async with running_writer(settings) as (writer_a, stop_a, task_a):
        metadata += await send_raw(servers, messages(chunks[0]))
        async with running_writer(settings) as (writer_b, _, task_b):
            # B joins the group while the second chunk streams in; A leaves once it is under way.
            sending = asyncio.create_task(send_raw(servers, messages(chunks[1])))

            async def under_way() -> bool:
                failed(task_a, task_b)
                return await service_db.fetchval(count) > len(chunks[0])

            async def progress() -> str:
                return f"ledger holds {await service_db.fetchval(count)} entries"

            await wait_until(under_way, WAIT_S, progress, poll_s=0.05)
            stop_a.set()
            await asyncio.wait_for(task_a, 60)
            await writer_a.stop()
            metadata += await sending
            metadata += await send_raw(servers, messages(chunks[2]))
            ends = end_offsets_of(metadata)

            async def done() -> bool:
                failed(task_b)
                return offsets_reached(await stored_offsets(service_db, settings.writer_group_id), ends)

            await wait_until(done, WAIT_S, progress)
        assert writer_b.appended > 0, "writer B never got a partition"
    assert writer_a.appended > 0
    assert writer_a.appended + writer_b.appended == len(events)
    await assert_ledger_sound(service_db, settings.database_url, {e.event_id for e in events})
    assert await stored_offsets(service_db, settings.writer_group_id) == ends


async def append_events(database_url: str, events: Sequence[Event], per_transaction: int = 5) -> None:
    """Append through the ledger store as the service role, a few events per transaction."""
    connection = await connect(database_url)
    try:
        for start in range(0, len(events), per_transaction):
            async with connection.transaction():
                await append(connection, [
                    Candidate(EntryContent.of_event(e)) for e in events[start:start + per_transaction]
                ])
    finally:
        await connection.close()


@pytest.mark.parametrize("same_content", [True, False])
async def test_an_event_appended_while_another_append_waits_for_the_lock_is_still_found(
    settings: Settings, service_db: asyncpg.Connection, same_content: bool
) -> None:
    """An append looks its event ids up before taking the lock; what another appender commits meanwhile is looked up
    again under it: a redelivery is a duplicate, another content a conflict, never a second entry."""
    assert settings.database_url is not None
    rng = random.Random(SEED + 3)
    raced, fresh = make_event(rng, "s-raced"), make_event(rng, "s-fresh")
    again = raced if same_content else dataclasses.replace(raced, producer="another-producer")
    first = await connect(settings.database_url)
    second = await connect(settings.database_url)
    try:
        holding = first.transaction()
        await holding.start()
        await append(first, [Candidate(EntryContent.of_event(raced))])
        # The second append starts while the first holds the lock with its entry not yet committed.
        waiting_one = second.transaction()
        await waiting_one.start()
        waiting = asyncio.create_task(append(second, [
            Candidate(EntryContent.of_event(again), SourceRef("consent", 0, 7), b"raw"),
            Candidate(EntryContent.of_event(fresh)),
        ]))
        await wait_until(lambda: _waits_for_advisory_lock(service_db), 10.0, _no_lock_wait, poll_s=0.02)
        await holding.commit()  # releases the lock
        outcome = await waiting
        await waiting_one.commit()
    finally:
        await first.close()
        await second.close()
    assert [e.event_id for e in outcome.appended] == [fresh.event_id]
    assert outcome.duplicates == (1 if same_content else 0)
    assert [r.reason for r in outcome.rejected] == ([] if same_content else [RejectReason.EVENT_ID_CONFLICT])
    rows = await service_db.fetch("SELECT seq, event_id, producer FROM ledger ORDER BY seq")
    assert [(r["seq"], r["event_id"], r["producer"]) for r in rows] == [
        (1, raced.event_id, raced.producer), (2, fresh.event_id, fresh.producer)
    ]
    assert (await verify_chain(settings.database_url)).first_break is None


async def _no_lock_wait() -> str:
    return "the second append never waited for the append lock"


async def _waits_for_advisory_lock(connection: asyncpg.Connection) -> bool:
    return bool(await connection.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


@pytest.mark.parametrize("table", ["ledger", "rejected_events"])
async def test_append_only_is_enforced_by_the_database(
    settings: Settings, service_db: asyncpg.Connection, admin_db: asyncpg.Connection, table: str
) -> None:
    assert settings.database_url is not None
    rng = random.Random(SEED + 2)
    await append_events(settings.database_url, [make_event(rng, f"s{i}") for i in range(10)])
    await admin_db.execute(
        "INSERT INTO rejected_events (reason, detail, source_topic, source_partition, source_offset, raw)"
        " VALUES ('undecodable', 'test', 't', 0, 0, '\\x00')"
    )
    column = "producer" if table == "ledger" else "detail"
    before = await admin_db.fetch(f"SELECT * FROM {table} ORDER BY 1")
    assert before
    changes = [
        f"UPDATE {table} SET {column} = 'changed'",
        f"DELETE FROM {table}",
        f"TRUNCATE {table}",
        f"ALTER TABLE {table} DISABLE TRIGGER USER",
    ]
    # The service role lacks the privileges; it does not own the table, so it cannot drop the triggers.
    for statement in changes:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await service_db.execute(statement)
    # Even the superuser, who has every privilege, meets the triggers.
    for statement in changes[:3]:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="append-only"):
            await admin_db.execute(statement)
    assert await admin_db.fetch(f"SELECT * FROM {table} ORDER BY 1") == before


def _cli_env(settings: Settings) -> dict[str, str]:
    assert settings.database_url is not None
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSENT_LEDGER_")}
    env["CONSENT_LEDGER_DATABASE_URL"] = settings.database_url
    return env


async def run_verify(settings: Settings) -> tuple[int, str]:
    return await run_cli("verify", env=_cli_env(settings))


async def test_verify_names_the_tampered_seq(settings: Settings, admin_db: asyncpg.Connection) -> None:
    assert settings.database_url is not None
    rng = random.Random(SEED + 3)
    await append_events(settings.database_url, [make_event(rng, f"s{i % 7}") for i in range(40)])

    code, output = await run_verify(settings)
    assert code == 0, output
    assert "chain intact: 40 entries" in output

    tampered = 23
    async with admin_db.transaction():
        # `replica` skips ordinary triggers: what an attacker with superuser rights could do.
        await admin_db.execute("SET LOCAL session_replication_role = replica")
        status = await admin_db.execute(
            """UPDATE ledger SET body = body || '{"tampered": "yes"}'::jsonb WHERE seq = $1""", tampered
        )
    assert status == "UPDATE 1"

    code, output = await run_verify(settings)
    assert code == 1, output
    assert f"chain broken at seq {tampered}:" in output
    assert f"{tampered - 1} entries before it verified" in output
    verifier = await verify_chain(settings.database_url)
    assert verifier.first_break is not None
    assert verifier.first_break.seq == tampered


async def test_a_log_shorter_than_the_stored_offsets_stops_the_writer(
    settings: Settings, service_db: asyncpg.Connection
) -> None:
    """The broker lost its log (or is another cluster): nothing may be read, skipped or appended."""
    assert settings.kafka_bootstrap_servers is not None
    rng = random.Random(SEED + 4)
    events = [make_event(rng, f"s{i}", event_type=EventType.ACCOUNT_REGISTERED) for i in range(50)]
    topics = await ensure_event_topics(settings)
    metadata = await send_raw(
        settings.kafka_bootstrap_servers,
        [Message(settings.topics.name(e.topic), e.subject_id.encode(), encode_event(e)) for e in events],
    )
    ends = end_offsets_of(metadata)
    # The ledger remembers more of one partition than the broker holds.
    lost = max(ends, key=lambda tp: ends[tp])
    offsets = {(topic, partition): ends.get((topic, partition), 0)
               for topic in topics for partition in range(settings.topic_partitions)}
    offsets[lost] += 1000
    await service_db.executemany(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)",
        [(settings.writer_group_id, topic, partition, offset) for (topic, partition), offset in offsets.items()],
    )
    before = await stored_offsets(service_db, settings.writer_group_id)
    writer = LedgerWriter(settings)
    await writer.start()
    try:
        with pytest.raises(BrokerLogLost, match=rf"{lost[0]}\[{lost[1]}\] ends at offset {ends[lost]} "):
            await asyncio.wait_for(writer.run(asyncio.Event()), WAIT_S)
    finally:
        await writer.stop()
    assert await service_db.fetchval("SELECT count(*) FROM ledger") == 0
    assert await stored_offsets(service_db, settings.writer_group_id) == before
