"""The audit API in-process over ASGI, for the integration and end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from consent_ledger.apps.audit_api.app import create_app
from consent_ledger.config import Settings


@contextlib.asynccontextmanager
async def audit_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The audit API in-process, over ASGI: its lifespan (pool, service) runs for as long as the client."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit.test") as client,
    ):
        yield client
