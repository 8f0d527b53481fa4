"""Stream processors under faults: a second worker joining mid-stream (a rebalance), a worker stopped mid-stream
(SIGKILL, or SIGTERM: faust's clean stop) and restarted, and the race a rebalance allows, made deterministic.

Whatever happens, the final state tables must equal a full fold of the ledger, which is what `consent-ledger
replay` checks (zero state differences). Each scenario is bounded by deadlines and fails with the workers' logs.
The workers run with a 10 s session timeout (`processor_session_timeout_seconds`): the embedded Tansu broker holds
every group join for half of it, and evicts a killed member only after all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from system_support import (
    DEADLINE,
    POLL,
    SESSION_TIMEOUT,
    Ledger,
    Workers,
    at_least,
    check_published,
    folded_above,
    folded_to,
    has_folded,
    in_chunks,
    replay,
    scale,
    wait_for,
)

from consent_ledger.adapters.kafka.ledger_feed import Announcement, announcement_messages
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres import state_store
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.apps.bench import history
from consent_ledger.apps.publishing import publish_events
from consent_ledger.apps.stream_processor import SubjectFolder
from consent_ledger.config import Settings
from consent_ledger.core.events import Event, EventType
from consent_ledger.core.ledger import EntryContent

CHUNKS = 20  # the stream is published in chunks, so that it can be paced across a rebalance
PACE = 2.0  # seconds between chunks once the second worker has started and until it folds
BATCH_MESSAGES = 8  # feed messages per fold transaction


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A short processor session timeout: a killed worker leaves the group after 10 s rather than 60 s, and the
    embedded Tansu broker, which holds every group join for half the session timeout, lets a worker start
    folding after 5 s rather than 30 s. Small batches, so that a worker folds the first half of the stream in
    many transactions and the group rebalances while it is folding. Production keeps the defaults."""
    return settings.model_copy(
        update={"processor_session_timeout_seconds": SESSION_TIMEOUT, "processor_batch_messages": BATCH_MESSAGES}
    )


