"""The Avro wire contract: schemas match the event model, single-object framing, every rejection reason."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import assume, example, given
from hypothesis import strategies as st

from consent_ledger.adapters.avro.catalogue import (
    HISTORY_DIR,
    NAMESPACE,
    CatalogueError,
    SchemaCatalogue,
    SchemaVersion,
    default_schema_dir,
    schema_fingerprint,
)
from consent_ledger.adapters.avro.codec import HEADER_SIZE, MARKER, Codec, decode_event, encode_event
from consent_ledger.core.events import (
    BODY_FIELDS,
    Event,
    EventType,
    InvalidEvent,
    RejectReason,
    event_from_json,
    event_to_json,
    parse_timestamp,
)
from strategies import event_json, events

CATALOGUE = SchemaCatalogue.load()
NOT_A_RECORD = {RejectReason.UNDECODABLE, RejectReason.INVALID_FIELD}


def frame(version: SchemaVersion, record: dict[str, Any]) -> bytes:
    """Single-object encode a raw record with any schema version, bypassing the codec's checks."""
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(dict(version.schema)), record)
    return MARKER + version.fingerprint + out.getvalue()


def reject_reason(raw: bytes, codec: Codec | None = None) -> RejectReason:
    with pytest.raises(InvalidEvent) as caught:
        (codec.decode if codec else decode_event)(raw)
    return caught.value.reason


def valid_record(event_type: EventType = EventType.CONSENT_CHANGED) -> dict[str, Any]:
    body = {name: allowed[0] if allowed else "c-1" for name, allowed in BODY_FIELDS[event_type].items()}
    return {
        "event_id": uuid.UUID("0b0e5f4c-1c2d-4e5f-8a9b-0c1d2e3f4a5b"),
        "event_type": event_type.value,
        "subject_id": "subject-1",
        "occurred_at": parse_timestamp("2025-09-28T00:00:00.000001Z"),
        "producer": "settings-service",
        "body": body,
    }


# --- the schemas are the event model ---------------------------------------------------------------


@pytest.mark.parametrize("event_type", list(EventType), ids=str)
def test_latest_schema_matches_the_event_model(event_type: EventType) -> None:
    schema = CATALOGUE.latest(event_type).schema
    assert schema["namespace"] == NAMESPACE
    assert schema["event_type"] == event_type.value
    envelope = {entry["name"]: entry["type"] for entry in schema["fields"]}
    assert envelope["event_id"] == {"type": "string", "logicalType": "uuid"}
    assert envelope["occurred_at"] == {"type": "long", "logicalType": "timestamp-micros"}
    assert envelope["event_type"] == envelope["subject_id"] == envelope["producer"] == "string"
    body = envelope["body"]
    assert [entry["name"] for entry in body["fields"]] == list(BODY_FIELDS[event_type])
    for entry in body["fields"]:
        allowed = BODY_FIELDS[event_type][entry["name"]]
        if allowed is None:
            assert entry["type"] == "string"
        else:
            assert entry["type"]["type"] == "enum"
            assert tuple(entry["type"]["symbols"]) == allowed


def test_schema_files_are_named_after_their_records() -> None:
    for version in CATALOGUE:
        expected = f"{version.name}.avsc" if version.path.parent.name != HISTORY_DIR else (
            f"{version.name}.v{version.version}.avsc"
        )
        assert version.path.name == expected


def test_fingerprint_is_the_avro_reference_crc64() -> None:
    # Reference vector from the Avro implementations' tests: schema "int" has the header c3 01 8f 5c ...
    assert schema_fingerprint("int") == bytes.fromhex("8f5c393f1ad57572")


def test_fingerprint_ignores_docs_and_custom_attributes() -> None:
    version = CATALOGUE.latest(EventType.SAFETY_FLAGGED)
    stripped = json.loads(json.dumps(version.schema))
    for key in ("doc", "version", "event_type"):
        stripped.pop(key)
    assert schema_fingerprint(stripped) == version.fingerprint


# --- round trips ------------------------------------------------------------------------------------


@given(event_json())
def test_json_to_avro_to_json_is_exact(obj: dict[str, Any]) -> None:
    raw = encode_event(event_from_json(obj))
    assert raw[:2] == MARKER
    assert raw[2:HEADER_SIZE] == CATALOGUE.latest(EventType(obj["event_type"])).fingerprint
    assert event_to_json(decode_event(raw)) == obj


