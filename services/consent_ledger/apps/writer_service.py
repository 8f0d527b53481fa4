"""Runs the ledger writer and the outbox publisher together until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.apps.ledger_writer import LedgerWriter
from consent_ledger.apps.lifecycle import serve_metrics, stop_on_signals, wait_for_dependencies
from consent_ledger.apps.outbox import OutboxPublisher
from consent_ledger.apps.policy_record import record_policy_if_changed
from consent_ledger.config import Settings

log = logging.getLogger("consent_ledger.writer")


async def run_writer_service(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_on_signals()
    serve_metrics(settings)
    if not await wait_for_dependencies(settings, stop):
        return
    assert settings.database_url is not None
    await record_policy_if_changed(settings.database_url, load_timeline(settings.policy_file))
    writer = LedgerWriter(settings)
    outbox = OutboxPublisher(settings)
    await writer.start()
    log.info("ledger writer consuming %s", ", ".join(writer.topics))
    tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(outbox.run(stop))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failure of either stops both, loudly
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await writer.stop()
        log.info("ledger writer stopped after appending %d entries", writer.appended)
