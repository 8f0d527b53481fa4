"""Connections and pools to PostgreSQL, with JSON columns decoded to Python values."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def _init_connection(connection: asyncpg.Connection) -> None:
    # Binary format, because COPY (the ledger's bulk append) has no text path for jsonb in asyncpg.
    await connection.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_bytes, decoder=_jsonb_value, format="binary"
    )
    await connection.set_type_codec("json", schema="pg_catalog", encoder=_json_text, decoder=json.loads)


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _jsonb_bytes(value: Any) -> bytes:
    return b"\x01" + _json_text(value).encode()  # jsonb's binary form: version 1, then the text


def _jsonb_value(data: bytes) -> Any:
    return json.loads(data[1:])


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await _init_connection(connection)
    return connection


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection)
    assert pool is not None
    return pool
