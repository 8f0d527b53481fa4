"""Compliance replay: verify the chain, rebuild state from the ledger alone, compare, re-audit receipts, what-if."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import entry_from_row
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.adapters.postgres.state_store import COLUMNS_OF, TABLE_OF, plan_writes
from consent_ledger.apps.audit_api.service import receipt_view
from consent_ledger.apps.lifecycle import tune_gc
from consent_ledger.apps.policy_record import timeline_before
from consent_ledger.apps.progress import progress_bar
from consent_ledger.config import Settings
from consent_ledger.core.eligibility import Decision, decide_eligibility, decide_from_known
from consent_ledger.core.events import format_timestamp, parse_timestamp
from consent_ledger.core.facts import fold_subject
from consent_ledger.core.increments import fold_increments
from consent_ledger.core.ledger import CHAIN_START, ChainLink, LedgerEntry, LinkChecker
from consent_ledger.core.policy import PolicyTimeline
from consent_ledger.core.state import current_state

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
CURRENT_STATE_TABLE = "subject_current_state"
EXAMPLES = 20
COPY_BATCH = 20_000
SHARDS = 2
"""Processes rebuilding, comparing and checking the chain links of a range of subjects each."""


@dataclass
class ReplayReport:
    """Everything the replay found; `ok` only when nothing differs."""

    until: str | None
    chain: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    receipts: dict[str, Any] = field(default_factory=dict)
    what_if: dict[str, Any] | None = None
    entries: int = 0
    subjects: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.chain.get("first_bad_seq") is None
            and self.state.get("differences", 0) == 0
            and self.receipts.get("not_reproduced", 0) == 0
        )


async def run_replay(
    settings: Settings, *, report_path: Path, until: datetime | None, policy_file: Path | None, progress: bool
) -> int:
    assert settings.database_url is not None
    started = time.perf_counter()
    timeline = load_timeline(settings.policy_file)
    alternative = load_timeline(policy_file) if policy_file else None
    report = ReplayReport(until=format_timestamp(until) if until else None)
    at = until or datetime.now(UTC)  # one instant for every shard's what-if answers
    connection = await connect(settings.database_url)
    try:
        total = await connection.fetchval(
            "SELECT count(*) FROM ledger WHERE recorded_at <= $1", until or FAR_FUTURE
        )
        report.entries = total
        shards = await _shards(connection, until, total, SHARDS)
        # The chain is checked up to the last entry known at the cut, as `verify` walks it from seq 1.
        last = None if until is None else await connection.fetchval(
            "SELECT coalesce(max(seq), 0) FROM ledger WHERE recorded_at <= $1", until
        )
        # Each process rebuilds, compares and checks the chain links of a range of subjects: they share nothing
        # and each is CPU-bound in Python (or waits on PostgreSQL), so together they keep both cores busy. The
        # links are checked where the entries are read already: a walk of its own read and decoded every entry
        # again (a third process, 7.6 s of CPU for 1,000,000 entries).
        context = multiprocessing.get_context("spawn")
        rebuilt = context.Value("q", 0)
        with ProcessPoolExecutor(len(shards), mp_context=context, initializer=_share_progress,
                                 initargs=(rebuilt,)) as pool:
            loop = asyncio.get_running_loop()
            rebuilding = [
                loop.run_in_executor(pool, _rebuild_shard_in_process, settings.database_url, until, timeline,
                                     alternative, at, shard)
                for shard in shards
            ]
            # Every subject must fall in exactly one shard: counted here while the shards run, checked after.
            in_ledger = await connection.fetchval(
                "SELECT count(DISTINCT subject_id) FROM ledger WHERE recorded_at <= $1", until or FAR_FUTURE
            )
            outside = await _check_links_outside_subjects(connection, until, last)
            with progress_bar("rebuilding state", total, enabled=progress) as advance:
                shown = 0
                while not all(task.done() for task in rebuilding):
                    await asyncio.wait(rebuilding, timeout=0.25)
                    advance(rebuilt.value - shown)
                    shown = rebuilt.value
            parts = [await task for task in rebuilding]
        report.chain = await _chain_report(connection, [outside, *(part.chain for part in parts)])
        report.state = _merged_states([part.state for part in parts])
        what_if = _merged_what_ifs(alternative, at, [part.what_if for part in parts])
        report.subjects = sum(part.subjects for part in parts)
        if report.subjects != in_ledger:
            report.state["differences"] += abs(in_ledger - report.subjects)
            report.state["subjects_in_ledger"] = in_ledger
        report.receipts = await reaudit_receipts(connection, until, timeline, alternative, what_if)
        report.what_if = what_if
    finally:
        await connection.close()
    report.seconds = round(time.perf_counter() - started, 3)
    # Every process at its peak at once: an upper bound on what the replay needs.
    report.peak_rss_mb = round(_peak_rss_mb() + sum(part.peak_rss_mb for part in parts), 1)
    await asyncio.to_thread(_write_report, report, report_path)
    print(summary(report, report_path))
    return 0 if report.ok else 1


def _write_report(report: ReplayReport, report_path: Path) -> None:
    document = {**report.__dict__, "ok": report.ok}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(document, indent=2, default=str))


def _peak_rss_mb() -> float:
    """This process's peak resident memory: the kernel's VmHWM, not getrusage's ru_maxrss, which Linux carries over
    from the parent through fork and exec (measured: a replay started by a 600 MB parent reported 630 MB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ChainPart = tuple[int, tuple[int, str] | None]
"""A part of the chain check: the entries checked, and the seq and detail of its lowest break, if any."""


def _chain_part(checker: LinkChecker) -> ChainPart:
    found = checker.first_break
    return checker.checked, None if found is None else (found.seq, found.detail)


def _predecessor(row: Sequence[Any], entry: LedgerEntry) -> ChainLink | None:
    """The entry before `entry`, read with it in `row` (its last two columns); None after a gap."""
    if row[10] is not None:
        return ChainLink(entry.seq - 1, row[9], bytes(row[10]))
    return CHAIN_START if entry.seq == 1 else None


async def _entry_before(connection: asyncpg.Connection, seq: int) -> ChainLink:
    """After a gap, the entry follows whichever was stored last before it, as a walk from seq 1 finds."""
    before = await connection.fetchrow(query("ledger", "entry_before"), seq)
    return CHAIN_START if before is None else ChainLink(before[0], before[1], bytes(before[2]))


async def _check_links_outside_subjects(
    connection: asyncpg.Connection, until: datetime | None, last: int | None
) -> ChainPart:
    """The links of the entries no shard reads: receipts, policies, and (in a tampered ledger) entries up to the
    last seq at the cut recorded after it."""
    checker = LinkChecker()
    async with connection.transaction():
        cursor = connection.cursor(query("ledger", "links_outside_subjects"), until or FAR_FUTURE,
                                   2**62 if last is None else last, prefetch=10_000)
        async for row in cursor:
            entry = entry_from_row(row)
            checker.check(_predecessor(row, entry) or await _entry_before(connection, entry.seq), entry)
    return _chain_part(checker)


async def _chain_report(connection: asyncpg.Connection, parts: Sequence[ChainPart]) -> dict[str, Any]:
    """The parts' lowest break is the first a walk from seq 1 meets; it verified every entry before that one."""
    breaks = [found for _, found in parts if found is not None]
    if not breaks:
        return {"verified_entries": sum(checked for checked, _ in parts), "first_bad_seq": None, "detail": None}
    seq, detail = min(breaks)
    before = await connection.fetchval("SELECT count(*) FROM ledger WHERE seq < $1", seq)
    return {"verified_entries": before, "first_bad_seq": seq, "detail": detail}


Shard = tuple[str | None, str | None]
"""Subjects from the first (inclusive) to the second (exclusive); None: unbounded on that side."""

_rebuilt_entries: Any = None  # in a shard process: the parent's shared count of entries rebuilt, for its progress bar


def _share_progress(counter: Any) -> None:
    global _rebuilt_entries
    _rebuilt_entries = counter


async def _shards(connection: asyncpg.Connection, until: datetime | None, total: int, count: int) -> list[Shard]:
    """`count` ranges of subject ids holding about as many of the `total` entries each (any boundaries give the same
    replay: receipts and policies, which have no subject, only shift them a little)."""
    bounds: set[str] = set()
    for k in range(1, count):
        bound = await connection.fetchval(
            "SELECT subject_id FROM ledger WHERE subject_id IS NOT NULL AND recorded_at <= $1 "
            "ORDER BY subject_id OFFSET $2 LIMIT 1", until or FAR_FUTURE, total * k // count,
        )
        if bound is not None:
            bounds.add(bound)
    ordered = sorted(bounds)
    return list(zip([None, *ordered], [*ordered, None], strict=True))


def _in_shard(first_param: int) -> str:
    """The SQL condition `subject_id` in the shard given as parameters $first_param and the next."""
    low, high = f"${first_param}::text", f"${first_param + 1}::text"
    return f"({low} IS NULL OR subject_id >= {low}) AND ({high} IS NULL OR subject_id < {high})"


WhatIfPart = tuple[int, Counter[str], list[dict[str, Any]]]
"""A shard's part of the what-if: conversations checked, changes by answer, the first examples."""


@dataclass(frozen=True)
class ShardResult:
    """What one shard's process found: its part of the state comparison and of the what-if."""

    state: dict[str, Any]
    what_if: WhatIfPart | None
    chain: ChainPart
    subjects: int
    peak_rss_mb: float


def _rebuild_shard_in_process(
    database_url: str, until: datetime | None, timeline: PolicyTimeline, alternative: PolicyTimeline | None,
    at: datetime, shard: Shard,
) -> ShardResult:
    """A rebuilding process: its own event loop and connections; rebuilds, compares and checks one shard."""
    tune_gc()
    state, what_if, chain, subjects = asyncio.run(
        _rebuild_and_compare(database_url, until, timeline, alternative, at, shard)
    )
    return ShardResult(state, what_if, chain, subjects, _peak_rss_mb())


async def _subjects(
    connection: asyncpg.Connection, until: datetime | None, shard: Shard
) -> AsyncIterator[tuple[list[LedgerEntry], list[asyncpg.Record]]]:
    """Each subject's entries in seq order with their rows, one subject at a time: memory bounded by the largest
    subject."""
    current: list[LedgerEntry] = []
    rows: list[asyncpg.Record] = []
    async with connection.transaction():
        cursor = connection.cursor(query("state", "replay_subject_entries"), until or FAR_FUTURE, *shard,
                                   prefetch=10_000)
        async for row in cursor:
            entry = entry_from_row(row)
            if current and current[0].subject_id != entry.subject_id:
                yield current, rows
                current, rows = [], []
            current.append(entry)
            rows.append(row)
    if current:
        yield current, rows


async def _rebuild_and_compare(
    database_url: str, until: datetime | None, timeline: PolicyTimeline, alternative: PolicyTimeline | None,
    at: datetime, shard: Shard,
) -> tuple[dict[str, Any], WhatIfPart | None, ChainPart, int]:
    """Fold the shard's subjects with the processors' code into temporary tables, then diff them with the live ones;
    check the chain link of each entry read (all recorded by the cut, so none past the last seq known then)."""
    reader = await connect(database_url)
    writer = await connect(database_url)  # a second session: the reader's is busy with its cursor
    what_if_changes: Counter[str] = Counter()
    what_if_examples: list[dict[str, Any]] = []
    conversations_checked = 0
    subjects = 0
    checker = LinkChecker()
    try:
        for table in (*TABLE_OF.values(), CURRENT_STATE_TABLE):
            await writer.execute(f"CREATE TEMP TABLE replay_{table} (LIKE {table}) ON COMMIT PRESERVE ROWS")
        pending: dict[type[Any], list[tuple[Any, ...]]] = {cls: [] for cls in TABLE_OF}
        current: list[tuple[str, int, dict[str, Any]]] = []
        unreported = 0
        async for entries, entry_rows in _subjects(reader, until, shard):
            subjects += 1
            subject_id = entries[0].subject_id
            assert subject_id is not None
            for row, entry in zip(entry_rows, entries, strict=True):
                checker.check(_predecessor(row, entry) or await _entry_before(writer, entry.seq), entry)
            changes, facts = fold_increments(subject_id, [], entries, timeline)
            for cls, rows in plan_writes(changes).inserts.items():
                pending[cls].extend(rows)
            current.append((subject_id, entries[-1].seq, current_state(facts)))
            if alternative is not None:
                alt_facts = fold_subject(subject_id, entries, alternative)
                for conversation_id in sorted({f.conversation_id for f in facts.conversations}):
                    conversations_checked += 1
                    before = decide_eligibility(facts, conversation_id, at, timeline)
                    after = decide_eligibility(alt_facts, conversation_id, at, alternative)
                    if _verdict(before) != _verdict(after):
                        what_if_changes[f"{_verdict(before)} -> {_verdict(after)}"] += 1
                        if len(what_if_examples) < EXAMPLES:
                            what_if_examples.append({"subject_id": subject_id, "conversation_id": conversation_id,
                                                     "before": _verdict(before), "after": _verdict(after)})
            unreported += len(entries)
            if sum(len(rows) for rows in pending.values()) >= COPY_BATCH:
                await _flush(writer, pending, current)
                _report_progress(unreported)
                unreported = 0
        await _flush(writer, pending, current)
        _report_progress(unreported)
        state = await _compare(writer, until, shard)
    finally:
        await writer.close()
        await reader.close()
    what_if = (conversations_checked, what_if_changes, what_if_examples) if alternative is not None else None
    return state, what_if, _chain_part(checker), subjects


def _report_progress(entries: int) -> None:
    if _rebuilt_entries is not None:
        with _rebuilt_entries.get_lock():
            _rebuilt_entries.value += entries


def _merged_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One state comparison from the shards': counts added up, the first examples kept."""
    tables: dict[str, Any] = {}
    for part in parts:
        for name, found in part["tables"].items():
            merged = tables.setdefault(name, {"rebuilt_rows": 0, "extra_in_live": 0, "missing_from_live": 0,
                                              "examples_extra": [], "examples_missing": []})
            for key in ("rebuilt_rows", "extra_in_live", "missing_from_live"):
                merged[key] += found[key]
            for key in ("examples_extra", "examples_missing"):
                merged[key] = (merged[key] + found[key])[:EXAMPLES]
    return {
        "differences": sum(part["differences"] for part in parts),
        "tables": tables,
        "fold_state_differences": [d for part in parts for d in part["fold_state_differences"]][:EXAMPLES],
    }


def _merged_what_ifs(
    alternative: PolicyTimeline | None, at: datetime,
    parts: list[WhatIfPart | None],
) -> dict[str, Any] | None:
    if alternative is None:
        return None
    changes: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    checked = 0
    for part in parts:
        assert part is not None
        checked += part[0]
        changes.update(part[1])
        examples.extend(part[2])
    return {
        "timeline_id": alternative.timeline_id,
        "at": format_timestamp(at),
        "conversations_checked": checked,
        "conversations_changed": sum(changes.values()),
        "changes_by_answer": dict(changes),
        "examples": examples[:EXAMPLES],
    }


async def _flush(
    writer: asyncpg.Connection, pending: dict[type[Any], list[tuple[Any, ...]]],
    current: list[tuple[str, int, dict[str, Any]]],
) -> None:
    for cls, rows in pending.items():
        if rows:
            columns = ("subject_id", "fact_hash", *COLUMNS_OF[cls], "known_from", "known_to")
            await writer.copy_records_to_table(f"replay_{TABLE_OF[cls]}", columns=columns, records=rows)
            rows.clear()
    if current:
        await writer.copy_records_to_table(
            f"replay_{CURRENT_STATE_TABLE}", columns=("subject_id", "folded_seq", "state"), records=current
        )
        current.clear()


async def _compare(writer: asyncpg.Connection, until: datetime | None, shard: Shard) -> dict[str, Any]:
    """Rows only in the live tables (`extra`) and only in the rebuild (`missing`), per table, in the shard."""
    cut = until or FAR_FUTURE
    tables: dict[str, Any] = {}
    for cls, table in TABLE_OF.items():
        # fact_hash too: the fold closes a row by its hash, so a row whose hash lies about its content would be
        # left open (or clash with its successor) by the next fold of its subject.
        names = ("subject_id", "fact_hash", *COLUMNS_OF[cls], "known_from", "known_to")
        columns = ", ".join(names[:-1])
        # Knowledge after the cut is not part of this replay: a row closed later was still open then.
        live = (f"SELECT {columns}, CASE WHEN known_to > $1 THEN NULL ELSE known_to END AS known_to "
                f"FROM {table} WHERE known_from <= $1 AND {_in_shard(2)}")
        rebuilt = f"SELECT {columns}, known_to FROM replay_{table}"
        tables[table] = await _compare_table(writer, table, names, live, rebuilt, cut, *shard)
    fold_state = []
    if until is None:
        fold_state = [dict(r) for r in await writer.fetch(query("state", "fold_state_differences"), EXAMPLES,
                                                          *shard)]
        # The current state is "now": only a replay of everything can compare it.
        # As jsonb: json has no equality, and two texts of one value are one state.
        names = ("subject_id", "folded_seq", "state")
        columns = "subject_id, folded_seq, state::jsonb AS state"
        live = f"SELECT {columns} FROM {CURRENT_STATE_TABLE} WHERE {_in_shard(1)}"
        rebuilt = f"SELECT {columns} FROM replay_{CURRENT_STATE_TABLE}"
        tables[CURRENT_STATE_TABLE] = await _compare_table(writer, CURRENT_STATE_TABLE, names, live, rebuilt, *shard)
    differences = len(fold_state) + sum(t["extra_in_live"] + t["missing_from_live"] for t in tables.values())
    return {"differences": differences, "tables": tables, "fold_state_differences": fold_state}


async def _compare_table(
    writer: asyncpg.Connection, table: str, names: Sequence[str], live: str, rebuilt: str, *args: Any
) -> dict[str, Any]:
    """One table's part of the report: rows rebuilt, and the rows only live and only rebuilt, with examples."""
    (n_extra, extra), (n_missing, missing) = await _differences(writer, names, live, rebuilt, *args)
    return {
        "rebuilt_rows": await writer.fetchval(f"SELECT count(*) FROM replay_{table}"),
        "extra_in_live": n_extra,
        "missing_from_live": n_missing,
        "examples_extra": [_jsonable(r) for r in extra],
        "examples_missing": [_jsonable(r) for r in missing],
    }


Difference = tuple[int, list[dict[str, Any]]]
"""How many rows, and the first few."""


async def _differences(
    writer: asyncpg.Connection, names: Sequence[str], live: str, rebuilt: str, *args: Any
) -> tuple[Difference, Difference]:
    """Rows only in `live` and rows only in `rebuilt` (counted as `EXCEPT ALL` each way would), with examples.

    One aggregate over both sides, where each row counts +1 live and -1 rebuilt: half the work of the two
    `EXCEPT ALL`, each of which hashes or sorts both tables.
    """
    columns = ", ".join(names)
    rows = await writer.fetch(
        f"""SELECT * FROM (
              SELECT g.*, row_number() OVER (PARTITION BY g.surplus > 0 ORDER BY {columns}) AS nth,
                     sum(greatest(g.surplus, 0)) OVER () AS extra_total,
                     sum(greatest(-g.surplus, 0)) OVER () AS missing_total
              FROM (SELECT {columns}, sum(side) AS surplus
                    FROM (SELECT *, 1 AS side FROM ({live}) l UNION ALL SELECT *, -1 FROM ({rebuilt}) r) u
                    GROUP BY {columns} HAVING sum(side) <> 0) g
            ) x WHERE nth <= {EXAMPLES}""",
        *args,
    )
    if not rows:
        return (0, []), (0, [])
    extra = [{name: row[name] for name in names} for row in rows if row["surplus"] > 0]
    missing = [{name: row[name] for name in names} for row in rows if row["surplus"] < 0]
    return (int(rows[0]["extra_total"]), extra), (int(rows[0]["missing_total"]), missing)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable_value(v) for k, v in row.items()}