def as_record(event: Event) -> dict[str, Any]:
    """What a stock Avro library reads from (or writes for) an event, logical types applied."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type.value,
        "subject_id": event.subject_id,
        "occurred_at": event.occurred_at,
        "producer": event.producer,
        "body": dict(event.body),
    }


@given(events())
def test_a_stock_avro_reader_sees_the_same_values(event: Event) -> None:
    # A consumer with only the .avsc file and any Avro library must read the same event.
    version = CATALOGUE.latest(event.event_type)
    body = io.BytesIO(encode_event(event)[HEADER_SIZE:])
    record = schemaless_reader(body, parse_schema(dict(version.schema)))
    assert record == as_record(event)


@given(events())
def test_bytes_of_a_stock_avro_writer_decode(event: Event) -> None:
    raw = frame(CATALOGUE.latest(event.event_type), as_record(event))
    assert raw == encode_event(event)
    assert decode_event(raw) == event


# --- rejections -------------------------------------------------------------------------------------


@given(st.binary(max_size=300))
@example(b"")
@example(b"\x00\x00\x00\x00\x01{}")  # Confluent framing: magic 0 and a registry id
@example(MARKER)
def test_garbage_is_rejected_never_raised(raw: bytes) -> None:
    reason = reject_reason(raw)
    if not raw.startswith(MARKER) or len(raw) < HEADER_SIZE:
        assert reason is RejectReason.UNDECODABLE
    else:
        assert reason in {RejectReason.UNKNOWN_SCHEMA, RejectReason.UNDECODABLE}


@given(st.sampled_from(list(EventType)), st.binary(max_size=300))
@example(EventType.ACCOUNT_DELETED, b"\xff" * 9 + b"\x7f")  # a string length near 2**63
@example(EventType.ACCOUNT_DELETED, b"\x01")  # a negative length
def test_garbage_behind_a_known_header_is_rejected(event_type: EventType, body: bytes) -> None:
    raw = MARKER + CATALOGUE.latest(event_type).fingerprint + body
    assert reject_reason(raw) in NOT_A_RECORD


@given(events())
def test_every_truncation_is_undecodable(event: Event) -> None:
    raw = encode_event(event)
    for cut in range(len(raw)):
        assert reject_reason(raw[:cut]) is RejectReason.UNDECODABLE


@given(events(), st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_undecodable(event: Event, tail: bytes) -> None:
    assert reject_reason(encode_event(event) + tail) is RejectReason.UNDECODABLE


@given(events(), st.binary(min_size=8, max_size=8))
def test_unknown_fingerprint(event: Event, fingerprint: bytes) -> None:
    assume(CATALOGUE.by_fingerprint(fingerprint) is None)
    raw = encode_event(event)
    assert reject_reason(raw[:2] + fingerprint + raw[HEADER_SIZE:]) is RejectReason.UNKNOWN_SCHEMA


def test_valid_avro_of_a_schema_outside_the_catalogue_is_unknown() -> None:
    latest = CATALOGUE.latest(EventType.CONSENT_CHANGED)
    variant = copy.deepcopy(dict(latest.schema))
    variant["fields"].append({"name": "extra", "type": "string", "default": ""})
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(variant), {**valid_record(), "extra": "x"})
    raw = MARKER + schema_fingerprint(variant) + out.getvalue()
    assert reject_reason(raw) is RejectReason.UNKNOWN_SCHEMA


@given(events(), st.binary(min_size=2, max_size=2).filter(lambda marker: marker != MARKER))
def test_wrong_marker_is_undecodable(event: Event, marker: bytes) -> None:
    assert reject_reason(marker + encode_event(event)[2:]) is RejectReason.UNDECODABLE


@pytest.mark.parametrize(
    ("event_type", "change", "field"),
    [
        (EventType.CONSENT_CHANGED, {"subject_id": ""}, "subject_id"),
        (EventType.CONSENT_CHANGED, {"subject_id": "x" * 129}, "subject_id"),
        (EventType.CONSENT_CHANGED, {"subject_id": "tab\there"}, "subject_id"),
        # Invisible characters would let two ids look alike.
        (EventType.CONSENT_CHANGED, {"subject_id": "user\u200d1"}, "subject_id"),
        (EventType.CONSENT_CHANGED, {"producer": ""}, "producer"),
        (EventType.CONSENT_CHANGED, {"event_id": "not-a-uuid"}, "event_id"),
        (EventType.CONSENT_CHANGED, {"event_type": "account.deleted"}, "event_type"),
        (EventType.CONSENT_CHANGED, {"event_type": "no.such_type"}, "event_type"),
        (EventType.SAFETY_CLEARED, {"body": {"conversation_id": "c-1", "flag_id": ""}}, "flag_id"),
        (EventType.SAFETY_CLEARED, {"body": {"conversation_id": "c" * 257, "flag_id": "f"}},
         "conversation_id"),
    ],
    ids=["empty-subject", "long-subject", "control-char", "zero-width-joiner", "empty-producer", "bad-uuid",
         "other-type", "unknown-type", "empty-body-text", "long-body-text"],
)
def test_field_rules_apply_after_decoding(event_type: EventType, change: dict[str, Any], field: str) -> None:
    version = CATALOGUE.latest(event_type)
    # Raw values through the schema without logical types: a foreign producer can write any string.
    record = {**valid_record(event_type), "event_id": "0b0e5f4c-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
              "occurred_at": 1_759_276_800_000_000, **change}
    out = io.BytesIO()
    schemaless_writer(out, version.binary_schema, record)
    with pytest.raises(InvalidEvent) as caught:
        decode_event(MARKER + version.fingerprint + out.getvalue())
    assert caught.value.reason is RejectReason.INVALID_FIELD
    assert caught.value.field == field


def test_occurred_at_beyond_datetime_range_is_invalid() -> None:
    version = CATALOGUE.latest(EventType.ACCOUNT_DELETED)
    out = io.BytesIO()
    record = {**valid_record(EventType.ACCOUNT_DELETED), "event_id": str(uuid.uuid4()), "occurred_at": 2**62}
    schemaless_writer(out, version.binary_schema, record)
    with pytest.raises(InvalidEvent) as caught:
        decode_event(MARKER + version.fingerprint + out.getvalue())
    assert (caught.value.reason, caught.value.field) == (RejectReason.INVALID_FIELD, "occurred_at")


def test_encode_refuses_a_body_that_does_not_fit_the_schema() -> None:
    # Event's constructor does not validate; a hand-built one must not lose or corrupt fields silently.
    event = Event(**{**valid_record(), "event_type": EventType.CONSENT_CHANGED})
    encode_event(event)
    for body in ({"choice": "opt_in"}, {**event.body, "extra": "x"}, {"choice": "maybe", "source": "api"}):
        with pytest.raises(InvalidEvent):
            encode_event(dataclasses.replace(event, body=body))


# --- old versions -----------------------------------------------------------------------------------


def _evolved_catalogue(tmp_path: Path) -> tuple[SchemaCatalogue, dict[str, Any]]:
    """A copy of the schema folder where ConsentChanged v1 had no `source` and v2 added it with a default."""
    folder = tmp_path / "avro"
    shutil.copytree(default_schema_dir(), folder)
    current = CATALOGUE.latest(EventType.CONSENT_CHANGED)
    old = copy.deepcopy(dict(current.schema))
    old_body = old["fields"][-1]["type"]
    old_body["fields"] = [entry for entry in old_body["fields"] if entry["name"] != "source"]
    new = copy.deepcopy(dict(current.schema))
    new["version"] = 2
    for entry in new["fields"][-1]["type"]["fields"]:
        if entry["name"] == "source":
            entry["default"] = "settings"
    (folder / HISTORY_DIR).mkdir(exist_ok=True)
    (folder / HISTORY_DIR / f"{current.name}.v1.avsc").write_text(json.dumps(old))
    (folder / current.path.name).write_text(json.dumps(new))
    return SchemaCatalogue.load(folder), old


def test_old_versions_are_read_into_the_latest_schema(tmp_path: Path) -> None:
    catalogue, old_schema = _evolved_catalogue(tmp_path)
    old = catalogue.by_fingerprint(schema_fingerprint(old_schema))
    assert old is not None
    assert (old.version, catalogue.latest(EventType.CONSENT_CHANGED).version) == (1, 2)
    record = {**valid_record(), "body": {"choice": "opt_out"}}
    event = Codec(catalogue).decode(frame(old, record))
    assert event.body == {"choice": "opt_out", "source": "settings"}
    assert event.event_id == record["event_id"]
    # The latest schema writes; the default codec (without history) cannot read the old bytes.
    assert reject_reason(frame(old, record)) is RejectReason.UNKNOWN_SCHEMA


def test_catalogue_rules(tmp_path: Path) -> None:
    catalogue, old_schema = _evolved_catalogue(tmp_path)
    folder = tmp_path / "avro"
    name = CATALOGUE.latest(EventType.CONSENT_CHANGED).name
    history = folder / HISTORY_DIR / f"{name}.v1.avsc"
    assert len(catalogue) == len(CATALOGUE) + 1

    history.rename(folder / HISTORY_DIR / f"{name}.v7.avsc")
    with pytest.raises(CatalogueError, match="belongs in a file"):
        SchemaCatalogue.load(folder)
    (folder / HISTORY_DIR / f"{name}.v7.avsc").rename(history)

    duplicate = folder / HISTORY_DIR / f"{name}.v2.avsc"
    duplicate.write_text(json.dumps({**old_schema, "version": 2}))
    with pytest.raises(CatalogueError, match="both claim"):
        SchemaCatalogue.load(folder)
    duplicate.unlink()

    (folder / f"{name}.avsc").unlink()
    with pytest.raises(CatalogueError, match="belongs at the top"):
        SchemaCatalogue.load(folder)
    history.unlink()
    with pytest.raises(CatalogueError, match=r"no schema for event types: consent\.changed"):
        SchemaCatalogue.load(folder)
    with pytest.raises(CatalogueError, match="does not exist"):
        SchemaCatalogue.load(tmp_path / "nowhere")
