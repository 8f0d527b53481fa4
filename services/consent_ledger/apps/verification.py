"""Recomputes the ledger's hash chain from seq 1, streaming, and reports the first break."""

from __future__ import annotations

from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import stream_entries
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.apps.progress import progress_bar
from consent_ledger.core.ledger import ChainVerifier


async def verify_ledger(database_url: str, *, batch: int = 20_000, progress: bool = False) -> ChainVerifier:
    connection = await connect(database_url)
    try:
        total = await connection.fetchval(query("ledger", "count_entries"))
        verifier = ChainVerifier()
        with progress_bar("verifying chain", total, enabled=progress) as advance:
            async for entries in stream_entries(connection, batch=batch):
                if verifier.feed(entries) is not None:
                    break
                advance(len(entries))
        return verifier
    finally:
        await connection.close()
