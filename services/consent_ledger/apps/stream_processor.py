"""The stream processors: a faust app folding `ledger.entries` into the current and as-of state tables."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import faust

from consent_ledger.adapters import metrics
from consent_ledger.adapters.kafka.ledger_feed import (
    WatermarkTick,
    merge_announcements,
    partition_of,
    unbroken_runs,
)
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres import state_store
from consent_ledger.adapters.postgres.connection import create_pool
from consent_ledger.adapters.postgres.ledger_store import entry_from_row
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.config import Settings
from consent_ledger.core.facts import SubjectFacts
from consent_ledger.core.increments import fold_increments
from consent_ledger.core.ledger import LedgerEntry
from consent_ledger.core.policy import PolicyTimeline
from consent_ledger.core.state import current_state

log = logging.getLogger("consent_ledger.processor")

# Feed messages per folding transaction: settings.processor_batch_messages. An `entries` message announces up to
# ANNOUNCEMENTS_PER_MESSAGE entries (ledger_feed), a tick none; the entries are read and folded SUBJECTS_PER_CHUNK
# subjects at a time (~1.2 KB an entry in hand). A chunk costs about fifteen round trips to PostgreSQL whatever its
# size, and each subject in it costs its fold state, current state and history once however many of its entries
# the batch holds: in arrival order a subject's entries are some 20,000 apart, so larger batches fold more of
# them at once (bench, one worker, the same code: 128 messages 9,884 entries/s, 512 13,241; peak RSS 281 and
# 313 MB). The outbox publishes what each writer transaction appended (2,000 entries: 500 a partition, and a
# tick to each), so batches must count many messages. A batch only fills when the processors are behind; faust
# waits `within` for it to fill, which adds at most this much to produce -> answerable.
BATCH_WITHIN_SECONDS = 0.2
# Subjects folded between yields to the event loop: a full batch is seconds of CPU, and the consumer's
# heartbeats and the stall watchdog's timer run on the same loop.
SUBJECTS_PER_YIELD = 2_000
CRASH_EXIT_SECONDS = 30.0
# Transactions rolled back by PostgreSQL (deadlock, serialization failure) are folded again this many times in
# all, after a pause growing by this much, before the worker gives up and restarts.
FOLD_ATTEMPTS = 5
FOLD_RETRY_SECONDS = 0.1
# A lost session (PostgreSQL restarting or failing over, the session terminated) is folded again on a new one for
# this long, pausing up to RECONNECT_PAUSE_SECONDS between attempts, before the worker gives up and restarts: a
# restart costs a rebalance of the group and the history cache.
RECONNECT_SECONDS = 60.0
RECONNECT_PAUSE_SECONDS = 2.0
CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,  # 08xxx, and the session found closed under a statement
    asyncpg.AdminShutdownError,  # 57P01: terminated, or PostgreSQL shutting down
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: starting up or in recovery
    OSError,  # refused or reset while PostgreSQL is down
)
UNABLE_TO_CONNECT = "08001"
# Most subjects a transaction folds for what ticks promise beyond the announced entries. Normally a handful; after
# a partition's progress was lost or reset, all its subjects, whose histories would otherwise be held at once.
PROMISED_PER_TRANSACTION = 5_000
# Subjects whose entries and histories are in hand at once while a batch is folded: a batch's memory then grows with
# its announcements (a few dozen bytes a subject), not with its entries.
SUBJECTS_PER_CHUNK = 5_000


def _session_loss(error: BaseException | None) -> BaseException | None:
    """The error that ended the session, if `error` is one or came of one: leaving a transaction on a closed
    session raises InterfaceError ("the underlying connection is closed") over the error that closed it."""
    while error is not None:
        if isinstance(error, CONNECTION_LOST):
            return error
        error = error.__context__
    return None


class HistoryCache:
    """Recently folded subjects' ledger entries and their facts, bounded; a miss reloads from the ledger index."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[int, list[LedgerEntry], SubjectFacts]] = OrderedDict()

    def get(self, subject_id: str, folded_seq: int) -> tuple[list[LedgerEntry], SubjectFacts] | None:
        cached = self._entries.get(subject_id)
        if cached is None or cached[0] != folded_seq:
            return None  # unknown here, or another worker folded it since (a rebalance)
        self._entries.move_to_end(subject_id)
        return cached[1], cached[2]

    def put(self, subject_id: str, folded_seq: int, history: list[LedgerEntry], facts: SubjectFacts) -> None:
        self._entries[subject_id] = (folded_seq, history, facts)
        self._entries.move_to_end(subject_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class SubjectFolder:
    """Folds batches of feed messages into PostgreSQL, exactly once per (subject, seq) whatever the redelivery."""

    def __init__(self, settings: Settings, timeline: PolicyTimeline) -> None:
        self.settings = settings
        self.timeline = timeline
        self.cache = HistoryCache(settings.processor_cache_subjects)
        self.pool: asyncpg.Pool | None = None
        self._unbroken: dict[int, int] = {}
        """Per feed partition, the offset of the last message folded here when every message of the partition
        since a tick whose promise held was folded here too, in offset order, in committed transactions."""
        self._starting = asyncio.Lock()

    async def start(self) -> asyncpg.Pool:
        """Open the pool once; the agent may get its first batch before any start-up task has run."""
        async with self._starting:
            if self.pool is None:
                assert self.settings.database_url is not None
                # A worker frozen inside a fold transaction (SIGSTOP, a stalled VM) keeps its subjects' row locks,
                # and the worker given its partitions would wait as long as it stays frozen. The broker evicts it
                # after the session timeout; PostgreSQL then ends its transaction too.
                idle_ms = int(self.settings.processor_session_timeout_seconds * 1000)
                self.pool = await create_pool(
                    self.settings.database_url, min_size=1, max_size=2, stateless=True,
                    server_settings={"idle_in_transaction_session_timeout": str(idle_ms)},
                )
            return self.pool

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def fold_batch(self, messages: Sequence[tuple[int, bytes]], offsets: Sequence[int] | None = None) -> int:
        """Apply (partition, message) pairs, normally in one transaction; returns how many entries it folded.

        The feed says which subjects have new entries and how far; the entries themselves are read from the
        ledger, so a feed message lost in transit (faust can drop some while it recovers a partition) leaves
        no hole. A watermark tick is checked against the ledger before it is recorded, unless the messages'
        Kafka `offsets` show that nothing of its partition was missed since the last tick that held.
        """
        pool = self.pool or await self.start()
        started = time.perf_counter()
        announced: dict[str, int] = {}
        ticks: dict[int, WatermarkTick] = {}
        for partition, raw in messages:
            tick = merge_announcements(raw, announced)
            if tick is not None and (partition not in ticks or ticks[partition].seq < tick.seq):
                ticks[partition] = tick
        runs = unbroken_runs([partition for partition, _ in messages], offsets)
        # A tick ending an unbroken run from the last tick that held promises only what the run announced, and
        # the run is folded in this batch or was in earlier ones: the ledger scan would find nothing behind.
        trusted = {p for p, (first, _) in runs.items() if self._unbroken.get(p) == first - 1}
        folded = 0
        # Normally one transaction. When the ticks promise more subjects than one should hold (a partition's
        # whole history after its progress was lost or reset: a rebuild), the first folds the announced entries
        # and a share of them, the next ones a share each, and a last one checks the ticks again and records them.
        pending: dict[str, int] = announced
        left: dict[str, int] | None = None
        while True:
            count, done, left = await self._fold_transaction(pool, pending, ticks, trusted, left)
            folded += count
            if done:
                break
            pending = {}
        # Committed: each partition's run now continues from a tick that held, or is broken (or unknown) and
        # its next tick is checked against the ledger again.
        for partition in {p for p, _ in messages}:
            run = runs.get(partition)
            if run is not None and (partition in trusted or partition in ticks):
                self._unbroken[partition] = run[1]
            else:
                self._unbroken.pop(partition, None)
        for partition in ticks:
            metrics.TICKS_RECORDED.labels("feed" if partition in trusted else "ledger").inc()
        metrics.ENTRIES_FOLDED.inc(folded)
        metrics.FOLD_BATCH_SIZE.observe(len(messages))
        metrics.FOLD_LATENCY.observe(time.perf_counter() - started)
        return folded

    async def _fold_transaction(
        self, pool: asyncpg.Pool, announced: dict[str, int], ticks: dict[int, WatermarkTick], trusted: set[int],
        promised: dict[str, int] | None,
    ) -> tuple[int, bool, dict[str, int] | None]:
        """`_fold_once`, folded again when PostgreSQL rolls its transaction back (FOLD_ATTEMPTS in all) or the
        session is lost (for RECONNECT_SECONDS); then the error stops the worker.

        Folding again is safe whatever the first attempt did: a rolled-back attempt left nothing, and one whose
        COMMIT was sent when the session was lost either left nothing or committed, with its fold state, what the
        next attempt then finds folded already. What an attempt cached is keyed by the seq it folded up to, and a
        subject's entries up to a seq always fold to the same facts.
        """
        attempt = 0
        lost_since: float | None = None
        while True:
            attempt += 1
            try:
                return await self._fold_once(pool, announced, ticks, trusted, promised)
            except asyncpg.TransactionRollbackError as error:
                # A deadlock (two workers folding one partition during a rebalance lock its subjects in two
                # rounds each) or a serialization failure.
                if attempt >= FOLD_ATTEMPTS:
                    raise
                sqlstate, pause = error.sqlstate, FOLD_RETRY_SECONDS * attempt
            except (*CONNECTION_LOST, asyncpg.InterfaceError) as error:
                loss = _session_loss(error)
                lost_since = time.monotonic() if lost_since is None else lost_since
                if loss is None or time.monotonic() - lost_since >= RECONNECT_SECONDS:
                    raise
                # The pool replaces a closed session on the next acquire.
                sqlstate = getattr(loss, "sqlstate", None) or UNABLE_TO_CONNECT
                pause = min(RECONNECT_PAUSE_SECONDS, FOLD_RETRY_SECONDS * 2 ** attempt)
            metrics.FOLD_RETRIES.labels(sqlstate).inc()
            log.warning("fold transaction failed (%s); folding the batch again in %.1f s", sqlstate, pause)
            await asyncio.sleep(pause)

    async def _fold_once(
        self, pool: asyncpg.Pool, announced: dict[str, int], ticks: dict[int, WatermarkTick], trusted: set[int],
        promised: dict[str, int] | None,
    ) -> tuple[int, bool, dict[str, int] | None]:
        """One transaction: the announced entries, then up to PROMISED_PER_TRANSACTION subjects of what the ticks
        promise (checked against the ledger here when `promised` is None, else the rest of an earlier check).

        Returns how many entries were folded, whether the ticks were recorded, and what is left of the promise
        (None: check the ticks again).
        """
        async with pool.acquire() as connection, connection.transaction():
            folded = await self._fold_subjects(connection, announced)
            checked = promised is None
            if promised is None:
                # What the ticks promise, once the announced entries are folded: normally nothing is left behind.
                promised = await self._behind_ticks(connection, {p: t for p, t in ticks.items() if p not in trusted})
            share = dict(sorted(promised.items())[:PROMISED_PER_TRANSACTION])
            if share:
                folded += await self._fold_subjects(connection, share)
            left = {s: upto for s, upto in promised.items() if s not in share}
            if checked and not left:
                await state_store.save_progress(
                    connection, self.settings.processor_group_id, {p: t.seq for p, t in ticks.items()}
                )
                return folded, True, None
        return folded, False, left or None

    async def _fold_subjects(self, connection: asyncpg.Connection, announced: dict[str, int]) -> int:
        """Fold each subject's entries up to its announced seq, inside the caller's transaction; how many.

        SUBJECTS_PER_CHUNK subjects at a time, in subject order: what is in hand is a chunk's entries and
        histories whatever the batch's size, and the fold-state rows are still locked in one order by every worker.
        """
        subjects = sorted(announced)
        folded = 0
        for start in range(0, len(subjects), SUBJECTS_PER_CHUNK):
            chunk = {s: announced[s] for s in subjects[start:start + SUBJECTS_PER_CHUNK]}
            folded += await self._fold_chunk(connection, chunk)
        return folded

    async def _fold_chunk(self, connection: asyncpg.Connection, announced: dict[str, int]) -> int:
        """One chunk of `_fold_subjects`: lock the subjects' fold state, read, fold, write; how many entries."""
        state = await state_store.lock_fold_state(connection, list(announced))
        folded = {subject_id: s.seq for subject_id, s in state.items()}
        behind = {s: upto for s, upto in announced.items() if upto > folded[s]}
        # The folded history of a subject is committed and immutable: it is read on the pool's other connection
        # while this transaction reads the new entries, and PostgreSQL runs both queries at once.
        async with asyncio.TaskGroup() as reads:
            reading_entries = reads.create_task(self._entries_to_fold(connection, behind, folded))
            reading_histories = reads.create_task(self._histories(folded, sorted(behind)))
        entries = reading_entries.result()
        histories, kept = reading_histories.result()
        changes = []
        new_state: dict[str, tuple[int, datetime]] = {}
        touched: dict[str, SubjectFacts] = {}
        for count, (subject_id, fresh) in enumerate(entries.items(), 1):
            if count % SUBJECTS_PER_YIELD == 0:
                await asyncio.sleep(0)
            history = histories[subject_id]
            subject_changes, facts = fold_increments(subject_id, history, fresh, self.timeline, kept.get(subject_id))
            changes.extend(subject_changes)
            history.extend(fresh)
            new_state[subject_id] = (fresh[-1].seq, fresh[-1].recorded_at)
            touched[subject_id] = facts
        folded_at = {subject_id: state[subject_id].recorded_at for subject_id in entries}
        await state_store.write_plan(connection, state_store.plan_writes(changes, folded_at))
        await state_store.save_fold_state(connection, new_state)
        await state_store.save_current_state(
            connection, {s: (new_state[s][0], current_state(touched[s])) for s in new_state}
        )
        # Cached as the transaction will leave them; a rollback leaves folded_seq behind, and the cache misses.
        for subject_id, (seq, _) in new_state.items():
            self.cache.put(subject_id, seq, histories[subject_id], touched[subject_id])
        return sum(len(e) for e in entries.values())

    async def _entries_to_fold(
        self, connection: asyncpg.Connection, behind: dict[str, int], folded: dict[str, int]
    ) -> dict[str, list[LedgerEntry]]:
        subjects = sorted(behind)
        rows = await connection.fetch(
            query("state", "entries_to_fold"), subjects, [folded.get(s, 0) for s in subjects],
            [behind[s] for s in subjects],
        )
        entries: dict[str, list[LedgerEntry]] = {}
        for row in rows:
            entry = entry_from_row(row)
            assert entry.subject_id is not None
            entries.setdefault(entry.subject_id, []).append(entry)
        return entries

    async def _behind_ticks(self, connection: asyncpg.Connection, ticks: dict[int, WatermarkTick]) -> dict[str, int]:
        """Subjects of each ticked partition with entries since its last watermark that are folded less far.

        PostgreSQL checks each partition's range against the fold state itself, so only what is behind comes
        back (before, every subject of every range did). One range per partition, never their union: partitions
        are folded at different paces, and a union spanned a million entries at every batch (measured).
        """
        if not ticks:
            return {}
        rows = await connection.fetch(
            query("state", "progress_of"), self.settings.processor_group_id, sorted(ticks)
        )
        previous = {row["partition"]: row["watermark_seq"] for row in rows}
        promised: dict[str, int] = {}
        for partition, tick in sorted(ticks.items()):
            after = previous.get(partition, 0)
            if tick.partitions == 0 or tick.seq <= after:
                continue
            for row in await connection.fetch(query("state", "subjects_behind"), after, tick.seq):
                subject_id = row["subject_id"]
                if partition_of(subject_id, tick.partitions) == partition:
                    promised[subject_id] = max(promised.get(subject_id, 0), row["last_seq"])
        return promised

    async def _histories(
        self, folded: dict[str, int], subjects: list[str]
    ) -> tuple[dict[str, list[LedgerEntry]], dict[str, SubjectFacts]]:
        """Each subject's folded entries (from the cache, or read outside the fold's transaction), and its facts
        where the cache kept them."""
        histories: dict[str, list[LedgerEntry]] = {}
        kept: dict[str, SubjectFacts] = {}
        missing: list[str] = []
        for subject_id in subjects:
            cached = self.cache.get(subject_id, folded.get(subject_id, 0))
            if cached is not None:
                histories[subject_id] = list(cached[0])
                kept[subject_id] = cached[1]
            elif folded.get(subject_id, 0) == 0:
                histories[subject_id] = []
            else:
                missing.append(subject_id)
        if missing:
            upto = max(folded[s] for s in missing)
            for subject_id in missing:
                histories[subject_id] = []
            assert self.pool is not None
            async with self.pool.acquire() as connection:
                rows = await connection.fetch(query("state", "subjects_history"), missing, upto)
            for row in rows:
                entry = entry_from_row(row)
                assert entry.subject_id is not None
                if entry.seq <= folded[entry.subject_id]:
                    histories[entry.subject_id].append(entry)
        return histories, kept


def build_app(settings: Settings) -> faust.App:
    """The faust app: one agent (concurrency 1, at-least-once) folding into PostgreSQL, with a stall watchdog."""
    assert settings.kafka_bootstrap_servers is not None
    app = faust.App(
        settings.processor_group_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        store="memory://",
        processing_guarantee="at_least_once",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        consumer_auto_offset_reset="earliest",
        # How soon a killed worker's partitions move to the others. Some brokers (the embedded Tansu) also hold
        # every group join for half of it, so a worker starting or joining waits that long before folding.
        broker_session_timeout=settings.processor_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.processor_session_timeout_seconds / 3),
        producer_acks=-1,
        web_enabled=False,
        datadir=str(settings.data_dir / "faust"),
        value_serializer="raw",
        key_serializer="raw",
        # Room for two full batches: faust pauses fetching a partition whose buffer is full (default 4,096).
        stream_buffer_maxsize=2 * settings.processor_batch_messages,
    )
    feed = app.topic(
        settings.topics.ledger_entries, key_type=bytes, value_type=bytes,
        partitions=settings.topic_partitions, key_serializer="raw", value_serializer="raw",
    )
    folder = SubjectFolder(settings, load_timeline(settings.policy_file))

    @app.task
    async def open_database() -> None:
        await folder.start()

    @app.agent(feed, concurrency=1)
    async def fold(stream: faust.StreamT[Any]) -> None:
        try:
            batches = stream.take_events(  # type: ignore[attr-defined]
                settings.processor_batch_messages, within=BATCH_WITHIN_SECONDS
            )
            async for events in batches:
                await folder.fold_batch([(event.message.partition, event.value) for event in events],
                                        [event.message.offset for event in events])
        except Exception as error:
            # A crashed agent would leave a live worker folding nothing: stop the worker so that it restarts
            # (nothing is lost: offsets of the failed batch were not committed, and folding is idempotent).
            log.exception("folding failed; stopping this worker")
            # app.crash does not always stop the worker (seen after a PostgreSQL session was ended under it).
            asyncio.get_running_loop().call_later(CRASH_EXIT_SECONDS, os._exit, 1)
            await app.crash(error)
            raise

    last_beat: list[float] = []  # the first tick starts the clock: timers begin only once the app runs
    stopping: list[float] = []

    @app.timer(interval=1.0)
    async def exit_after_a_stall() -> None:
        # A worker whose loop stood still past the session timeout (frozen, or starved) has been evicted and
        # its partitions moved; resuming can leave it alive but folding nothing. Exit so that it is restarted.
        now = time.monotonic()
        stalled = now - last_beat[0] if last_beat else 0.0
        last_beat[:] = [now]
        if stalled > settings.processor_session_timeout_seconds and not stopping:
            log.error("stood still %.0f s, past the %.0f s session timeout; stopping to be restarted",
                      stalled, settings.processor_session_timeout_seconds)
            stopping.append(now)
            # Stop as on SIGTERM, leaving the group unless it is rebalancing (adapters/kafka/group_leave.py); exit
            # anyway if that hangs.
            asyncio.get_running_loop().call_later(CRASH_EXIT_SECONDS, os._exit, 1)
            os.kill(os.getpid(), signal.SIGTERM)

    @app.timer(interval=1.0)
    async def report_lag() -> None:
        if folder.pool is None:
            return
        async with folder.pool.acquire() as connection:
            head = await connection.fetchval("SELECT coalesce(max(seq), 0) FROM ledger")
            folded = await state_store.folded_watermark(
                connection, settings.processor_group_id, settings.topic_partitions
            )
        metrics.STATE_LAG.set(max(0, head - folded))

    app.folder = folder  # type: ignore[attr-defined]
    return app
