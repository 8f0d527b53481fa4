"""Named SQL queries, kept in `queries/*.sql` under `-- name: <query>` headers and loaded once."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def _load(group: str) -> dict[str, str]:
    text = (resources.files("consent_ledger.adapters.postgres") / "queries" / f"{group}.sql").read_text()
    parts = _HEADER.split(text)
    # parts = [preamble, name1, sql1, name2, sql2, ...]
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def query(group: str, name: str) -> str:
    """The SQL of query `name` in `queries/<group>.sql`; a KeyError names the missing query."""
    queries = _load(group)
    if name not in queries:
        raise KeyError(f"no query {name!r} in queries/{group}.sql")
    return queries[name]
