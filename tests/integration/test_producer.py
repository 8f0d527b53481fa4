"""The producer library against a real broker: topics, keys, order, and bytes from another Kafka client."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from consent_ledger.adapters.avro.catalogue import default_schema_dir
from consent_ledger.adapters.avro.codec import decode_event, encode_event
from consent_ledger.adapters.embedded import EmbeddedBroker, free_port
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.kafka.producer import EventProducer, read_jsonl
from consent_ledger.config import Settings
from consent_ledger.core.events import (
    BODY_FIELDS,
    EVENT_TOPICS,
    TOPIC_OF,
    Event,
    EventType,
    InvalidEvent,
    RejectReason,
    event_from_json,
    event_to_json,
    format_timestamp,
)

SUBJECTS = ["subject-1", "Ünïcødé-主体-🙂", "x" * 128, "with space", "quote\"s'and\\slash"]
START = datetime(2025, 9, 27, 23, 59, 59, 999_999, tzinfo=UTC)


def sample_events(count: int) -> list[Event]:
    """Events of every type, spread over a few subjects, each subject's in time order."""
    kinds = list(EventType)
    events = []
    for index in range(count):
        event_type = kinds[index % len(kinds)]
        body = {
            name: allowed[index % len(allowed)] if allowed else f"{name}-{index % 7}"
            for name, allowed in BODY_FIELDS[event_type].items()
        }
        events.append(event_from_json({
            "event_id": str(uuid.uuid4()),
            "event_type": event_type.value,
            "subject_id": SUBJECTS[index % len(SUBJECTS)],
            "occurred_at": format_timestamp(START + timedelta(microseconds=index * 1_000_001)),
            "producer": "test-producer",
            "body": body,
        }))
    return events


