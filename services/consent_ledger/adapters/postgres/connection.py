"""Connections and pools to PostgreSQL, with JSON columns decoded to Python values."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import orjson


async def _init_connection(connection: asyncpg.Connection) -> None:
    # Binary format, because COPY (the ledger's bulk append) has no text path for jsonb in asyncpg.
    await connection.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_bytes, decoder=_jsonb_value, format="binary"
    )
    # json's binary form is its text: orjson both ways, as for jsonb (the current state is json, see migration 0004).
    await connection.set_type_codec(
        "json", schema="pg_catalog", encoder=_json_bytes, decoder=_json_value, format="binary"
    )


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_bytes(value: Any) -> bytes:
    # orjson writes the same compact UTF-8 JSON as json.dumps with these options, several times faster;
    # json.dumps takes what orjson refuses (e.g. ints over 64 bits).
    try:
        return orjson.dumps(value)
    except TypeError:
        return _json_text(value).encode()


def _json_value(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # numbers beyond orjson's range; PostgreSQL has arbitrary precision
        return json.loads(bytes(data))


def _jsonb_bytes(value: Any) -> bytes:
    # jsonb's binary form: version 1, then the text.
    return b"\x01" + _json_bytes(value)


def _jsonb_value(data: bytes) -> Any:
    # jsonb's binary form: version 1, then the text (a view: no copy of it).
    return _json_value(memoryview(data)[1:])


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await _init_connection(connection)
    return connection


class _StatelessConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection whose users keep no session state: no SET, LISTEN, cursors or session advisory locks."""

    def get_reset_query(self) -> str:
        # asyncpg otherwise sends a reset statement on every release: a round trip per API request. An open
        # transaction is still rolled back on release (asyncpg does that whatever this returns).
        return ""


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, stateless: bool = False,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool; `stateless` when its users only run statements and transactions (see _StatelessConnection)."""
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection,
        connection_class=_StatelessConnection if stateless else asyncpg.Connection,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool
