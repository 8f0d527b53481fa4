"""SIGTERM the ledger writer mid-stream: the batch in hand is committed, and a restart completes the ledger.

SIGKILL, lost connections and restarted servers are in test_writer_faults.py."""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg
from ledger_support import WriterProcess, ensure_event_topics, make_event, subjects, wait_until

from consent_ledger.config import Settings
from history_checker import History, check

EVENTS = 10_000
DUPLICATE_SHARE = 0.05
BATCH_MAX = 200  # small batches, so that the SIGTERM lands with a batch in hand
WAIT_S = 120.0


async def test_sigterm_during_ingest_stops_cleanly_and_a_restart_completes_the_ledger(
    settings: Settings, service_db: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: the batch in hand is committed, the process exits 0, a restart loses nothing."""
    settings = settings.model_copy(update={"writer_batch_max": BATCH_MAX})
    assert settings.kafka_bootstrap_servers is not None
    assert settings.database_url is not None
    history = History(settings.topics.name, label="sigterm")
    people = subjects(300)
    events = [make_event(history.rng, history.rng.choice(people)) for _ in range(EVENTS)]
    for event in events + history.rng.sample(events, int(EVENTS * DUPLICATE_SHARE)):
        history.add_event(event)
    await ensure_event_topics(settings)
    await history.publish(settings.kafka_bootstrap_servers)
    assert all(send.where is not None for send in history.sends), "the broker refused a send"

    async def entries() -> int:
        return int(await service_db.fetchval("SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"))

    writer = WriterProcess(settings, tmp_path / "writer.log", WAIT_S)

    async def describe() -> str:
        return f"ledger holds {await entries()} of {EVENTS}; {writer.tail()}"

    try:
        writer.start()

        async def appending() -> bool:
            assert writer.running(), f"the writer exited on its own; {writer.tail()}"
            return await entries() > 0

        await wait_until(appending, WAIT_S, describe, poll_s=0.02)
        writer.signal(signal.SIGTERM)
        assert await writer.wait(60) == 0, writer.tail()
        at_stop = await entries()
        print(f"SIGTERM with {at_stop} of {EVENTS} events in the ledger")
        assert at_stop < EVENTS, "the stream ended before the SIGTERM: nothing was interrupted"
        # What the stopped writer committed is consistent: a prefix of every partition, nothing else.
        stopped = await check(history, settings.database_url, system_entries=1)
        assert stopped.kinds() <= {"lost"}, stopped.anomalies[:5]

        await writer.run_to_the_end(service_db, settings, history.acknowledged_ends(), describe)
    finally:
        writer.kill()
    report = await check(history, settings.database_url, group_id=settings.writer_group_id, system_entries=1)
    print(report.summary())
    report.assert_clean()