async def consume(
    servers: str, topics: Sequence[str], count: int, timeout_s: float = 30.0
) -> list[ConsumerRecord]:
    """Read `count` records from the start of `topics` (no consumer group), or fail after the timeout."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(records) < count and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        assert len(records) == count, f"read {len(records)} of {count} records within {timeout_s}s"
        return records
    finally:
        await consumer.stop()


async def event_topics(settings: Settings) -> list[str]:
    assert settings.kafka_bootstrap_servers is not None
    names = [settings.topics.name(topic) for topic in EVENT_TOPICS]
    await ensure_topics(settings.kafka_bootstrap_servers, names, settings.topic_partitions, 1)
    return names


async def test_ensure_topics_creates_only_missing_ones(broker: EmbeddedBroker, settings: Settings) -> None:
    names = [settings.topics.name(topic) for topic in EVENT_TOPICS]
    created = await ensure_topics(broker.bootstrap_servers, names[:2], partitions=3, replication=1)
    assert sorted(created) == sorted(names[:2])
    assert sorted(await ensure_topics(broker.bootstrap_servers, names, 3, 1)) == sorted(names[2:])
    assert await ensure_topics(broker.bootstrap_servers, names, 3, 1) == []


async def test_published_events_come_back_keyed_and_in_order(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    topics = await event_topics(settings)
    events = sample_events(500)
    settled: list[int] = []
    async with EventProducer(broker.bootstrap_servers, settings.topic_prefix, max_in_flight=64) as producer:
        report = await producer.publish(events, progress=settled.append)
    assert (report.sent, report.failed) == (len(events), [])
    assert settled == list(range(1, len(events) + 1))

    records = await consume(broker.bootstrap_servers, topics, len(events))
    by_id = {event.event_id: event for event in events}
    partitions: dict[tuple[str, bytes], set[int]] = defaultdict(set)
    received: dict[tuple[str, bytes], list[tuple[int, uuid.UUID]]] = defaultdict(list)
    for record in records:
        event = decode_event(record.value)
        assert event == by_id[event.event_id]
        assert record.topic == settings.topics.name(TOPIC_OF[event.event_type])
        assert record.key == event.subject_id.encode()
        partitions[(record.topic, record.key)].add(record.partition)
        received[(record.topic, record.key)].append((record.offset, event.event_id))
    assert {event.event_id for event in events} == {decode_event(record.value).event_id for record in records}
    # One subject's events of one topic share a partition and keep the order they were published in.
    assert all(len(found) == 1 for found in partitions.values())
    for (topic, key), found in received.items():
        published = [event.event_id for event in events
                     if settings.topics.name(event.topic) == topic and event.subject_id.encode() == key]
        assert [event_id for _, event_id in sorted(found)] == published


async def test_failures_are_reported_per_event(broker: EmbeddedBroker, settings: Settings) -> None:
    await event_topics(settings)
    events = sample_events(6)
    too_big, unencodable = events[1].event_id, events[4].event_id

    def encode(event: Event) -> bytes:
        if event.event_id == too_big:
            return b"\0" * 2_000_000  # over the client's max_request_size
        if event.event_id == unencodable:
            raise InvalidEvent(RejectReason.INVALID_FIELD, "refused by the test", "body")
        return encode_event(event)

    async with EventProducer(broker.bootstrap_servers, settings.topic_prefix, encode=encode) as producer:
        report = await producer.publish(events)
    assert report.sent == 4
    assert {event_id for event_id, _ in report.failed} == {too_big, unencodable}
    errors = dict(report.failed)
    assert "MessageSizeTooLarge" in errors[too_big]
    assert "refused by the test" in errors[unencodable]


async def test_unreachable_broker_fails_on_enter() -> None:
    with pytest.raises(KafkaConnectionError):
        async with EventProducer(f"127.0.0.1:{free_port()}", request_timeout_ms=2000):
            pass


def foreign_single_object(schema_file: Path, event: Event) -> bytes:
    """Frame an event as a producer outside this code base would: stock fastavro and the .avsc file."""
    schema = json.loads(schema_file.read_text())
    header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    out = io.BytesIO()
    record: dict[str, Any] = {
        "event_id": event.event_id, "event_type": event.event_type.value, "subject_id": event.subject_id,
        "occurred_at": event.occurred_at, "producer": event.producer, "body": dict(event.body),
    }
    schemaless_writer(out, parse_schema(schema), record)
    return header + out.getvalue()


def send_with_kafka_python(servers: str, messages: list[tuple[str, bytes, bytes]]) -> dict[bytes, int]:
    """Send `(topic, key, value)` with kafka-python; return the partition each key went to."""
    from kafka import KafkaProducer  # imported here: its import warns on Python 3.11 (see the mark below)

    producer = KafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5)
    try:
        futures = [(key, producer.send(topic, key=key, value=value)) for topic, key, value in messages]
        producer.flush(timeout=30)
        return {key: future.get(timeout=30).partition for key, future in futures}
    finally:
        producer.close(timeout=10)


# kafka-python 3.0 loads its protocol schemas with importlib.resources' deprecated legacy API.
@pytest.mark.filterwarnings(r"ignore:\w+ is deprecated\. Use files\(\) instead:DeprecationWarning")
async def test_bytes_from_kafka_python_decode(broker: EmbeddedBroker, settings: Settings) -> None:
    await event_topics(settings)
    events = sample_events(40)
    schema_files = {
        json.loads(path.read_text())["event_type"]: path for path in default_schema_dir().glob("*.avsc")
    }
    messages = [
        (settings.topics.name(event.topic), event.subject_id.encode(),
         foreign_single_object(schema_files[event.event_type.value], event))
        for event in events
    ]
    assert all(value == encode_event(event) for event, (_, _, value) in zip(events, messages, strict=True))
    partitions = await asyncio.to_thread(send_with_kafka_python, broker.bootstrap_servers, messages)
    topics = sorted({topic for topic, _, _ in messages})

    records = await consume(broker.bootstrap_servers, topics, len(events))
    assert sorted((decode_event(record.value) for record in records), key=lambda e: e.occurred_at) == events
    # Both clients hash keys alike (murmur2), so a subject's events meet in one partition whoever sends.
    for record in records:
        assert partitions[record.key] == record.partition
    async with EventProducer(broker.bootstrap_servers, settings.topic_prefix) as producer:
        assert (await producer.publish(events)).sent == len(events)
    again = await consume(broker.bootstrap_servers, topics, 2 * len(events))
    for record in again:
        assert partitions[record.key] == record.partition


def test_read_jsonl_numbers_lines_and_reports_bad_ones() -> None:
    good = sample_events(2)
    lines = [
        json.dumps(event_to_json(good[0])) + "\n",
        "\n",
        "   \n",
        "{not json\n",
        json.dumps({**event_to_json(good[1]), "subject_id": ""}),
        "[1, 2]",
        json.dumps(event_to_json(good[1])),
    ]
    results = list(read_jsonl(lines))
    assert [number for number, _ in results] == [1, 4, 5, 6, 7]
    assert results[0][1] == good[0]
    assert results[4][1] == good[1]
    reasons = [(item.reason, item.field) for _, item in results[1:4] if isinstance(item, InvalidEvent)]
    assert reasons == [
        (RejectReason.UNDECODABLE, None),
        (RejectReason.INVALID_FIELD, "subject_id"),
        (RejectReason.INVALID_FIELD, None),
    ]