def _jsonable_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _verdict(decision: Decision) -> str:
    return "eligible" if decision.eligible else decision.reasons[0]


async def reaudit_receipts(
    connection: asyncpg.Connection, until: datetime | None, timeline: PolicyTimeline,
    alternative: PolicyTimeline | None, what_if: dict[str, Any] | None,
) -> dict[str, Any]:
    """Re-decide every receipt from the raw ledger (brute force, not the state tables) at its watermark, under the
    policy timeline recorded before it; `reproduced_under` counts the receipts by that timeline."""
    checked = 0
    not_reproduced: list[dict[str, Any]] = []
    hindsight_changes = 0
    what_if_decisions: list[dict[str, Any]] = []
    under: Counter[str] = Counter()
    last = 0
    while True:
        rows = await connection.fetch(query("ledger", "decision_entries"), last, 500)
        if not rows:
            break
        last = rows[-1]["seq"]
        for row in rows:
            receipt = entry_from_row(row)
            if until is not None and receipt.recorded_at > until:
                continue
            checked += 1
            outcome = await _reaudit(connection, receipt, until, timeline, alternative)
            not_reproduced.extend(outcome["mismatches"])
            hindsight_changes += outcome["hindsight_changes"]
            under[outcome["timeline_id"]] += 1
            what_if_decisions.extend(outcome["what_if"])
    if what_if is not None:
        what_if["decision_items_changed"] = len(what_if_decisions)
        what_if["decision_examples"] = what_if_decisions[:EXAMPLES]
    return {
        "receipts_checked": checked,
        "not_reproduced": len(not_reproduced),
        "mismatches": not_reproduced[:EXAMPLES],
        "items_changed_in_hindsight": hindsight_changes,
        "reproduced_under": dict(sorted(under.items())),
    }


async def _reaudit(
    connection: asyncpg.Connection, receipt: LedgerEntry, until: datetime | None, timeline: PolicyTimeline,
    alternative: PolicyTimeline | None,
) -> dict[str, Any]:
    body = receipt.body
    at = parse_timestamp(body["at"])
    watermark = int(body["watermark"])
    results: Sequence[dict[str, Any]] = body["results"]
    # Reproduced under the timeline its answers were given under; hindsight under the one configured now.
    made_under = await timeline_before(connection, receipt.seq) or timeline
    subjects = sorted({r["subject_id"] for r in results})
    rows = await connection.fetch(
        "SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash "
        "FROM ledger WHERE subject_id = ANY($1::text[]) AND recorded_at <= $2 ORDER BY seq",
        subjects, until or FAR_FUTURE,
    )
    by_subject: dict[str, list[LedgerEntry]] = {s: [] for s in subjects}
    for row in rows:
        entry = entry_from_row(row)
        assert entry.subject_id is not None
        by_subject[entry.subject_id].append(entry)
    mismatches, what_if, hindsight = [], [], 0
    for index, stored in enumerate(results):
        subject, conversation = stored["subject_id"], stored["conversation_id"]
        history = by_subject[subject]
        then = [e for e in history if e.seq <= watermark]
        reproduced = receipt_view(decide_from_known(then, subject, conversation, at, made_under))
        recorded_view = {k: stored[k] for k in ("eligible", "basis", "reasons", "policy_version", "evidence_seqs")}
        if reproduced != recorded_view:
            mismatches.append({"decision_id": body["decision_id"], "seq": receipt.seq, "index": index,
                               "recorded": recorded_view, "reproduced": reproduced})
        now = receipt_view(decide_from_known(history, subject, conversation, at, timeline))
        hindsight += now != recorded_view
        if alternative is not None:
            alt = receipt_view(decide_from_known(then, subject, conversation, at, alternative))
            if alt["eligible"] != recorded_view["eligible"] or alt["reasons"] != recorded_view["reasons"]:
                what_if.append({"decision_id": body["decision_id"], "index": index, "recorded": recorded_view,
                                "what_if": alt})
    return {"mismatches": mismatches, "hindsight_changes": hindsight, "what_if": what_if,
            "timeline_id": made_under.timeline_id}


