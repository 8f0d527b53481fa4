"""Stream processors stalled: a worker frozen (SIGSTOP) past the session timeout, and one worker under a burst."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
import pytest
from system_support import (
    SESSION_TIMEOUT,
    Ledger,
    Workers,
    at_least,
    check_published,
    folded_to,
    has_folded,
    replay,
    wait_for,
)

from consent_ledger.apps.bench import history
from consent_ledger.apps.publishing import publish_events
from consent_ledger.config import Settings

# The frozen worker is left stopped this long past the session timeout, so the broker has surely evicted it.
STOPPED_PAST_TIMEOUT = 5.0
# The session timeout, a rebalance (Tansu holds joins for half the session timeout) and the fold: ~20 s, tripled;
# the same for each later phase (a rebalance or two, and at most a few thousand entries to fold).
TAKEOVER_DEADLINE = 60.0
TAIL = 500  # events published last, to show which worker still folds
FREEZE_DEADLINE = 20.0  # seconds to try to freeze the worker inside a transaction
# The worker's memory under a burst may grow with what its settings bound, never with the backlog: the history
# cache (at most `processor_cache_subjects` subjects' entries; measured ~1.3 KB of RSS per cached entry: +130 MB
# for 100,000 entries over 10,000 subjects) and a fixed part (faust's and aiokafka's fetch buffers, the batch
# being folded, allocator slack). The bound is that, above the worker's RSS before the burst, and never more than
# 400 MB. A backlog held in memory (~2 KB per feed message, raw and parsed) exceeds it under --soak (100,000
# messages); the CI burst is too small to tell one from the fixed part.
ENTRY_KB = 1.5
FIXED_MB = 64.0
RSS_CAP_MB = 400.0
BURST_DEADLINE = 900.0  # seconds to publish, ingest and fold the burst (~10 s in CI, ~40 s under --soak)


def stall_scale(soak: bool) -> tuple[int, int]:
    """(events, subjects) for the SIGSTOP scenario: ~10 entries per subject, ten times more under --soak."""
    return (100_000, 10_000) if soak else (10_000, 1_000)


def burst_scale(soak: bool) -> tuple[int, int]:
    """(events, subjects) of the burst: 100,000 under --soak, 20,000 in CI, ~10 entries per subject."""
    return (100_000, 10_000) if soak else (20_000, 2_000)


@pytest.mark.slow
async def test_worker_frozen_past_the_session_timeout_is_replaced_and_its_return_corrupts_nothing(
    settings: Settings,
    writer: asyncio.Task[None],
    workers: Workers,
    service_db: asyncpg.Connection,
    tmp_path: Path,
    soak: bool,
) -> None:
    """SIGSTOP freezes a worker without closing anything: its sockets stay open, its PostgreSQL transaction stays
    open with the row locks of the subjects it was folding, and only the missing heartbeats tell the broker. The
    other worker must be given its partitions and fold everything while it is frozen; after SIGCONT the frozen
    worker wakes up believing it still owns them, and must rejoin the group or exit, writing nothing wrong."""
    events, subjects = stall_scale(soak)
    ledger = Ledger(service_db, settings)
    stream = list(history(events, subjects))
    # A third before the freeze, half while frozen, most of the rest after SIGCONT, and a tail for the proof that
    # the returned worker, if still running, is a working member of the group again.
    cut1, cut2, cut3 = events // 3, events // 3 + events // 2, events - TAIL
    killed: set[int] = set()
    frozen: list[str] = []

    async def waited(check: Callable[[], Awaitable[bool]], what: str, timeout: float = TAKEOVER_DEADLINE) -> float:
        """`wait_for`, failing with what PostgreSQL and the workers were doing (a fold stuck on a lock shows)."""
        try:
            return await wait_for(check, what, workers, writer, killed, timeout=timeout)
        except AssertionError as error:
            raise AssertionError(
                f"{error}\nworker 1 was frozen with its PostgreSQL sessions {frozen}\n"
                f"{await _diagnosis(service_db, workers, settings)}"
            ) from None

    first, second = workers.start(), workers.start()
    started = time.monotonic()
    check_published(await publish_events(settings, stream[:cut1]), cut1)
    # Both must hold partitions (each has folded entries) before one is frozen, or there is nothing to take over.
    await wait_for(lambda: _both_folded(workers), "both workers to fold", workers, writer, killed)
    publishing = asyncio.create_task(publish_events(settings, stream[cut1:cut2]))
    # Frozen while busy: the next part of the stream is reaching the ledger, so the workers are folding.
    await wait_for(lambda: at_least(ledger.head, cut1 + 2), "the stream to flow on", workers, writer, killed)
    killed.add(first.pid)  # a frozen (or returned and exited) worker is not a failure of `wait_for`'s kind
    sessions, attempts = await _freeze_inside_a_transaction(service_db, first.pid)
    frozen.extend(sessions)
    stopped = time.monotonic()
    folded_at_stop, head_at_stop = await ledger.folded(), await ledger.head()
    second_at_stop = await workers.entries_folded(2)
    check_published(await publishing, cut2 - cut1)

    await wait_for(lambda: at_least(ledger.events, cut2), "the ledger to hold the events", workers, writer, killed)
    await waited(lambda: folded_to(ledger, cut2 + 1), "the second worker to fold everything")
    taken_over = time.monotonic() - stopped
    second_after = await workers.entries_folded(2)
    assert psutil.Process(first.pid).status() == psutil.STATUS_STOPPED, "the frozen worker was not frozen"
    assert second_after > second_at_stop, (second_at_stop, second_after)
    await asyncio.sleep(max(0.0, SESSION_TIMEOUT + STOPPED_PAST_TIMEOUT - (time.monotonic() - stopped)))

    os.killpg(first.pid, signal.SIGCONT)
    resumed = time.monotonic()
    check_published(await publish_events(settings, stream[cut2:cut3]), cut3 - cut2)
    await waited(lambda: folded_to(ledger, cut3 + 1), "the fold after SIGCONT")
    caught_up = time.monotonic() - resumed
    assert second.poll() is None, workers.logs()
    # Whether the returned worker rejoined: with the other worker stopped, only a member of the group can fold the
    # tail. It may also exit (its PostgreSQL session was ended, or the group moved on without it), even while
    # the tail is folded: then a replacement is started, as an orchestrator would.
    killed.add(second.pid)
    second.send_signal(signal.SIGTERM)
    await asyncio.to_thread(second.wait, 60)
    check_published(await publish_events(settings, stream[cut3:]), TAIL)
    await waited(lambda: _folded_or_exited(ledger, events + 1, first), "the tail to fold")
    if first.poll() is None:
        fate = "rejoined the group and folded the tail alone"
    else:
        fate = f"exited with code {first.returncode}; a replacement folded the tail"
        # A restart back-off, as an orchestrator's. (Replacements never assigned here were not caused by the member
        # that died without leaving, which the broker evicts, but by worker 2 leaving as group leader during the
        # rebalance worker 1's rejoin had started: see adapters/kafka/group_leave.py.)
        await asyncio.sleep(SESSION_TIMEOUT)
        workers.start()
        await waited(lambda: folded_to(ledger, events + 1), "the replacement to fold")
    assert await ledger.head() == events + 1  # and the policy.published entry

    report = replay(settings, tmp_path)
    print(
        f"\nSIGSTOP: {events:,} events over {subjects:,} subjects, two workers; worker 1 frozen "
        f"{stopped - started:.1f}s after start, at folded {folded_at_stop:,} of ledger head {head_at_stop:,}, with "
        f"its PostgreSQL sessions {sessions} ({attempts} attempts); worker 2 had folded everything published "
        f"{taken_over:.1f}s after the freeze (its entries folded: {second_at_stop:,.0f} -> {second_after:,.0f}); "
        f"SIGCONT {resumed - stopped:.1f}s after the freeze; the next {cut3 - cut2:,} events folded "
        f"{caught_up:.1f}s after it; worker 1 {fate}; replay: {report['entries']:,} entries, "
        f"{report['state']['differences']} differences"
    )


@dataclass
class RssSampler:
    """Resident memory of one process, sampled every 0.1 s in a thread, with the kernel's high-water mark."""

    pid: int
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        process = psutil.Process(self.pid)
        while not self._stop.wait(0.1):
            try:
                self.samples.append(process.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def high_water_mb(self) -> float:
        """VmHWM: the peak RSS the kernel saw, including any spike between two samples."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmHWM for pid {self.pid}")


@pytest.mark.slow
async def test_one_worker_under_a_burst_keeps_its_memory_bounded_and_folds_it_all(
    settings: Settings,
    writer: asyncio.Task[None],
    workers: Workers,
    service_db: asyncpg.Connection,
    tmp_path: Path,
    soak: bool,
) -> None:
    events, subjects = burst_scale(soak)
    ledger = Ledger(service_db, settings)
    stream = list(history(events, subjects))
    killed: set[int] = set()
    worker = workers.start()
    sampler = RssSampler(worker.pid)
    sampler.start()
    try:
        # A first few events, so the burst lands on a worker that is already folding (joined, pool open).
        warmup = 100
        check_published(await publish_events(settings, stream[:warmup]), warmup)
        await wait_for(lambda: folded_to(ledger, warmup + 1), "the worker to fold", workers, writer, killed)
        baseline = max(sampler.samples, default=0.0)
        cached = min(subjects, settings.processor_cache_subjects) * events / subjects
        bound = min(RSS_CAP_MB, baseline + FIXED_MB + cached * ENTRY_KB / 1024)
        started = time.monotonic()
        publishing = asyncio.create_task(publish_events(settings, stream[warmup:]))
        # The worker falls behind while the burst is published and ingested: the largest lag seen shows that it
        # was a slow consumer with a backlog, not one keeping pace.
        max_lag, published, ingested = 0, 0.0, 0.0
        while True:
            head, folded_seq = await ledger.head(), await ledger.folded()
            max_lag = max(max_lag, head - folded_seq)
            elapsed = time.monotonic() - started
            if publishing.done() and not published:
                check_published(publishing.result(), events - warmup)
                published = elapsed
            if head == events + 1 and not ingested:
                ingested = elapsed
            if folded_seq >= events + 1:
                break
            assert worker.poll() is None, workers.logs()
            assert not writer.done(), writer
            assert elapsed < BURST_DEADLINE, f"not folded within {BURST_DEADLINE:.0f}s\n{workers.logs()}"
            await asyncio.sleep(0.2)
        folded = time.monotonic() - started
        high_water = sampler.high_water_mb()
    finally:
        sampler.stop()
    peak_sampled = max(sampler.samples)
    assert worker.poll() is None, workers.logs()
    report = replay(settings, tmp_path)
    print(
        f"\nburst: {events:,} events over {subjects:,} subjects to one worker; published in {published:.1f}s, "
        f"ingested in {ingested:.1f}s, folded in {folded:.1f}s; largest fold lag seen {max_lag:,} entries; worker "
        f"RSS: {baseline:.0f} MB before the burst, peak {peak_sampled:.0f} MB sampled ({len(sampler.samples)} "
        f"samples), VmHWM {high_water:.0f} MB (bound {bound:.0f} MB); replay: {report['entries']:,} entries, "
        f"{report['state']['differences']} differences"
    )
    assert high_water < bound, f"peak RSS {high_water:.0f} MB, bound {bound:.0f} MB"
    assert max_lag > events // 10, f"the worker kept pace (largest lag {max_lag}): no backlog was tested"


async def _folded_or_exited(ledger: Ledger, head: int, process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None or await folded_to(ledger, head)


async def _both_folded(workers: Workers) -> bool:
    return await has_folded(workers, 1) and await has_folded(workers, 2)


async def _freeze_inside_a_transaction(connection: asyncpg.Connection, pid: int) -> tuple[list[str], int]:
    """SIGSTOP the worker at a moment when one of its PostgreSQL sessions is inside a transaction (holding the
    row locks of the subjects it is folding), the hardest moment for the worker taking over; the states of its
    sessions and the number of attempts. Each miss is undone with SIGCONT a few milliseconds later."""
    deadline = time.monotonic() + FREEZE_DEADLINE
    attempts = 0
    while True:
        attempts += 1
        os.killpg(pid, signal.SIGSTOP)
        states = await _session_states(connection, pid)
        if "idle in transaction" in states:
            return states, attempts
        if time.monotonic() > deadline:
            return states, attempts  # frozen between transactions: still a freeze past the session timeout
        os.killpg(pid, signal.SIGCONT)
        await asyncio.sleep(random.uniform(0.001, 0.02))


async def _session_states(connection: asyncpg.Connection, pid: int) -> list[str]:
    """The state of each PostgreSQL session of a process ('idle in transaction' holds its row locks)."""
    ports = [c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr]
    rows = await connection.fetch(
        "SELECT state FROM pg_stat_activity WHERE client_port = ANY($1::int[]) ORDER BY state", ports
    )
    return [row["state"] for row in rows]


async def _diagnosis(connection: asyncpg.Connection, workers: Workers, settings: Settings) -> str:
    """Every other session on this database (what it waits for, who blocks it), the fold progress per partition
    and what each worker says it folded."""
    sessions = await connection.fetch(
        "SELECT pid, client_port, state, wait_event_type, wait_event, pg_blocking_pids(pid) AS blocked_by,"
        " now() - xact_start AS in_transaction, left(query, 100) AS query FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY pid"
    )
    progress = await connection.fetch(
        "SELECT partition, watermark_seq FROM processor_progress WHERE app_id = $1 ORDER BY partition",
        settings.processor_group_id,
    )
    folded = [await workers.entries_folded(index) for index in range(1, len(workers.started) + 1)]
    lines = ["PostgreSQL sessions:", *(str(dict(row)) for row in sessions)]
    lines += [f"progress per partition: {[tuple(row) for row in progress]}", f"entries folded per worker: {folded}"]
    return "\n".join(lines)