@pytest.mark.slow
async def test_second_worker_joining_mid_stream_leaves_state_equal_to_a_full_fold(
    settings: Settings, writer: asyncio.Task[None], workers: Workers, service_db: asyncpg.Connection,
    tmp_path: Path, soak: bool,
) -> None:
    events, subjects = scale(soak)
    ledger = Ledger(service_db, settings)
    expected_head = events + 1  # and the policy.published entry the writer service records at start
    killed: set[int] = set()
    chunks = in_chunks(list(history(events, subjects)), CHUNKS)
    first = workers.start()
    started = time.monotonic()
    # The first half of the stream, then the second worker joins as soon as the first has folded events
    # (beyond the policy entry at seq 1): the group rebalances while the first worker is folding.
    for chunk in chunks[: CHUNKS // 2]:
        check_published(await publish_events(settings, chunk), len(chunk))
    await wait_for(lambda: folded_above(ledger, 1), "the first worker to fold", workers, writer, killed)
    second = workers.start()
    joined = time.monotonic()
    folded_at_join = await ledger.folded()
    assert folded_at_join < expected_head // 2, f"{folded_at_join} of {expected_head} folded before the join"
    # The rest of the stream keeps flowing, a chunk every PACE seconds, until the rebalance has given the second
    # worker partitions and it folds entries (then the rest goes at once), so that both workers take part.
    rebalance: float | None = None
    for chunk in chunks[CHUNKS // 2 :]:
        check_published(await publish_events(settings, chunk), len(chunk))
        paced = time.monotonic() + PACE
        while rebalance is None and time.monotonic() < paced:
            if await has_folded(workers, 2):
                rebalance = time.monotonic() - joined
            await asyncio.sleep(POLL)
    if rebalance is None:
        await wait_for(lambda: has_folded(workers, 2), "the second worker to fold", workers, writer, killed,
                       timeout=30)
        rebalance = time.monotonic() - joined
    folded_at_rebalance = await ledger.folded()

    await wait_for(lambda: at_least(ledger.events, events), "every event in the ledger", workers, writer, killed)
    assert await ledger.head() == expected_head
    await wait_for(lambda: folded_to(ledger, expected_head), "the fold to reach the head", workers, writer, killed)
    fold_seconds = time.monotonic() - started
    assert (first.poll(), second.poll()) == (None, None), workers.logs()
    shares = [await workers.entries_folded(1), await workers.entries_folded(2)]
    assert min(shares) > 0, shares

    report = replay(settings, tmp_path)
    print(f"\ntwo workers: {events:,} events over {subjects:,} subjects in {CHUNKS} chunks; the second worker "
          f"started {joined - started:.1f}s after the first, with {folded_at_join:,} folded; it folded its first "
          f"entries {rebalance:.1f}s later (folded then: {folded_at_rebalance:,}); all {expected_head:,} entries "
          f"folded {fold_seconds:.1f}s after the first worker started; entries folded by worker 1 / worker 2: "
          f"{shares[0]:,.0f} / {shares[1]:,.0f}; replay: {report['entries']:,} entries, "
          f"{report['state']['differences']} differences, "
          f"{sum(t['rebuilt_rows'] for t in report['state']['tables'].values()):,} rows, {report['seconds']}s")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_worker_stopped_mid_stream_and_restarted_leaves_state_equal_to_a_full_fold(
    settings: Settings, writer: asyncio.Task[None], workers: Workers, service_db: asyncpg.Connection,
    tmp_path: Path, soak: bool, stop: signal.Signals,
) -> None:
    """SIGKILL: a crash, nothing finishes. SIGTERM: faust's own clean stop, which may cut a batch short."""
    events, subjects = scale(soak)
    ledger = Ledger(service_db, settings)
    expected_head = events + 1  # and the policy.published entry
    killed: set[int] = set()
    first = workers.start()
    started = time.monotonic()
    publishing = asyncio.create_task(publish_events(settings, history(events, subjects)))
    try:
        # Stop it while folding: as soon as the watermark has moved past the policy entry at seq 1 (a first batch
        # of events is folded), with most of the stream still to fold.
        await wait_for(lambda: folded_above(ledger, 1), "the worker to fold", workers, writer, killed)
        killed.add(first.pid)
        if stop == signal.SIGKILL:
            os.killpg(first.pid, stop)
        else:
            first.send_signal(stop)
        await asyncio.to_thread(first.wait, 60)
        folded_at_kill = await ledger.folded()
        head_at_kill = await ledger.head()
        assert folded_at_kill < expected_head, f"folding finished before the {stop.name}: nothing was in flight"
        check_published(await publishing, events)
    finally:
        if not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing

    await wait_for(lambda: at_least(ledger.events, events), "every event in the ledger", workers, writer, killed)
    assert await ledger.head() == expected_head
    assert await ledger.folded() < expected_head, "the fold finished with no worker running"
    workers.start()
    restarted = time.monotonic()
    catch_up = await wait_for(lambda: folded_to(ledger, expected_head), "the restarted worker to catch up",
                              workers, writer, killed)
    lag_after = expected_head - await ledger.folded()
    assert lag_after == 0

    report = replay(settings, tmp_path)
    print(f"\n{stop.name}: {events:,} events over {subjects:,} subjects; stopped at folded {folded_at_kill:,} "
          f"(lag {head_at_kill - folded_at_kill:,} of ledger head {head_at_kill:,}, "
          f"{expected_head - folded_at_kill:,} of the final head) {restarted - started:.1f}s after publishing began; "
          f"the new worker caught up in {catch_up:.1f}s (lag after: {lag_after}); replay: "
          f"{report['entries']:,} entries, {report['state']['differences']} differences, {report['seconds']}s")


async def test_two_workers_folding_one_new_subject_at_once_fold_it_once(
    settings: Settings, admin_db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race behind a rebalance, made deterministic: the partition's old owner is still inside its transaction
    folding a subject's first entries when the new owner, redelivered the same entries and more, folds them too.

    The subject is new, so it has no fold-state row yet for the first transaction to lock: the second must
    still wait for the first to commit, then fold only what is left, on top of it.
    """
    subject = "subject-raced"
    events = [
        event_on_day(subject, EventType.ACCOUNT_REGISTERED, 0, account_type="consumer"),
        event_on_day(subject, EventType.CONVERSATION_STARTED, 1, conversation_id="c1"),
        event_on_day(subject, EventType.CONVERSATION_RESUMED, 2, conversation_id="c1"),
    ]
    assert settings.database_url is not None
    writer = await connect(settings.database_url)  # with the service's jsonb codec, as the ledger writer's
    try:
        async with writer.transaction():
            appended = (await append(writer, [Candidate(EntryContent.of_event(e)) for e in events])).appended
    finally:
        await writer.close()
    messages = [(0, m) for e in appended for m in announcement_messages([Announcement(e.subject_id, e.seq)])]

    paused, release = asyncio.Event(), asyncio.Event()
    write_plan = state_store.write_plan

    async def first_one_pauses(connection: asyncpg.Connection, plan: state_store.WritePlan) -> int:
        if not paused.is_set():
            paused.set()
            await release.wait()  # the old owner, still inside its transaction
        return await write_plan(connection, plan)

    monkeypatch.setattr(state_store, "write_plan", first_one_pauses)
    timeline = load_timeline(None)
    old_owner, new_owner = SubjectFolder(settings, timeline), SubjectFolder(settings, timeline)
    try:
        first = asyncio.create_task(old_owner.fold_batch(messages[:2]))
        await asyncio.wait_for(paused.wait(), DEADLINE)
        second = asyncio.create_task(new_owner.fold_batch(messages))  # redelivered from an older offset
        deadline = time.monotonic() + DEADLINE
        # The second either waits for the first's lock (right) or goes ahead without it (the race).
        while not second.done() and not await _waiting_for_a_lock(admin_db):
            assert time.monotonic() < deadline, "the second fold neither finished nor waited for a lock"
            await asyncio.sleep(POLL)
        went_ahead = second.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
    finally:
        release.set()
        await old_owner.stop()
        await new_owner.stop()
    report = replay(settings, tmp_path)
    assert not went_ahead, "the second fold did not wait for the first, yet the state came out right"
    print(f"\nconcurrent folds of one new subject: the second waited for the first's lock; replay: "
          f"{report['state']['differences']} differences")


def event_on_day(subject: str, event_type: EventType, day: int, **body: str) -> Event:
    return Event(uuid.uuid4(), event_type, subject, datetime(2025, 6, 1, tzinfo=UTC) + timedelta(days=day), "test",
                 body)


async def _waiting_for_a_lock(admin_db: asyncpg.Connection) -> bool:
    return bool(await admin_db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ))
