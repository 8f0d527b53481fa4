"""Runs one stream-processor worker: the faust app, under faust's own worker and signal handling."""

from __future__ import annotations

import asyncio

import faust

from consent_ledger.adapters.kafka.group_leave import leave_groups_unless_rebalancing
from consent_ledger.apps.lifecycle import serve_metrics, tune_gc, wait_for_dependencies
from consent_ledger.apps.stream_processor import build_app
from consent_ledger.config import Settings


def run_processor_service(settings: Settings) -> None:
    serve_metrics(settings)

    async def ready() -> bool:
        return await wait_for_dependencies(settings, asyncio.Event())

    if not asyncio.run(ready()):
        return
    leave_groups_unless_rebalancing()
    app = build_app(settings)
    tune_gc()
    # faust's Worker owns the event loop and turns SIGTERM/SIGINT into a clean stop (offsets committed).
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
