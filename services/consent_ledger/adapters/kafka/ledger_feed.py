"""The `ledger.entries` topic: committed ledger entries and watermark ticks, as JSON, keyed by subject."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiokafka.partitioner import murmur2

from consent_ledger.core.events import format_timestamp, parse_timestamp
from consent_ledger.core.ledger import EntryContent, LedgerEntry


@dataclass(frozen=True, slots=True)
class WatermarkTick:
    """Sent to every partition after a batch: every entry up to `seq` is already ahead of it."""

    seq: int
    partitions: int = 0
    """How many partitions the feed had when the tick was sent (0: not said, by an older outbox)."""


def partition_of(subject_id: str, partitions: int) -> int:
    """The feed partition of a subject: the Kafka default partitioner over the key bytes (murmur2)."""
    return int(murmur2(subject_id.encode()) & 0x7FFFFFFF) % partitions


def entry_document(entry: LedgerEntry) -> dict[str, Any]:
    c = entry.content
    return {
        "kind": "entry",
        "seq": entry.seq,
        "recorded_at": format_timestamp(entry.recorded_at),
        "event_id": str(c.event_id),
        "event_type": c.event_type,
        "subject_id": c.subject_id,
        "occurred_at": format_timestamp(c.occurred_at),
        "producer": c.producer,
        "body": c.body,
        "entry_hash": entry.entry_hash.hex(),
    }


def entry_message(entry: LedgerEntry) -> bytes:
    return json.dumps(entry_document(entry), separators=(",", ":"), ensure_ascii=False).encode()


def tick_message(seq: int, partitions: int) -> bytes:
    return json.dumps({"kind": "watermark", "seq": seq, "partitions": partitions}).encode()


def parse_feed_message(value: bytes | str | dict[str, Any]) -> LedgerEntry | WatermarkTick:
    document = json.loads(value) if isinstance(value, bytes | str) else value
    if document["kind"] == "watermark":
        return WatermarkTick(int(document["seq"]), int(document.get("partitions", 0)))
    content = EntryContent(
        uuid.UUID(document["event_id"]), document["event_type"], document["subject_id"],
        parse_timestamp(document["occurred_at"]), document["producer"], document["body"],
    )
    return LedgerEntry(
        int(document["seq"]), parse_timestamp(document["recorded_at"]), content,
        bytes.fromhex(document["entry_hash"]),
    )
