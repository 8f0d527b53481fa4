"""Feeds committed ledger entries to `ledger.entries` from a cursor stored in PostgreSQL (the outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import asyncpg
from aiokafka import AIOKafkaProducer

from consent_ledger.adapters import metrics
from consent_ledger.adapters.kafka.ledger_feed import (
    Announcement,
    announcement_messages,
    partition_of,
    tick_message,
)
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.config import Settings

log = logging.getLogger("consent_ledger.outbox")
CURSOR_NAME = "ledger.entries"


class OutboxPublisher:
    """At-least-once: the cursor moves only after the broker acknowledged; consumers are idempotent by seq."""

    def __init__(self, settings: Settings, batch: int = 20_000) -> None:
        self.settings = settings
        self.topic = settings.topics.ledger_entries
        self.batch = batch
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.settings.database_url and self.settings.kafka_bootstrap_servers
        connection = await connect(self.settings.database_url)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all", linger_ms=5,
            max_batch_size=262_144,
        )
        await producer.start()
        await connection.add_listener("ledger_appended", self._on_notify)
        try:
            while not stop.is_set() and not await connection.fetchval(query("ledger", "outbox_lock")):
                await _sleep_or_stop(stop, 1.0)  # another process publishes; take over when it stops
            while not stop.is_set():
                if not await self.publish_pending(connection, producer):
                    self._wake.clear()
                    await _sleep_or_stop(stop, 0.5, also=self._wake)
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
            with contextlib.suppress(Exception):
                await connection.close()

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def publish_pending(self, connection: asyncpg.Connection, producer: AIOKafkaProducer) -> bool:
        """Publish one batch after the cursor; False when there was nothing to publish."""
        cursor = await connection.fetchval(query("ledger", "outbox_cursor"), CURSOR_NAME) or 0
        rows = await connection.fetch(query("ledger", "announcements_from"), cursor, self.batch)
        if not rows:
            return False
        last = rows[-1]["seq"]
        partitions = sorted(await producer.partitions_for(self.topic))
        # Each subject is announced on the partition its key would go to (processors own subjects by it).
        by_partition: dict[int, list[Announcement]] = defaultdict(list)
        for row in rows:
            if row["subject_id"] is not None:  # receipts and policy entries have no subject to fold
                subject_id = row["subject_id"]
                by_partition[partition_of(subject_id, len(partitions))].append(Announcement(subject_id, row["seq"]))
        await asyncio.gather(*[
            await producer.send(self.topic, value=message, partition=partition)
            for partition, mine in sorted(by_partition.items())
            for message in announcement_messages(mine)
        ])
        # Ticks only once every announcement they promise is on the log: a processor trusts a tick that ends an
        # unbroken run of offsets (ledger_feed.unbroken_runs), and a send that failed after later ones were
        # queued would leave a hole no offset shows.
        await asyncio.gather(*[
            await producer.send(self.topic, value=tick_message(last, len(partitions)), partition=p)
            for p in partitions
        ])
        await connection.execute(query("ledger", "save_outbox_cursor"), CURSOR_NAME, last)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        return True

async def _sleep_or_stop(stop: asyncio.Event, seconds: float, also: asyncio.Event | None = None) -> None:
    """Sleep until `stop` (or `also`) is set, at most `seconds`."""
    waiters = [asyncio.create_task(event.wait()) for event in (stop, also) if event is not None]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
