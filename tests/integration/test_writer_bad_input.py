"""Bad and odd input to the ledger writer: 2 MB messages, far-past instants, odd unicode ids, new types, conflicts."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import signal
import time
import unicodedata
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from fastavro import parse_schema, schemaless_writer
from ledger_support import (
    WriterProcess,
    avro_record,
    encode_unchecked,
    ensure_event_topics,
    make_event,
    offsets_reached,
    stored_offsets,
    subjects,
    wait_until,
)

from consent_ledger.adapters.avro.catalogue import schema_fingerprint
from consent_ledger.adapters.avro.codec import MARKER, default_codec, encode_event
from consent_ledger.config import Settings
from consent_ledger.core.events import EventType, RejectReason
from history_checker import History, Outcome, check

R = RejectReason
MAX_MESSAGE_BYTES = 1_000_000  # the default
TWO_MB = 2 * 1024 * 1024
WAIT_S = 120.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Subject ids that are valid (1 to 128 printable characters) however odd: stored exactly as sent, never normalised.
ACCEPTED_SUBJECTS = {
    "nfc": "caf\u00e9",  # é precomposed
    "nfd": "cafe\u0301",  # e + combining acute: looks the same, is another subject
    "latin": "alice",
    "cyrillic": "\u0430lice",  # Cyrillic а: a lookalike, another subject
    "emoji_128": "\U0001f642" * 128,  # 128 characters, 512 UTF-8 bytes: the longest allowed
    "combining_stack": "e" + "\u0301" * 127,
    "right_to_left_letters": "\u05e9\u05dc\u05d5\u05dd-\u0645\u0631\u062d\u0628\u0627",
    "skin_tone": "\U0001f44d\U0001f3fd",
    "spaces": " padded ",
    "astral_cjk": "\U00020000\U0002a6d6",
}
# Invalid subject ids: characters a person cannot see or that end a string in C (field rule: printable only).
REFUSED_SUBJECTS = {
    "nul": "a\x00b",
    "right_to_left_override": "user\u202egnp.exe",
    "zero_width_joiner": "\U0001f469\u200d\U0001f4bb",
    "line_separator": "a\u2028b",
    "empty": "",
    "emoji_129": "\U0001f642" * 129,
}


def _consent_revoked_schema() -> tuple[bytes, Any]:
    """A schema for an event type the ledger does not know (a producer deployed ahead of the ledger)."""
    raw = copy.deepcopy(dict(default_codec().catalogue.latest(EventType.CONSENT_CHANGED).schema))
    raw["name"] = "ConsentRevoked"
    raw["event_type"] = "consent.revoked"
    raw["fields"][-1]["type"]["name"] = "ConsentRevokedBody"
    raw["fields"][-1]["type"]["fields"] = [{"name": "reason", "type": "string"}]
    return MARKER + schema_fingerprint(raw), parse_schema(json.loads(json.dumps(raw)))


def _with_lone_surrogate(history: History, subject_placeholder: str = "Q7Z") -> bytes:
    """A consent event whose subject_id is the UTF-8-style encoding of a lone surrogate (ED A0 80): not UTF-8."""
    event = make_event(history.rng, subject_placeholder, event_type=EventType.CONSENT_CHANGED)
    raw = encode_event(event)
    assert raw.count(subject_placeholder.encode()) == 1
    return raw.replace(subject_placeholder.encode(), b"\xed\xa0\x80")


async def test_bad_and_odd_input_is_rejected_with_its_reason_and_the_stream_flows_on(
    settings: Settings, service_db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"max_message_bytes": MAX_MESSAGE_BYTES})
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    started = time.monotonic()
    history = History(settings.topics.name, label="bad input")
    rng = history.rng
    people = subjects(200)
    await ensure_event_topics(settings)
    consent = EventType.CONSENT_CHANGED

    def valid(count: int) -> list[Any]:
        return [history.add_event(make_event(rng, rng.choice(people))) for _ in range(count)]

    # Phase 1: valid events with every kind of bad input in between.
    valid(500)
    # Oversized: 2 MB (beyond the consumer's 1 MiB fetch size too), one byte over the limit, and at the limit.
    history.add_bytes("accounts", "big", rng.randbytes(TWO_MB), R.OVERSIZED)
    padded = make_event(rng, "big")  # a valid event with 2 MB of trailing bytes: the size rule comes first
    history.add_event(padded, value=encode_event(padded) + bytes(TWO_MB), expect=R.OVERSIZED)
    history.add_bytes("conversations", "big", b"\x00" * (MAX_MESSAGE_BYTES + 1), R.OVERSIZED)
    history.add_bytes("conversations", "big", b"\x00" * MAX_MESSAGE_BYTES, R.UNDECODABLE)  # at the limit: decoded
    valid(200)
    # Far past: valid (the contract bounds only the future), stored as sent; except the very first instant, which
    # the PostgreSQL driver would store as -infinity (also the zero value of Go's time.Time: a producer bug).
    past = {
        moment: history.add_event(make_event(rng, rng.choice(people), occurred_at=moment))
        for moment in (
            datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
            datetime(1900, 1, 1, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        )
    }
    history.add_event(
        make_event(rng, rng.choice(people), occurred_at=datetime(1, 1, 1, tzinfo=UTC)), expect=R.INVALID_FIELD
    )
    history.add_event(
        make_event(rng, rng.choice(people), occurred_at=datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        expect=R.OCCURRED_AT_IN_FUTURE,
    )
    for micros in (-(2**63), -62_135_596_800_000_001, 253_402_300_800_000_000, 2**63 - 1):  # outside years 1-9999
        event = make_event(rng, rng.choice(people))
        raw = encode_unchecked(avro_record(event, occurred_at=micros), event.event_type)
        history.add_bytes(event.topic, event.subject_id, raw, R.INVALID_FIELD)
    # Odd unicode in subject ids.
    accepted = {
        name: history.add_event(make_event(rng, subject, event_type=consent))
        for name, subject in ACCEPTED_SUBJECTS.items()
    }
    for subject in REFUSED_SUBJECTS.values():
        event = make_event(rng, "placeholder", event_type=consent)
        raw = encode_unchecked(avro_record(event, subject_id=subject), consent)
        history.add_bytes(event.topic, subject.encode(), raw, R.INVALID_FIELD)
    history.add_bytes("consent.changes", b"\xed\xa0\x80", _with_lone_surrogate(history), R.UNDECODABLE)
    # Unknown event types: a known schema claiming another type, and a schema the ledger has never seen.
    event = make_event(rng, rng.choice(people), event_type=consent)
    raw = encode_unchecked(avro_record(event, event_type="consent.revoked"), consent)
    history.add_bytes(event.topic, event.subject_id, raw, R.INVALID_FIELD)
    header, schema = _consent_revoked_schema()
    out = io.BytesIO()
    out.write(header)
    schemaless_writer(out, schema, avro_record(event, event_type="consent.revoked", body={"reason": "changed mind"}))
    history.add_bytes("consent.changes", event.subject_id, out.getvalue(), R.UNKNOWN_SCHEMA)
    originals = valid(300)
    await history.publish(settings.kafka_bootstrap_servers, max_request_size=2 * TWO_MB)
    refused = [send.error for send in history.sends if send.outcome is not Outcome.ACKNOWLEDGED]
    assert not refused, refused[:3]

    writer = WriterProcess(settings, tmp_path / "writer.log", WAIT_S)

    async def caught_up() -> bool:
        assert writer.running(), f"the writer exited: {writer.tail()}"
        return offsets_reached(await stored_offsets(service_db, settings.writer_group_id), history.acknowledged_ends())

    async def describe() -> str:
        return f"ledger {await service_db.fetchval('SELECT count(*) FROM ledger')}; {writer.tail()}"

    try:
        writer.start()
        await wait_until(caught_up, WAIT_S, describe)
        # Phase 2, once the originals are in: id conflicts, a plain redelivery, and then more valid events.
        flip = next(s.event for s in originals if s.event and s.event.event_type is consent)
        assert flip is not None
        choice = "opt_in" if flip.body["choice"] == "opt_out" else "opt_out"
        other = originals[0].event
        assert other is not None
        history.add_event(dataclasses.replace(flip, body={**flip.body, "choice": choice}))  # same partition
        history.add_event(dataclasses.replace(other, subject_id=f"{other.subject_id}-elsewhere"))  # other key
        registered = make_event(rng, rng.choice(people), event_type=EventType.ACCOUNT_REGISTERED)
        history.add_event(dataclasses.replace(registered, event_id=flip.event_id))  # other type, other topic
        history.add_event(dataclasses.replace(other, occurred_at=other.occurred_at.replace(year=2024)))
        history.add_event(flip)  # a redelivery: a duplicate, neither stored again nor rejected
        valid(500)
        await history.publish(settings.kafka_bootstrap_servers)
        await wait_until(caught_up, WAIT_S, describe)
        writer.signal(signal.SIGTERM)
        assert await writer.wait(60) == 0, writer.tail()
    finally:
        writer.kill()
    assert writer.starts == 1

    report = await check(history, settings.database_url, group_id=settings.writer_group_id, system_entries=1)
    reasons = Counter(row["reason"] for row in await service_db.fetch("SELECT reason FROM rejected_events"))
    print(f"bad input: {time.monotonic() - started:.0f}s; rejected by reason {dict(sorted(reasons.items()))}")
    print(report.summary())
    report.assert_clean()
    assert reasons[R.EVENT_ID_CONFLICT.value] == 4
    assert reasons[R.OVERSIZED.value] == 3

    # Stored exactly as sent: no normalisation, the lookalikes are distinct subjects, far-past instants intact.
    async def stored_subject(send: Any) -> str:
        return str(await service_db.fetchval("SELECT subject_id FROM ledger WHERE event_id = $1", send.event.event_id))

    for name, send in accepted.items():
        assert (await stored_subject(send)).encode() == ACCEPTED_SUBJECTS[name].encode(), name
    assert unicodedata.normalize("NFC", ACCEPTED_SUBJECTS["nfd"]) == ACCEPTED_SUBJECTS["nfc"]
    assert await stored_subject(accepted["nfc"]) != await stored_subject(accepted["nfd"])
    for moment, send in past.items():
        stored = await service_db.fetchval("SELECT occurred_at FROM ledger WHERE event_id = $1", send.event.event_id)
        assert stored == moment
    # The dead-letter topic takes the rejected bytes too, 2 MB included: one message per rejection.
    rejected = {
        f"{row['source_topic']}/{row['source_partition']}/{row['source_offset']}": bytes(row["raw"])
        for row in await service_db.fetch(
            "SELECT source_topic, source_partition, source_offset, raw FROM rejected_events"
        )
    }
    assert await dead_letters(settings, len(rejected)) == rejected


async def dead_letters(settings: Settings, expected: int) -> dict[str, bytes]:
    """The dead-letter topic from the start, by source coordinates, until `expected` sources are seen."""
    consumer = AIOKafkaConsumer(
        settings.topics.dead_letter,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[str, bytes] = {}
    try:
        deadline = time.monotonic() + WAIT_S
        while len(seen) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch:
                    seen[dict(record.headers)["source"].decode()] = record.value
        return seen
    finally:
        await consumer.stop()
