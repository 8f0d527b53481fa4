"""SIGKILL and SIGTERM the ledger writer mid-stream, again and again: no event is lost, none is stored twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from ledger_support import (
    Message,
    assert_ledger_sound,
    end_offsets_of,
    ensure_event_topics,
    make_event,
    offsets_reached,
    send_raw,
    stored_offsets,
    subjects,
    wait_until,
)

from consent_ledger.adapters.avro.codec import encode_event
from consent_ledger.config import Settings

EVENTS = 20_000  # published up front; more only if a run could otherwise drain the stream
DUPLICATE_SHARE = 0.05
KILLS, SOAK_KILLS = 5, 30
BATCH_MAX = 200  # small batches, so that most kills land inside a batch's transaction
WAIT_S = 120.0


def writer_env(settings: Settings) -> dict[str, str]:
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSENT_LEDGER_")}
    env.update({
        "CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONSENT_LEDGER_DATABASE_URL": settings.database_url,
        "CONSENT_LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "CONSENT_LEDGER_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "CONSENT_LEDGER_WRITER_BATCH_MAX": str(BATCH_MAX),
    })
    return env


class WriterProcess:
    """`consent-ledger ledger-writer` as a child process, its output appended to one log file."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.env = writer_env(settings)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consent_ledger", "ledger-writer"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer did not exit within {timeout_s:.0f}s; see {self.tail()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def run_to_the_end(
        self, service_db: asyncpg.Connection, settings: Settings, ends: dict[tuple[str, int], int],
        describe: Callable[[], Awaitable[str]],
    ) -> None:
        """Start, append up to the end of every partition, then stop cleanly with SIGTERM (exit code 0)."""
        self.start()

        async def caught_up() -> bool:
            assert self.running(), f"the writer exited on its own; {self.tail()}"
            return offsets_reached(await stored_offsets(service_db, settings.writer_group_id), ends)

        await wait_until(caught_up, WAIT_S, describe)
        self.signal(signal.SIGTERM)
        assert await self.wait(60) == 0, self.tail()

    def kill(self) -> None:
        """Leave nothing running, whatever happened."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no output)"
        return f"{self.log}:\n" + "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow  # each restart waits for the killed member's session to expire: about 20 s a cycle
async def test_sigkill_mid_batch_loses_and_duplicates_nothing(
    settings: Settings, service_db: asyncpg.Connection, admin_db: asyncpg.Connection, soak: bool, tmp_path: Path
) -> None:
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    servers = settings.kafka_bootstrap_servers
    seed = int(os.environ.get("CRASH_SEED", random.SystemRandom().randrange(2**32)))
    print(f"\ncrash test seed {seed} (rerun with CRASH_SEED={seed})")
    rng = random.Random(seed)
    kills = SOAK_KILLS if soak else KILLS
    people = subjects(500)
    expected: set[uuid.UUID] = set()
    ends: dict[tuple[str, int], int] = {}
    published = 0
    sent_to: dict[uuid.UUID, list[tuple[str, int, int]]] = {}

    async def publish(count: int) -> None:
        """`count` new events plus redeliveries of 5% of them, after the originals."""
        nonlocal published
        events = [make_event(rng, rng.choice(people)) for _ in range(count)]
        sent = events + rng.sample(events, int(count * DUPLICATE_SHARE))
        messages = [Message(settings.topics.name(e.topic), e.subject_id.encode(), encode_event(e)) for e in sent]
        metadata = await send_raw(servers, messages)
        for tp, end in end_offsets_of(metadata).items():
            ends[tp] = max(ends.get(tp, 0), end)
        for event, meta in zip(sent, metadata, strict=True):
            sent_to.setdefault(event.event_id, []).append((meta.topic, meta.partition, meta.offset))
        expected.update(e.event_id for e in events)
        published += len(messages)

    await ensure_event_topics(settings)
    await publish(EVENTS)

    async def entries() -> int:
        """Entries of events: the writer service also records the policy timeline, which has no subject."""
        return int(await service_db.fetchval("SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"))

    async def in_transaction() -> bool:
        """Whether the writer has an open transaction right now (for the report only, never asserted)."""
        return bool(await admin_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename = 'consent_ledger'"
            " AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"
        ))

    writer = WriterProcess(settings, tmp_path / "writer.log")

    async def describe() -> str:
        return f"ledger holds {await entries()} of {len(expected)}; {writer.tail()}"

    at_kill: list[tuple[float, int, bool]] = []
    most_per_run = 2000
    try:
        for _ in range(kills):
            before = await entries()
            # However fast this machine appends, the next kill must still find work in hand.
            if len(expected) - before < 3 * most_per_run:
                await publish(3 * most_per_run)
            writer.start()

            async def appending(floor: int = before) -> bool:
                assert writer.running(), f"the writer exited on its own; {writer.tail()}"
                return await entries() > floor

            # A restart first rejoins the group; the kill is timed from its first append on.
            await wait_until(appending, WAIT_S, describe, poll_s=0.02)
            delay = rng.uniform(0.3, 1.5)
            await asyncio.sleep(delay)
            open_transaction = await in_transaction()
            writer.signal(signal.SIGKILL)
            assert await writer.wait(30) == -signal.SIGKILL
            count = await entries()
            most_per_run = max(most_per_run, count - before)
            at_kill.append((delay, count, open_transaction))

        print(f"kills: {len(at_kill)}, before the end of the stream: {sum(c < len(expected) for _, c, _ in at_kill)}, "
              f"with the writer's transaction open: {sum(busy for *_, busy in at_kill)}")
        for number, (delay, count, busy) in enumerate(at_kill, start=1):
            print(f"  kill {number}: {delay:.2f}s after the first append, ledger held {count} entries"
                  f"{' (transaction open)' if busy else ''}")
        assert all(count < len(expected) for _, count, _ in at_kill)

        # The last run: to the end of every partition, then a clean stop.
        await writer.run_to_the_end(service_db, settings, ends, describe)
    finally:
        writer.kill()

    stored = {row[0] for row in await service_db.fetch("SELECT event_id FROM ledger WHERE subject_id IS NOT NULL")}
    for event_id in sorted(expected - stored)[:10]:
        print(f"missing {event_id}, sent to {sent_to[event_id]}")
    # Six starts, one policy timeline: recorded once.
    await assert_ledger_sound(service_db, settings.database_url, expected, entries_without_subject=1)
    assert await service_db.fetchval("SELECT count(*) FROM ledger WHERE event_type = 'policy.published'") == 1
    assert await stored_offsets(service_db, settings.writer_group_id) == ends
    print(f"final ledger: {await entries()} entries, {len(expected)} distinct events in {published} messages")


async def test_sigterm_during_ingest_stops_cleanly_and_a_restart_completes_the_ledger(
    settings: Settings, service_db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: the batch in hand is committed, the process exits 0, a restart loses nothing."""
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    rng = random.Random(20261123)
    people = subjects(300)
    events = [make_event(rng, rng.choice(people)) for _ in range(10_000)]
    sent = events + rng.sample(events, int(len(events) * DUPLICATE_SHARE))
    await ensure_event_topics(settings)
    metadata = await send_raw(settings.kafka_bootstrap_servers, [
        Message(settings.topics.name(e.topic), e.subject_id.encode(), encode_event(e)) for e in sent
    ])
    ends = end_offsets_of(metadata)
    expected = {e.event_id for e in events}

    async def entries() -> int:
        return int(await service_db.fetchval("SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"))

    writer = WriterProcess(settings, tmp_path / "writer.log")

    async def describe() -> str:
        return f"ledger holds {await entries()} of {len(expected)}; {writer.tail()}"

    try:
        writer.start()

        async def appending() -> bool:
            assert writer.running(), f"the writer exited on its own; {writer.tail()}"
            return await entries() > 0

        await wait_until(appending, WAIT_S, describe, poll_s=0.02)
        writer.signal(signal.SIGTERM)
        assert await writer.wait(60) == 0, writer.tail()
        at_stop = await entries()
        print(f"\nSIGTERM with {at_stop} of {len(expected)} events in the ledger")
        assert at_stop < len(expected), "the stream ended before the SIGTERM: nothing was interrupted"
        # What the stopped writer committed is consistent: its offsets and its rows describe the same prefix.
        await assert_ledger_sound(service_db, settings.database_url, {
            row[0] for row in await service_db.fetch("SELECT event_id FROM ledger WHERE subject_id IS NOT NULL")
        }, entries_without_subject=1)

        await writer.run_to_the_end(service_db, settings, ends, describe)
    finally:
        writer.kill()
    await assert_ledger_sound(service_db, settings.database_url, expected, entries_without_subject=1)
    assert await stored_offsets(service_db, settings.writer_group_id) == ends