def summary(report: ReplayReport, report_path: Path) -> str:
    lines = [
        f"replay {'OK' if report.ok else 'FOUND DIFFERENCES'}: {report.entries} entries, {report.subjects} subjects, "
        f"{report.seconds:.1f}s ({report.entries / max(report.seconds, 1e-9):,.0f} entries/s), "
        f"peak RSS {report.peak_rss_mb:.0f} MB",
    ]
    chain = report.chain
    if chain.get("first_bad_seq") is None:
        lines.append(f"  chain: intact over {chain.get('verified_entries', 0)} entries")
    else:
        lines.append(f"  chain: BROKEN at seq {chain['first_bad_seq']}: {chain['detail']}")
    for table, result in report.state.get("tables", {}).items():
        lines.append(f"  {table}: {result['rebuilt_rows']} rows rebuilt, {result['extra_in_live']} extra in live, "
                     f"{result['missing_from_live']} missing from live")
        for example in result["examples_extra"][:3]:
            lines.append(f"    extra:   {example}")
        for example in result["examples_missing"][:3]:
            lines.append(f"    missing: {example}")
    if "subjects_in_ledger" in report.state:
        lines.append(f"  subjects: {report.subjects} rebuilt, but the ledger has {report.state['subjects_in_ledger']}")
    for difference in report.state.get("fold_state_differences", [])[:3]:
        lines.append(f"  subject_fold_state differs: {difference}")
    receipts = report.receipts
    lines.append(f"  receipts: {receipts.get('receipts_checked', 0)} re-audited, "
                 f"{receipts.get('not_reproduced', 0)} not reproduced, "
                 f"{receipts.get('items_changed_in_hindsight', 0)} items changed in hindsight")
    for timeline_id, count in receipts.get("reproduced_under", {}).items():
        lines.append(f"    {count:>8}  reproduced under policy timeline {timeline_id}")
    for mismatch in receipts.get("mismatches", [])[:3]:
        lines.append(f"    NOT REPRODUCED: decision {mismatch['decision_id']} item {mismatch['index']}")
    if report.what_if is not None:
        w = report.what_if
        lines.append(f"  what if ({w['timeline_id']}, at {w['at']}): {w['conversations_changed']} of "
                     f"{w['conversations_checked']} conversations change; {w.get('decision_items_changed', 0)} "
                     "decision items change")
        for change, count in sorted(w["changes_by_answer"].items()):
            lines.append(f"    {count:>8}  {change}")
    lines.append(f"  report: {report_path}")
    return "\n".join(lines)
