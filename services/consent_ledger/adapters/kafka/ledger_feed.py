"""The `ledger.entries` topic: which subjects have committed entries up to which seq, and watermark ticks (JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import orjson
from aiokafka.partitioner import murmur2

ANNOUNCEMENTS_PER_MESSAGE = 1000
"""About 60 KB of JSON. Processors batch by message count (faust's take_events), so this bounds the announcements
a full batch holds: 1,000 here times settings.processor_batch_messages (their entries are read a chunk of subjects
at a time)."""


@dataclass(frozen=True, slots=True)
class WatermarkTick:
    """Sent to every partition after a batch: every entry up to `seq` is already ahead of it."""

    seq: int
    partitions: int = 0
    """How many partitions the feed had when the tick was sent (0: not said, by an older outbox)."""


class Announcement(NamedTuple):
    """The subject has committed entries up to `seq`; processors read them from the ledger.

    A NamedTuple, not a frozen dataclass: the outbox builds one per entry it announces, at a third of the cost.
    """

    subject_id: str
    seq: int


@lru_cache(maxsize=1 << 16)
def partition_of(subject_id: str, partitions: int) -> int:
    """The feed partition of a subject: the Kafka default partitioner over the key bytes (murmur2)."""
    return int(murmur2(subject_id.encode()) & 0x7FFFFFFF) % partitions


def announcement_messages(announcements: Sequence[Announcement]) -> Iterator[bytes]:
    """`entries` messages of at most ANNOUNCEMENTS_PER_MESSAGE (subject, seq) pairs, in the order given.

    Many per message: with one message per entry, faust's per-message machinery (~140 us) cost a processor
    more than folding; and only subject and seq, because processors read entries from the ledger itself.
    """
    for start in range(0, len(announcements), ANNOUNCEMENTS_PER_MESSAGE):
        chunk = announcements[start : start + ANNOUNCEMENTS_PER_MESSAGE]
        yield orjson.dumps({"kind": "entries", "entries": [{"subject_id": a.subject_id, "seq": a.seq} for a in chunk]})


def tick_message(seq: int, partitions: int) -> bytes:
    return json.dumps({"kind": "watermark", "seq": seq, "partitions": partitions}).encode()


def merge_announcements(value: bytes | str, announced: dict[str, int]) -> WatermarkTick | None:
    """Merge an `entries` message into `announced` (each subject's highest seq), or return a `watermark` tick.

    Older outboxes' one-entry `entry` messages are merged too. No object per pair: a processor merges every
    pair it reads, and building Announcements cost it as much as the merge.
    """
    document = orjson.loads(value)
    kind = document["kind"]
    if kind == "watermark":
        return WatermarkTick(int(document["seq"]), int(document.get("partitions", 0)))
    for item in document["entries"] if kind == "entries" else (document,):
        subject_id = item.get("subject_id")
        if subject_id is not None:
            seq = int(item["seq"])
            if seq > announced.get(subject_id, 0):
                announced[subject_id] = seq
    return None


def unbroken_runs(partitions: Sequence[int], offsets: Sequence[int] | None) -> dict[int, tuple[int, int]]:
    """Per partition, the (first, last) offsets of its messages in the batch, when they follow one another."""
    if offsets is None:
        return {}
    runs: dict[int, tuple[int, int]] = {}
    broken: set[int] = set()
    for partition, offset in zip(partitions, offsets, strict=True):
        run = runs.get(partition)
        if run is None:
            runs[partition] = (offset, offset)
        elif offset == run[1] + 1:
            runs[partition] = (run[0], offset)
        else:
            broken.add(partition)
    return {p: run for p, run in runs.items() if p not in broken}
