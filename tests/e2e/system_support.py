"""Shared by the end-to-end tests: stream-processor workers, the running system, and waits and checks on them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from consent_ledger.adapters.embedded import free_port
from consent_ledger.adapters.postgres.state_store import folded_watermark
from consent_ledger.apps.publishing import FileReport
from consent_ledger.apps.stack import settings_env
from consent_ledger.config import Settings
from consent_ledger.core.events import Event

TOKENS = {"auditor": "auditor-token", "pipeline": "pipeline-token", "admin": "admin-token"}
DEADLINE = 180.0  # seconds for any one phase; generous, the machine may be shared with another test run
POLL = 0.05
SESSION_TIMEOUT = 10.0


def scale(soak: bool) -> tuple[int, int]:
    """(events, subjects): ~20,000 over ~2,000 subjects, ten times more under --soak."""
    return (200_000, 20_000) if soak else (20_000, 2_000)


@dataclass
class RunningSystem:
    settings: Settings
    client: httpx.AsyncClient
    processor_log: Path
    env: dict[str, str]

    def headers(self, role: str = "auditor") -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[role]}"}

    async def get(self, path: str, role: str = "auditor", **params: Any) -> httpx.Response:
        return await self.client.get(path, params=params, headers=self.headers(role))

    async def wait_folded(self, min_head: int, timeout: float = 60.0) -> dict[str, Any]:
        """Until the ledger holds `min_head` entries and the state tables have folded all of them."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            response = await self.client.get("/readyz")
            body = response.json()
            if body["ledger_head"] >= min_head and body["state_lag"] == 0 and response.status_code == 200:
                return body
            await asyncio.sleep(0.1)
        tail = self.processor_log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"not folded within {timeout}s: {body}\nprocessor log:\n{tail}")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "consent_ledger", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )


@dataclass
class Workers:
    """stream-processor subprocesses, each with its own log; all stopped (or killed) at the end."""

    env: dict[str, str]
    log_dir: Path
    started: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    metrics_ports: list[int] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"stream-processor-{len(self.started) + 1}.log"
        port = free_port()  # each worker's own /metrics, to tell what each one folded
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "consent_ledger", "stream-processor"],
                env={**self.env, "CONSENT_LEDGER_METRICS_PORT": str(port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append((process, log))
        self.metrics_ports.append(port)
        return process

    async def entries_folded(self, index: int) -> float:
        """The worker's `consent_ledger_entries_folded_total` (entries it received and folded or skipped)."""
        return await asyncio.to_thread(_scrape, self.metrics_ports[index - 1], "consent_ledger_entries_folded_total")

    def logs(self, chars: int = 4000) -> str:
        parts = []
        for index, (process, log) in enumerate(self.started, start=1):
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- worker {index} (pid {process.pid}, exit {process.poll()}) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def unexpected_exits(self, killed: set[int]) -> list[int]:
        return [p.pid for p, _ in self.started if p.poll() is not None and p.pid not in killed]

    def stop_all(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                # A worker left stopped (SIGSTOP) by a failed test would never act on the SIGTERM.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process, _ in self.started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class Ledger:
    """Reads the ledger head and the processors' folded watermark (the lowest partition watermark)."""

    connection: asyncpg.Connection
    settings: Settings

    async def head(self) -> int:
        return int(await self.connection.fetchval("SELECT coalesce(max(seq), 0) FROM ledger"))

    async def events(self) -> int:
        return int(await self.connection.fetchval("SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"))

    async def folded(self) -> int:
        return await folded_watermark(self.connection, self.settings.processor_group_id, self.settings.topic_partitions)


async def wait_for(
    check: Callable[[], Awaitable[bool]],
    what: str,
    workers: Workers,
    writer: asyncio.Task[None],
    killed: set[int],
    timeout: float = DEADLINE,
) -> float:
    """Poll `check` until it holds; returns the seconds it took. Fails early if a process died unexpectedly."""
    started = time.monotonic()
    while not await check():
        problem = None
        if writer.done():
            problem = f"the ledger writer stopped: {writer.exception() if not writer.cancelled() else 'cancelled'}"
        elif workers.unexpected_exits(killed):
            problem = f"a stream processor exited: {workers.unexpected_exits(killed)}"
        elif time.monotonic() - started > timeout:
            problem = f"not within {timeout:.0f}s"
        if problem:
            raise AssertionError(f"waiting for {what}: {problem}\n{workers.logs()}")
        await asyncio.sleep(POLL)
    return time.monotonic() - started


def replay(settings: Settings, tmp_path: Path) -> dict[str, Any]:
    """`consent-ledger replay` as a CLI subprocess: exit code 0 and zero differences between live and rebuilt."""
    report_path = tmp_path / "replay.json"
    done = subprocess.run(
        [sys.executable, "-m", "consent_ledger", "replay", "--report", str(report_path)],
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert report_path.exists(), output
    report: dict[str, Any] = json.loads(report_path.read_text())
    state = report["state"]
    summary = {
        table: (t["extra_in_live"], t["missing_from_live"], t["examples_extra"][:2], t["examples_missing"][:2])
        for table, t in state["tables"].items()
    }
    assert done.returncode == 0, f"{output}\n{summary}\n{state['fold_state_differences']}"
    assert state["differences"] == 0, (summary, state["fold_state_differences"])
    assert report["chain"]["first_bad_seq"] is None, report["chain"]
    assert all(t["rebuilt_rows"] > 0 for t in state["tables"].values()), state["tables"]
    return report


def in_chunks(items: list[Event], count: int) -> list[list[Event]]:
    size = -(-len(items) // count)
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_published(report: FileReport, events: int) -> None:
    assert (report.sent, report.failed[:3]) == (events, [])


async def folded_above(ledger: Ledger, seq: int) -> bool:
    return await ledger.folded() > seq


async def folded_to(ledger: Ledger, head: int) -> bool:
    return await ledger.folded() >= head


async def at_least(read: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await read() >= expected


async def has_folded(workers: Workers, index: int) -> bool:
    return await workers.entries_folded(index) > 0


def _scrape(port: int, metric: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0  # not serving yet
    found = re.search(rf"^{metric} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
