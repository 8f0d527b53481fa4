"""A seeded send log and a checker of the ledger and the rejected store against it (exactly once, order, chain)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from consent_ledger.adapters.avro.codec import encode_event
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import entry_from_row, stream_entries
from consent_ledger.core.events import Event, RejectReason
from consent_ledger.core.ledger import ChainVerifier, EntryContent

SEED_VARIABLE = "CONSENT_LEDGER_TEST_SEED"

Where = tuple[str, int, int]
"""Kafka coordinates of a message: topic, partition, offset."""


def choose_seed() -> int:
    """The seed from CONSENT_LEDGER_TEST_SEED when replaying a failure, else a fresh random one."""
    given = os.environ.get(SEED_VARIABLE)
    return int(given) if given else random.SystemRandom().randrange(2**32)


class Outcome(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    """The broker acknowledged it (acks=all): it is in the log."""
    FAILED = "failed"
    """Refused definitively (before it left the producer, or by the broker): it is not in the log."""
    INDETERMINATE = "indeterminate"
    """Timed out or lost its connection mid-send: it may or may not be in the log."""


@dataclass
class Send:
    """One message as the generator meant it, and what became of it."""

    number: int
    topic: str
    key: bytes
    value: bytes
    event: Event | None
    """The event the bytes carry, if they decode to one."""
    expected_reason: RejectReason | None
    """The reason it must be rejected for; None if it must be appended (or be a duplicate, or an id conflict)."""
    outcome: Outcome | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None

    @property
    def where(self) -> Where | None:
        if self.outcome is not Outcome.ACKNOWLEDGED:
            return None
        assert self.partition is not None
        assert self.offset is not None
        return (self.topic, self.partition, self.offset)


@dataclass(frozen=True)
class Anomaly:
    kind: str
    detail: str


@dataclass
class Report:
    seed: int
    sends: int = 0
    acknowledged: int = 0
    indeterminate: int = 0
    failed: int = 0
    events: int = 0
    """Distinct valid event ids sent."""
    ledger_entries: int = 0
    """Entries with a subject (events); entries without one (the policy timeline) are counted apart."""
    system_entries: int = 0
    rejected: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> None:
        self.anomalies.append(Anomaly(kind, detail))

    def kinds(self) -> set[str]:
        return {anomaly.kind for anomaly in self.anomalies}

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.sends} sends ({self.acknowledged} acknowledged, {self.indeterminate} "
            f"indeterminate, {self.failed} failed), {self.events} distinct events, ledger {self.ledger_entries} "
            f"(+{self.system_entries} without subject), rejected {self.rejected}, anomalies {len(self.anomalies)}"
        )

    def assert_clean(self) -> None:
        if self.anomalies:
            shown = "\n".join(f"  {a.kind}: {a.detail}" for a in self.anomalies[:20])
            raise AssertionError(
                f"{len(self.anomalies)} anomalies; {self.summary()}; replay with {SEED_VARIABLE}={self.seed}\n{shown}"
            )


def _outcome_of(error: BaseException) -> Outcome:
    """A broker's non-retriable refusal says the message was not appended; a timeout or a lost connection may
    have come after it was."""
    if isinstance(error, KafkaError) and not error.retriable and not isinstance(error, KafkaTimeoutError):
        return Outcome.FAILED
    return Outcome.INDETERMINATE


class History:
    """Messages in send order with their outcomes; `rng` (seeded, printed) drives whatever the scenario draws."""

    def __init__(
        self, topic_name: Callable[[str], str] = str, *, seed: int | None = None, label: str = "history"
    ) -> None:
        self.seed = choose_seed() if seed is None else seed
        self.rng = random.Random(self.seed)
        self.topic_name = topic_name
        self.sends: list[Send] = []
        print(f"\n{label}: seed {self.seed} (replay with {SEED_VARIABLE}={self.seed})")

    def add_event(
        self, event: Event, *, topic: str | None = None, expect: RejectReason | None = None, value: bytes | None = None
    ) -> Send:
        """Queue `event` on its topic (or `topic`, a base name), keyed by its subject, Avro-encoded."""
        raw = value if value is not None else encode_event(event)
        return self._add(topic or event.topic, event.subject_id.encode(), raw, event, expect)

    def add_bytes(self, topic: str, key: str | bytes, value: bytes, expect: RejectReason) -> Send:
        """Queue bad input that must end in the rejected store with `expect`."""
        return self._add(topic, key.encode() if isinstance(key, str) else key, value, None, expect)

    def _add(self, topic: str, key: bytes, value: bytes, event: Event | None, expect: RejectReason | None) -> Send:
        send = Send(len(self.sends), self.topic_name(topic), key, value, event, expect)
        self.sends.append(send)
        return send

    @property
    def pending(self) -> list[Send]:
        return [send for send in self.sends if send.outcome is None]

    async def publish(
        self, servers: str, *, max_request_size: int = 1_048_576, request_timeout_ms: int = 40_000
    ) -> list[Send]:
        """Send every queued message in order (acks=all) and log each outcome; never raises for a failed send."""
        pending = self.pending
        producer = AIOKafkaProducer(
            bootstrap_servers=servers,
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            max_batch_size=262_144,
            max_request_size=max_request_size,
            request_timeout_ms=request_timeout_ms,
        )
        try:
            await producer.start()
        except Exception as error:  # nothing left this process
            for send in pending:
                send.outcome, send.error = Outcome.FAILED, f"producer did not start: {error!r}"
            with contextlib.suppress(Exception):
                await producer.stop()
            return pending
        try:
            in_flight: list[tuple[Send, asyncio.Future[Any]]] = []
            for send in pending:
                try:
                    in_flight.append((send, await producer.send(send.topic, send.value, key=send.key)))
                except Exception as error:  # refused before it was queued: it never reached the broker
                    send.outcome, send.error = Outcome.FAILED, repr(error)
            results = await asyncio.gather(*(future for _, future in in_flight), return_exceptions=True)
            for (send, _), result in zip(in_flight, results, strict=True):
                if isinstance(result, BaseException):
                    send.outcome, send.error = _outcome_of(result), repr(result)
                else:
                    send.outcome, send.partition, send.offset = Outcome.ACKNOWLEDGED, result.partition, result.offset
        finally:
            await producer.stop()
        return pending

    def valid_event_ids(self) -> set[uuid.UUID]:
        """The distinct event ids sent as valid events: what a complete ledger holds."""
        return {s.event.event_id for s in self.sends if s.event is not None and s.expected_reason is None}

    def acknowledged_ends(self) -> dict[tuple[str, int], int]:
        """The next offset after the last acknowledged message of each partition written to."""
        ends: dict[tuple[str, int], int] = {}
        for send in self.sends:
            if send.where is not None:
                topic, partition, offset = send.where
                ends[(topic, partition)] = max(ends.get((topic, partition), 0), offset + 1)
        return ends


# ------------------------------------------------------------------------------------------------ checks


async def fold_chain(connection: asyncpg.Connection) -> ChainVerifier:
    """Fold the whole ledger through a `ChainVerifier` (the same fold `consent-ledger verify` uses)."""
    verifier = ChainVerifier()
    async for entries in stream_entries(connection, batch=5000):
        verifier.feed(entries)
    return verifier


_ROWS = (
    "SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash,"
    " source_topic, source_partition, source_offset FROM ledger ORDER BY seq"
)
_REJECTED = "SELECT reason, event_id, source_topic, source_partition, source_offset, raw FROM rejected_events"


async def check(
    history: History,
    database: str | asyncpg.Connection,
    *,
    group_id: str | None = None,
    system_entries: int | None = None,
) -> Report:
    """Compare the ledger and the rejected store with `history`; every difference is an anomaly in the report.

    `database` is a URL or a connection opened with `consent_ledger.adapters.postgres.connection.connect` (its
    JSON codecs are needed to recompute hashes). With `group_id`, the writer's stored offsets must have reached
    every acknowledged message. With `system_entries`, that many entries without a subject must be there.
    """
    if isinstance(database, str):
        connection = await connect(database)
        try:
            return await check(history, connection, group_id=group_id, system_entries=system_entries)
        finally:
            await connection.close()
    connection = database
    report = Report(history.seed, sends=len(history.sends))
    for send in history.sends:
        if send.outcome is Outcome.ACKNOWLEDGED:
            report.acknowledged += 1
        elif send.outcome is Outcome.INDETERMINATE:
            report.indeterminate += 1
        elif send.outcome is Outcome.FAILED:
            report.failed += 1
    rows = await connection.fetch(_ROWS)
    events = [row for row in rows if row["subject_id"] is not None]
    report.ledger_entries, report.system_entries = len(events), len(rows) - len(events)
    if system_entries is not None and report.system_entries != system_entries:
        report.add("system_entries", f"{report.system_entries} entries without a subject, expected {system_entries}")
    by_where = {send.where: send for send in history.sends if send.where is not None}
    conflicts = _check_events(history, events, by_where, report)
    _check_order(events, by_where, report)
    rejected = await connection.fetch(_REJECTED)
    report.rejected = len(rejected)
    _check_rejections(history, rejected, by_where, conflicts, report)
    await _check_chain(connection, len(rows), report)
    if group_id is not None:
        stored = {
            (row["topic"], row["partition"]): row["next_offset"]
            for row in await connection.fetch(
                "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1", group_id
            )
        }
        for tp, end in sorted(history.acknowledged_ends().items()):
            if stored.get(tp, 0) < end:
                report.add("offsets_behind", f"{tp[0]}[{tp[1]}] stored next offset {stored.get(tp, 0)} < end {end}")
    return report


def _content(row: asyncpg.Record) -> EntryContent:
    return entry_from_row(row).content


def _check_events(
    history: History, events: Sequence[asyncpg.Record], by_where: dict[Where | None, Send], report: Report
) -> set[Where]:
    """Acknowledged: exactly once; indeterminate: at most once; nothing else. Returns the expected id conflicts."""
    valid: dict[uuid.UUID, list[Send]] = defaultdict(list)
    bad_ids = set()
    for send in history.sends:
        if send.event is not None and send.expected_reason is None:
            valid[send.event.event_id].append(send)
        elif send.event is not None:
            bad_ids.add(send.event.event_id)
    report.events = len(valid)
    stored: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for row in events:
        stored[row["event_id"]].append(row)
    for event_id, rows in stored.items():
        if event_id not in valid:
            kind = "accepted_bad" if event_id in bad_ids else "never_sent"
            report.add(kind, f"seq {rows[0]['seq']}: event {event_id} was not sent as a valid event")
    conflicts: set[Where] = set()
    for event_id, sends in valid.items():
        rows = stored.get(event_id, [])
        delivered = [s for s in sends if s.outcome is Outcome.ACKNOWLEDGED]
        maybe = [s for s in sends if s.outcome is Outcome.INDETERMINATE]
        if len(rows) > 1:
            report.add("duplicated", f"event {event_id} at seqs {[r['seq'] for r in rows]}")
        if not rows:
            if delivered:
                report.add("lost", f"event {event_id}, acknowledged at {[s.where for s in delivered]}, not stored")
            continue
        if not delivered and not maybe:
            report.add("never_sent", f"seq {rows[0]['seq']}: event {event_id} only failed to send, yet is stored")
            continue
        content = _content(rows[0])
        if not any(EntryContent.of_event(s.event).same_as(content) for s in delivered + maybe if s.event):
            report.add("altered", f"seq {rows[0]['seq']}: event {event_id} stored with content never sent")
            continue
        # A later message with the same id and other content is an id conflict; the same content, a duplicate.
        conflicts.update(
            s.where for s in delivered if s.event and s.where and not EntryContent.of_event(s.event).same_as(content)
        )
        source = (rows[0]["source_topic"], rows[0]["source_partition"], rows[0]["source_offset"])
        first = min((s.where for s in delivered if s.where), default=None)
        if source[0] is not None and not maybe and first is not None and source != first:
            sent_first = by_where[first]
            if sent_first.topic == source[0] and sent_first.partition == source[1]:
                report.add("not_first_delivery", f"event {event_id} stored from {source}, first delivered at {first}")
    return conflicts


def _check_order(events: Sequence[asyncpg.Record], by_where: dict[Where | None, Send], report: Report) -> None:
    """Per subject and topic, seq order is Kafka offset order is send order."""
    last: dict[tuple[str, str], tuple[int, int, int | None, int]] = {}
    for row in events:
        if row["source_topic"] is None:
            continue
        group = (row["subject_id"], row["source_topic"])
        send = by_where.get((row["source_topic"], row["source_partition"], row["source_offset"]))
        current = (row["source_partition"], row["source_offset"], send.number if send else None, row["seq"])
        previous = last.get(group)
        last[group] = current
        if previous is None:
            continue
        same_partition = previous[0] == current[0]
        if (same_partition and previous[1] > current[1]) or (
            previous[2] is not None and current[2] is not None and previous[2] > current[2]
        ):
            report.add(
                "order",
                f"subject {row['subject_id']!r} on {row['source_topic']}: seq {previous[3]} (partition {previous[0]}"
                f" offset {previous[1]}, send {previous[2]}) before seq {current[3]} (partition {current[0]} offset"
                f" {current[1]}, send {current[2]})",
            )


def _check_rejections(
    history: History,
    rejected: Sequence[asyncpg.Record],
    by_where: dict[Where | None, Send],
    conflicts: set[Where],
    report: Report,
) -> None:
    """Every acknowledged bad input and id conflict once, with its reason and bytes; nothing else."""
    expected: dict[Where, RejectReason] = {
        send.where: send.expected_reason
        for send in history.sends
        if send.where is not None and send.expected_reason is not None
    }
    expected.update(dict.fromkeys(conflicts, RejectReason.EVENT_ID_CONFLICT))
    maybe = {
        (send.topic, send.value): send
        for send in history.sends
        if send.outcome is Outcome.INDETERMINATE and send.expected_reason is not None
    }
    for row in rejected:
        where = (row["source_topic"], row["source_partition"], row["source_offset"])
        raw = bytes(row["raw"])
        reason = expected.pop(where, None)
        if reason is not None:
            if row["reason"] != reason.value:
                report.add("rejection_wrong_reason", f"{where}: rejected as {row['reason']}, expected {reason.value}")
            elif raw != by_where[where].value:
                report.add("rejection_bytes", f"{where}: stored bytes differ from those sent")
        elif where in by_where:
            report.add("rejected_valid", f"{where}: a valid message rejected as {row['reason']}")
        elif (row["source_topic"], raw) not in maybe:
            report.add("rejection_never_sent", f"{where}: rejected as {row['reason']}, never sent")
    for where, reason in sorted(expected.items()):
        report.add("rejection_missing", f"{where}: not in the rejected store (expected {reason.value})")


async def _check_chain(connection: asyncpg.Connection, rows: int, report: Report) -> None:
    verifier = await fold_chain(connection)
    broken = verifier.first_break
    if broken is not None:
        kind = "chain"
        if broken.detail.startswith("gap"):
            kind = "seq_gap"
        elif "back in time" in broken.detail:
            kind = "time_backwards"
        report.add(kind, f"at seq {broken.seq}: {broken.detail}")
    elif verifier.checked != rows:
        report.add("chain", f"{verifier.checked} entries verified of {rows}")
