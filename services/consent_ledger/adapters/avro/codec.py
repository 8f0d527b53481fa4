"""Avro single-object encoding of events: the bytes producers put on Kafka and the ledger writer reads."""

from __future__ import annotations

import functools
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from consent_ledger.adapters.avro.catalogue import FINGERPRINT_SIZE, SchemaCatalogue, SchemaVersion
from consent_ledger.core.events import (
    Event,
    InvalidEvent,
    RejectReason,
    event_from_json,
)

MARKER = b"\xc3\x01"
"""The two bytes that open every single-object encoded message (Avro specification)."""
HEADER_SIZE = len(MARKER) + FINGERPRINT_SIZE

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every instant in the ledger is timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


class Codec:
    """Encoder and decoder bound to one schema catalogue; stateless after construction."""

    def __init__(self, catalogue: SchemaCatalogue) -> None:
        self.catalogue = catalogue

    def encode(self, event: Event, schema: SchemaVersion | None = None) -> bytes:
        """Single-object encode `event` with `schema` (default: the latest schema of its type)."""
        version = schema if schema is not None else self.catalogue.latest(event.event_type)
        if version.event_type != event.event_type:
            raise ValueError(f"cannot write a {event.event_type} event with the schema of {version.label}")
        # fastavro silently drops keys the schema lacks; an Event built by hand must not lose data here.
        if tuple(sorted(event.body)) != tuple(sorted(version.body_fields)):
            raise InvalidEvent(
                RejectReason.INVALID_FIELD,
                f"body fields {sorted(event.body)} do not match {version.label}: {list(version.body_fields)}",
                "body",
            )
        record = {
            "event_id": str(event.event_id),
            "event_type": event.event_type.value,
            "subject_id": event.subject_id,
            "occurred_at": _micros(event.occurred_at),
            "producer": event.producer,
            "body": event.body,
        }
        out = io.BytesIO()
        out.write(MARKER)
        out.write(version.fingerprint)
        try:
            schemaless_writer(out, version.binary_schema, record)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise InvalidEvent(
                RejectReason.INVALID_FIELD, f"event {event.event_id} does not fit {version.label}: {error}"
            ) from error
        return out.getvalue()

    def decode(self, raw: bytes) -> Event:
        """Decode and validate one message; raise `InvalidEvent` with the reason to reject it otherwise."""
        if len(raw) < HEADER_SIZE:
            raise InvalidEvent(
                RejectReason.UNDECODABLE, f"{len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header"
            )
        if raw[:2] != MARKER:
            raise InvalidEvent(
                RejectReason.UNDECODABLE,
                f"not Avro single-object encoding: starts with {bytes(raw[:2]).hex()}, not c301",
            )
        wire_fingerprint = bytes(raw[2:HEADER_SIZE])
        writer = self.catalogue.by_fingerprint(wire_fingerprint)
        if writer is None:
            raise InvalidEvent(
                RejectReason.UNKNOWN_SCHEMA, f"no schema with fingerprint {wire_fingerprint.hex()}"
            )
        reader = self.catalogue.latest(writer.event_type)
        # A sliced copy reads faster in fastavro than a seek past the header (measured, ~40%).
        stream = io.BytesIO(raw[HEADER_SIZE:])
        try:
            record: Any = schemaless_reader(
                stream, writer.binary_schema, None if reader is writer else reader.binary_schema
            )
        except Exception as error:
            # Garbage makes fastavro fail in many ways (EOFError, IndexError, UnicodeDecodeError,
            # ValueError, ...); any of them means the bytes are not what the fingerprint claims.
            message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            raise InvalidEvent(
                RejectReason.UNDECODABLE, f"bytes do not decode as {writer.label}: {message[:200]}"
            ) from None
        left_over = len(raw) - HEADER_SIZE - stream.tell()
        if left_over:
            raise InvalidEvent(
                RejectReason.UNDECODABLE, f"{left_over} bytes left over after a {writer.label} record"
            )
        return self._validate(record, writer)

    @staticmethod
    def _validate(record: dict[str, Any], writer: SchemaVersion) -> Event:
        # A schema belongs to one event type; a record claiming another type is a producer bug.
        if record["event_type"] != writer.event_type.value:
            raise InvalidEvent(
                RejectReason.INVALID_FIELD,
                f"event_type {record['event_type']!r} in a message written with the schema of {writer.label}",
                "event_type",
            )
        try:
            occurred_at = _EPOCH + record["occurred_at"] * _MICROSECOND
        except OverflowError:
            raise InvalidEvent(
                RejectReason.INVALID_FIELD, "occurred_at is outside the years 1 to 9999", "occurred_at"
            ) from None
        # The JSON validation is the single source of the field rules, for both wire forms.
        return event_from_json(record, occurred_at=occurred_at)


@functools.cache
def default_codec() -> Codec:
    """The codec over the repository's schema folder, loaded on first use."""
    return Codec(SchemaCatalogue.load())


def encode_event(event: Event) -> bytes:
    """Single-object encode `event` with the latest schema of its type."""
    return default_codec().encode(event)


def decode_event(raw: bytes) -> Event:
    """Decode one single-object encoded message; `InvalidEvent` says why it must be rejected."""
    return default_codec().decode(raw)
