"""The running system for end-to-end tests: writer in-process, a faust worker subprocess, the API over ASGI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from consent_ledger.apps.audit_api.app import create_app
from consent_ledger.apps.stack import settings_env
from consent_ledger.apps.writer_service import run_writer_service
from consent_ledger.config import Settings

TOKENS = {"auditor": "auditor-token", "pipeline": "pipeline-token", "admin": "admin-token"}


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
            [sys.executable, "-m", "consent_ledger", *args], env=self.env, input=stdin,
            capture_output=True, text=True, timeout=120,
        )


@pytest.fixture
async def system(settings: Settings, tmp_path: Path) -> AsyncIterator[RunningSystem]:
    env = {**os.environ, **settings_env(settings)}
    stop = asyncio.Event()
    writer = asyncio.create_task(run_writer_service(settings, stop))
    log = tmp_path / "stream-processor.log"
    with log.open("wb") as out:
        processor = subprocess.Popen(
            [sys.executable, "-m", "consent_ledger", "stream-processor"], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://audit.test"
        ) as client:
            yield RunningSystem(settings, client, log, env)
    finally:
        stop.set()
        processor.send_signal(signal.SIGTERM)
        try:
            processor.wait(30)
        except subprocess.TimeoutExpired:
            processor.kill()
            processor.wait()
        await asyncio.wait_for(writer, 30)


@pytest.fixture
async def api(settings: Settings, tmp_path: Path) -> AsyncIterator[RunningSystem]:
    """The audit API alone (no writer, no processors): for questions about the HTTP contract itself."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://audit.test"
    ) as client:
        yield RunningSystem(settings, client, tmp_path / "none.log", {**os.environ, **settings_env(settings)})
