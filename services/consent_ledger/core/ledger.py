"""Ledger entries, their canonical bytes and the SHA-256 hash chain that makes tampering visible."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from consent_ledger.core.events import Event, EventType, format_timestamp

GENESIS_HASH = bytes(32)
"""The `previous entry_hash` of seq 1: thirty-two zero bytes."""

DECISION_RECORDED = "decision.recorded"
"""Entry type written by the audit API for a decision receipt; it has no subject."""
POLICY_PUBLISHED = "policy.published"
"""Entry type recording the policy timeline in force from its `recorded_at` on."""

SUBJECT_EVENT_TYPES = frozenset(t.value for t in EventType)


@dataclass(frozen=True, slots=True)
class EntryContent:
    """What an entry says, before the ledger gives it a place: an event, a receipt or a policy."""

    event_id: uuid.UUID
    event_type: str
    subject_id: str | None
    occurred_at: datetime
    producer: str
    body: Mapping[str, Any]

    @classmethod
    def of_event(cls, event: Event) -> EntryContent:
        return cls(
            event.event_id,
            event.event_type.value,
            event.subject_id,
            event.occurred_at,
            event.producer,
            dict(event.body),
        )

    def same_as(self, other: EntryContent) -> bool:
        """True when a redelivery carries the same event (the idempotent case), not a conflicting one."""
        return canonical_json(self.as_json()) == canonical_json(other.as_json())

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "event_type": self.event_type,
            "subject_id": self.subject_id,
            "occurred_at": format_timestamp(self.occurred_at),
            "producer": self.producer,
            "body": self.body,
        }


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One row of the ledger: the content, its gapless `seq`, its transaction time and its hash."""

    seq: int
    recorded_at: datetime
    content: EntryContent
    entry_hash: bytes

    @property
    def event_id(self) -> uuid.UUID:
        return self.content.event_id

    @property
    def event_type(self) -> str:
        return self.content.event_type

    @property
    def subject_id(self) -> str | None:
        return self.content.subject_id

    @property
    def occurred_at(self) -> datetime:
        return self.content.occurred_at

    @property
    def body(self) -> Mapping[str, Any]:
        return self.content.body


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no insignificant whitespace, UTF-8, non-ASCII kept as is.

    The bytes of `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` in UTF-8 (the
    README's recipe), written by orjson: several times faster, and byte-identical for every document of
    strings, integers, booleans, null, lists and objects (a property test holds it to that). Ledger documents
    hold nothing else; whatever orjson refuses (ints over 64 bits, non-string keys) goes to json.dumps.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class CanonicalPieces(NamedTuple):
    """An entry's canonical bytes around its place in the ledger, which only the append under the lock decides.

    The document's keys sort as body, event_id, event_type, occurred_at, producer, then recorded_at and seq, then
    subject_id; so the bytes are `head`, the place, and `tail`, and the pieces can be written before the lock.
    """

    head: bytes
    """`{"body":...,"producer":"..."`: the keys before recorded_at, without the closing brace."""
    tail: bytes
    """`,"subject_id":...}`."""


def canonical_pieces(content: EntryContent) -> CanonicalPieces:
    """The pieces of `content`'s canonical bytes; its place (recorded_at and seq) goes between them."""
    document = content.as_json()
    subject_id = document.pop("subject_id")
    return CanonicalPieces(canonical_json(document)[:-1], b',"subject_id":' + canonical_json(subject_id) + b"}")


def canonical_bytes(seq: int, recorded_at: datetime, content: EntryContent) -> bytes:
    """The bytes an entry's hash covers; README section "Verifying the chain" shows how to recompute them."""
    return _canonical(seq, _place_prefix(format_timestamp(recorded_at)), canonical_pieces(content))


def _place_prefix(recorded_at_text: str) -> bytes:
    # `,"recorded_at":"...","seq":`, the seq's digits follow: one transaction's entries share the prefix.
    return b',"recorded_at":' + canonical_json(recorded_at_text) + b',"seq":'


def _canonical(seq: int, place_prefix: bytes, pieces: CanonicalPieces) -> bytes:
    # The same bytes as canonical_json of the whole document (test_hash_chain holds it to the README's recipe).
    return b"".join((pieces.head, place_prefix, str(seq).encode(), pieces.tail))


def chain_hash(previous_hash: bytes, seq: int, recorded_at: datetime, content: EntryContent) -> bytes:
    """`entry_hash = SHA-256(previous entry_hash || canonical bytes of the entry)`."""
    return _link(previous_hash, seq, _place_prefix(format_timestamp(recorded_at)), canonical_pieces(content))


def _link(previous_hash: bytes, seq: int, place_prefix: bytes, pieces: CanonicalPieces) -> bytes:
    return hashlib.sha256(previous_hash + _canonical(seq, place_prefix, pieces)).digest()


def append_entries(
    previous_hash: bytes, previous_seq: int, recorded_at: datetime, contents: Iterable[EntryContent],
    pieces: Iterable[CanonicalPieces] | None = None,
) -> list[LedgerEntry]:
    """Give each content the next seq and chain it after `previous_hash`, all at one transaction time.

    `pieces`, one for each content when given, are the contents' canonical pieces written beforehand.
    """
    contents = list(contents)
    place_prefix = _place_prefix(format_timestamp(recorded_at))  # one transaction, one timestamp: format it once
    entries: list[LedgerEntry] = []
    all_pieces = (canonical_pieces(c) for c in contents) if pieces is None else pieces
    for offset, (content, its_pieces) in enumerate(zip(contents, all_pieces, strict=True), start=1):
        seq = previous_seq + offset
        previous_hash = _link(previous_hash, seq, place_prefix, its_pieces)
        entries.append(LedgerEntry(seq, recorded_at, content, previous_hash))
    return entries


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first entry whose stored hash or position disagrees with the chain."""

    seq: int
    expected_hash: bytes
    stored_hash: bytes
    detail: str


class ChainLink(NamedTuple):
    """The entry stored just before another, as that one is checked against it."""

    seq: int
    recorded_at: datetime | None
    entry_hash: bytes


CHAIN_START = ChainLink(0, None, GENESIS_HASH)
"""What seq 1 follows."""


class _PlacePrefixes:
    """The place prefix of the last recorded_at asked for: one append transaction's entries share it, so it is
    formatted once for all of them."""

    __slots__ = ("_prefix", "_recorded_at")

    def __init__(self) -> None:
        self._recorded_at: datetime | None = None
        self._prefix = b""

    def of(self, recorded_at: datetime) -> bytes:
        if recorded_at != self._recorded_at:
            self._recorded_at = recorded_at
            self._prefix = _place_prefix(format_timestamp(recorded_at))
        return self._prefix


def link_break(previous: ChainLink, entry: LedgerEntry, place_prefix: bytes) -> ChainBreak | None:
    """Why `entry` cannot follow `previous`, the entry stored before it, or None: a gap, a step back in time, or a
    hash that does not cover the two (`place_prefix`: that of the entry's recorded_at).

    The check reads only the two stored entries, so checking every entry against its predecessor checks the whole
    chain in any order, and the break with the lowest seq is the one a walk from seq 1 stops at.
    """
    expected = _link(previous.entry_hash, entry.seq, place_prefix, canonical_pieces(entry.content))
    if entry.seq != previous.seq + 1:
        detail = f"gap: seq {entry.seq} follows seq {previous.seq}"
    elif previous.recorded_at is not None and entry.recorded_at < previous.recorded_at:
        detail = f"recorded_at of seq {entry.seq} goes back in time"
    elif expected != entry.entry_hash:
        detail = f"entry_hash of seq {entry.seq} does not match its content and predecessor"
    else:
        return None
    return ChainBreak(entry.seq, expected, entry.entry_hash, detail)


class ChainVerifier:
    """Folds entries in seq order and remembers the first break; feed it batches of any size."""

    def __init__(self, previous_hash: bytes = GENESIS_HASH, previous_seq: int = 0) -> None:
        self.previous = ChainLink(previous_seq, None, previous_hash)
        self.checked = 0
        self.first_break: ChainBreak | None = None
        self._prefixes = _PlacePrefixes()

    def feed(self, entries: Iterable[LedgerEntry]) -> ChainBreak | None:
        for entry in entries:
            if self.first_break is not None:
                return self.first_break
            self.first_break = link_break(self.previous, entry, self._prefixes.of(entry.recorded_at))
            if self.first_break is not None:
                return self.first_break
            self.previous = ChainLink(entry.seq, entry.recorded_at, entry.entry_hash)
            self.checked += 1
        return self.first_break


class LinkChecker:
    """Checks entries in any order, each against the entry stored before it; keeps the break with the lowest seq.

    What a `ChainVerifier` walking the same entries from seq 1 finds, in parts that can run side by side: the
    replay's shards each check the entries they rebuild.
    """

    def __init__(self) -> None:
        self.checked = 0
        self.first_break: ChainBreak | None = None
        self._prefixes = _PlacePrefixes()

    def check(self, previous: ChainLink, entry: LedgerEntry) -> None:
        found = link_break(previous, entry, self._prefixes.of(entry.recorded_at))
        self.checked += 1
        if found is not None and (self.first_break is None or found.seq < self.first_break.seq):
            self.first_break = found
