"""Serves the audit API with uvicorn until SIGTERM, announcing the address it bound."""

from __future__ import annotations

import logging

import uvicorn

from consent_ledger.apps.audit_api.app import create_app
from consent_ledger.apps.lifecycle import tune_gc
from consent_ledger.config import Settings

log = logging.getLogger("consent_ledger.api")


async def serve(settings: Settings) -> None:
    config = uvicorn.Config(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None,
        access_log=False, lifespan="on",
    )
    server = uvicorn.Server(config)
    tune_gc()
    await server.serve()
