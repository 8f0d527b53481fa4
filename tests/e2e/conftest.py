"""The running system for end-to-end tests: writer in-process, a faust worker subprocess, the API over ASGI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from system_support import RunningSystem, Workers

from audit_client import audit_client
from consent_ledger.apps.stack import settings_env
from consent_ledger.apps.writer_service import run_writer_service
from consent_ledger.config import Settings


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
    try:
        async with audit_client(settings) as client:
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
    async with audit_client(settings) as client:
        yield RunningSystem(settings, client, tmp_path / "none.log", {**os.environ, **settings_env(settings)})


@pytest.fixture
async def writer(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """The ledger writer and outbox in-process, as in the `system` fixture."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_writer_service(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture
async def workers(settings: Settings, tmp_path: Path) -> AsyncIterator[Workers]:
    """stream-processor worker subprocesses that a test starts, stops and signals; all stopped at the end."""
    running = Workers({**os.environ, **settings_env(settings)}, tmp_path)
    try:
        yield running
    finally:
        running.stop_all()
