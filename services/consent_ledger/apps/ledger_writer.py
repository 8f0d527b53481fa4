"""The ledger writer: consumes the event topics and appends each valid event exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from consent_ledger.adapters import metrics
from consent_ledger.adapters.avro.codec import decode_event
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, Rejection, SourceRef, append
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.config import Settings
from consent_ledger.core.events import EVENT_TOPICS, TOPIC_OF, InvalidEvent, RejectReason
from consent_ledger.core.ledger import EntryContent

log = logging.getLogger("consent_ledger.writer")
_ANY_SIZE = 2**31 - 1


class BrokerLogLost(RuntimeError):
    """The broker's log ends before offsets this ledger already committed: it lost data or was replaced."""


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """On assignment, resume from the offsets committed with the ledger rows, never from Kafka's."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        try:
            await self.writer.seek_to_stored_offsets(list(assigned))
        except Exception as error:  # aiokafka swallows listener errors; the poll loop re-raises it
            self.writer.fatal = error


class LedgerWriter:
    """One instance per process; several instances in one consumer group split the partitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [settings.topics.name(t) for t in EVENT_TOPICS]
        self.base_topic = {settings.topics.name(t): t for t in EVENT_TOPICS}
        self.fatal: BaseException | None = None
        self.connection: asyncpg.Connection | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.dead_letters: AIOKafkaProducer | None = None
        self.max_skew = timedelta(seconds=settings.max_future_skew_seconds)
        self.appended = 0
        self.unconfirmed_ends: dict[TopicPartition, int] = {}
        """Stored offsets past the end ListOffsets reported; the first fetch's high watermark decides."""

    async def start(self) -> None:
        assert self.settings.kafka_bootstrap_servers and self.settings.database_url
        servers = self.settings.kafka_bootstrap_servers
        await ensure_topics(
            servers, [*self.topics, self.settings.topics.dead_letter, self.settings.topics.ledger_entries],
            self.settings.topic_partitions, self.settings.topic_replication,
        )
        self.connection = await connect(self.settings.database_url)
        # No client-side size limit: a rejected message is dead-lettered whatever its size (the broker took it
        # once). aiokafka's default of 1 MiB made a larger message crash the writer, and again after each restart.
        self.dead_letters = AIOKafkaProducer(
            bootstrap_servers=servers, acks="all", linger_ms=5, max_request_size=_ANY_SIZE
        )
        await self.dead_letters.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=servers,
            group_id=self.settings.writer_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(1_048_576, self.settings.max_message_bytes),
            # Kafka answers a waiting fetch as soon as data arrives; the embedded Tansu only when the wait ends
            # (measured: a message arrived 452 ms after it was produced with a 1,500 ms wait, 4 ms with 100 ms).
            # Short waits cost an idle writer ten fetches a second.
            fetch_max_wait_ms=100,
        )
        self.consumer.subscribe(self.topics, listener=_SeekToStoredOffsets(self))
        await self.consumer.start()

    async def stop(self) -> None:
        for closer in (
            self.consumer.stop() if self.consumer else None,
            self.dead_letters.stop() if self.dead_letters else None,
            self.connection.close() if self.connection else None,
        ):
            if closer is not None:
                try:
                    await closer
                except Exception:  # stopping must go on even if one client is already broken
                    log.warning("error while stopping the ledger writer", exc_info=True)

    async def seek_to_stored_offsets(self, assigned: list[TopicPartition]) -> None:
        assert self.connection is not None and self.consumer is not None
        rows = await self.connection.fetch(
            query("ledger", "stored_offsets"), self.settings.writer_group_id, self.topics
        )
        stored = {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        ends = await self.consumer.end_offsets(assigned) if assigned else {}
        for tp in assigned:
            offset = stored.get(tp)
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
                continue
            if offset > ends[tp]:
                # Some brokers under-report here (the embedded Tansu answers with its last batch's base
                # offset + 1); the high watermark of the first fetch is the end that counts.
                self.unconfirmed_ends[tp] = offset
            self.consumer.seek(tp, offset)
        log.info("assigned %s", {f"{tp.topic}[{tp.partition}]": stored.get(tp, 0) for tp in assigned})

    async def run(self, stop: asyncio.Event) -> None:
        """Poll, append, commit; until `stop` is set (the batch in hand is finished first)."""
        assert self.consumer is not None
        while not stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=self.settings.writer_batch_max)
            if self.fatal is not None:
                raise self.fatal
            self._confirm_log_ends()
            records = [record for batch in batches.values() for record in batch]
            if records:
                await self.append_records(records)
                # Kafka's own offsets are only for lag tools: correctness rests on the stored ones.
                await self.consumer.commit({tp: batch[-1].offset + 1 for tp, batch in batches.items()})
            await self._update_lag()

    def _confirm_log_ends(self) -> None:
        """Before any record of such a partition is used: fail if its log ends before the stored offset."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for tp, offset in list(self.unconfirmed_ends.items()):
            if tp not in assigned:  # revoked; the next assignment seeks and checks again
                del self.unconfirmed_ends[tp]
                continue
            highwater = self.consumer.highwater(tp)
            if highwater is None:  # not fetched yet, so none of its records is in hand either
                continue
            del self.unconfirmed_ends[tp]
            if offset > highwater:
                raise BrokerLogLost(
                    f"{tp.topic}[{tp.partition}] ends at offset {highwater} but the ledger already holds "
                    f"messages up to offset {offset - 1}: the broker lost its log or is another cluster. "
                    "Nothing was skipped or re-read; check the Kafka address, then see deploy/OPERATIONS.md, "
                    "'Broker log lost'."
                )

    async def append_records(self, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        assert self.connection is not None
        started = time.perf_counter()
        candidates, rejections = self.classify(records)
        next_offsets: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), record.offset + 1)
        async with self.connection.transaction():
            outcome = await append(
                self.connection, candidates, rejections, group_id=self.settings.writer_group_id,
                next_offsets=next_offsets, max_future_skew=self.max_skew,
            )
            # Dead letters go out before the commit: a crash may repeat one, never lose one.
            await self._publish_dead_letters(outcome.rejected)
            if outcome.appended:
                await self.connection.execute("SELECT pg_notify('ledger_appended', $1)", str(outcome.appended[-1].seq))
        metrics.EVENTS_CONSUMED.inc(len(records))
        metrics.ENTRIES_APPENDED.inc(len(outcome.appended))
        metrics.DUPLICATES.inc(outcome.duplicates)
        metrics.REDELIVERED.inc(outcome.already_committed)
        for rejection in outcome.rejected:
            metrics.EVENTS_REJECTED.labels(rejection.reason.value).inc()
        metrics.APPEND_BATCH_SIZE.observe(len(records))
        metrics.APPEND_LATENCY.observe(time.perf_counter() - started)
        if outcome.appended:
            metrics.LEDGER_HEAD.set(outcome.appended[-1].seq)
        self.appended += len(outcome.appended)

    def classify(self, records: Sequence[ConsumerRecord[Any, Any]]) -> tuple[list[Candidate], list[Rejection]]:
        """Decode and validate each message; what fails becomes a rejection with its reason."""
        candidates: list[Candidate] = []
        rejections: list[Rejection] = []
        for record in records:
            source = SourceRef(record.topic, record.partition, record.offset)
            raw: bytes = record.value if record.value is not None else b""
            if len(raw) > self.settings.max_message_bytes:
                rejections.append(Rejection(
                    RejectReason.OVERSIZED, f"{len(raw)} bytes; at most {self.settings.max_message_bytes}",
                    source, raw,
                ))
                continue
            try:
                event = decode_event(raw)
            except InvalidEvent as error:
                rejections.append(Rejection(error.reason, error.detail, source, raw, error.field))
                continue
            expected_topic = TOPIC_OF[event.event_type]
            if self.base_topic.get(record.topic) != expected_topic:
                rejections.append(Rejection(
                    RejectReason.WRONG_TOPIC, f"{event.event_type} belongs on topic {expected_topic!r}",
                    source, raw, "event_type", event.event_id,
                ))
                continue
            candidates.append(Candidate(EntryContent.of_event(event), source, raw))
        return candidates, rejections

    async def _publish_dead_letters(self, rejected: Sequence[Rejection]) -> None:
        if not rejected or self.dead_letters is None:
            return
        sends = [
            await self.dead_letters.send(
                self.settings.topics.dead_letter,
                value=rejection.raw,
                headers=[
                    ("reason", rejection.reason.value.encode()),
                    ("detail", rejection.detail.encode()),
                    ("source", _coordinates(rejection.source).encode()),
                ],
            )
            for rejection in rejected
        ]
        await asyncio.gather(*sends)

    async def _update_lag(self) -> None:
        assert self.consumer is not None
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        lag = 0
        for tp in assigned:
            highwater = self.consumer.highwater(tp)
            position = await self.consumer.position(tp)
            if highwater is not None:
                lag += max(0, highwater - position)
        metrics.CONSUMER_LAG.set(lag)


def _coordinates(source: SourceRef) -> str:
    return f"{source.topic}/{source.partition}/{source.offset}"
