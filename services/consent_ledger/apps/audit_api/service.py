"""Answers eligibility questions from the state tables, with evidence, watermarks and decision receipts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from consent_ledger.adapters.postgres import state_store
from consent_ledger.adapters.postgres.ledger_store import Candidate, append, entry_from_row, read_head
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.apps.policy_record import timeline_before
from consent_ledger.core.eligibility import Decision, decide_eligibility, decide_from_known
from consent_ledger.core.events import format_timestamp, parse_timestamp
from consent_ledger.core.ledger import DECISION_RECORDED, EntryContent, LedgerEntry
from consent_ledger.core.policy import PolicyTimeline

RECEIPT_PRODUCER = "consent-ledger/audit-api"
PARALLEL_ITEMS = 50
"""From this many questions on, they are read in two parts by subject at once, on two sessions: PostgreSQL works on
both on two cores. The snapshot's export and import cost round trips. Lab, in-process, 100 rounds (40 from 100
items), p50 on one session against two: 5 items 1.1 against 1.7 ms, 20 1.7 against 2.1, 35 2.0 against 2.3, 50 2.5
against 2.1, 100 5.1 against 3.8, 400 20.8 against 16.5, 1,000 55.9 against 41.8."""


SAME_POLICY_FILE = (
    "give every service the same CONSENT_LEDGER_POLICY_FILE; after a change of policy, rebuild the state tables "
    "(deploy/OPERATIONS.md, Changing the policy timeline)"
)
"""What to do when the state was folded under another policy timeline than the one asking (API, CLI, /readyz)."""


class StateBehind(RuntimeError):
    """The state tables have not folded everything the question may see yet."""

    def __init__(self, needed: int, folded: int) -> None:
        super().__init__(
            f"state is folded up to seq {folded} but the question sees the ledger up to seq {needed}; "
            "retry shortly (the stream processors are catching up)"
        )
        self.needed = needed
        self.folded = folded


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class Question:
    subject_id: str
    conversation_id: str


def answer_json(
    question: Question, decision: Decision, at: str, known_at: str, watermark: int, evidence: state_store.Cited,
) -> dict[str, Any]:
    """One answer; `at` and `known_at` come formatted, once for all the answers of a request."""
    return {
        "subject_id": question.subject_id,
        "conversation_id": question.conversation_id,
        "at": at,
        "known_at": known_at,
        "eligible": decision.eligible,
        "basis": list(decision.basis),
        "reasons": list(decision.reasons),
        "policy_version": decision.policy_version,
        "evidence": [evidence.as_json(seq) for seq in decision.evidence_seqs if seq in evidence],
        "ledger_watermark": watermark,
    }


def evidence_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "event_id": str(entry.event_id),
        "event_type": entry.event_type,
        "occurred_at": format_timestamp(entry.occurred_at),
        "recorded_at": format_timestamp(entry.recorded_at),
    }


class EligibilityService:
    """Everything the API and CLI ask of the ledger and state; one pool, one policy timeline."""

    def __init__(
        self, pool: asyncpg.Pool, timeline: PolicyTimeline, *, app_id: str, partitions: int,
        state_wait_seconds: float = 2.0,
    ) -> None:
        self.pool = pool
        self.timeline = timeline
        self.app_id = app_id
        self.partitions = partitions
        self.state_wait_seconds = state_wait_seconds
        self._taking_several = asyncio.Lock()

    async def watermark_at(self, connection: asyncpg.Connection, known_at: datetime) -> int:
        row = await connection.fetchrow(query("ledger", "watermark_at"), known_at)
        return 0 if row is None else int(row["seq"])

    async def folded(self, connection: asyncpg.Connection) -> int:
        return await state_store.folded_watermark(connection, self.app_id, self.partitions)

    @asynccontextmanager
    async def _sessions(self, count: int) -> AsyncIterator[list[asyncpg.Connection]]:
        """`count` sessions of the pool. Several are taken under a lock, so that two requests never each hold one
        of the pool's last sessions while waiting for another."""
        async with AsyncExitStack() as stack:
            if count == 1:
                yield [await stack.enter_async_context(self.pool.acquire())]
                return
            async with self._taking_several:
                sessions = [await stack.enter_async_context(self.pool.acquire()) for _ in range(count)]
            yield sessions

    async def _answers(
        self, sessions: Sequence[asyncpg.Connection], questions: Sequence[Question], at: datetime, known_at: datetime,
        watermark: int | None,
    ) -> list[dict[str, Any]]:
        """Every answer from one read: on one session, or in parts by subject on several sharing one snapshot.

        Each part reads the rows that decide its questions, decides them, then reads the evidence the decisions
        show. StateBehind if the state has not folded all the read sees.
        """
        items = [(q.subject_id, q.conversation_id) for q in questions]
        at_text, known_at_text = format_timestamp(at), format_timestamp(known_at)
        ledgers: set[tuple[int, int]] = set()

        async def answered(session: asyncpg.Connection, part: Sequence[int]) -> list[dict[str, Any]]:
            inputs = await state_store.decision_inputs(
                session, [items[i] for i in part], at, known_at, self.app_id, self.partitions
            )
            ledgers.add((inputs.watermark, inputs.folded))
            if len(ledgers) > 1:
                raise RuntimeError("parts of one read saw different ledgers: they must share one snapshot")
            seen = inputs.watermark if watermark is None else watermark
            if inputs.folded < seen:
                raise StateBehind(seen, inputs.folded)
            decisions = [decide_eligibility(inputs.facts[questions[i].subject_id], questions[i].conversation_id,
                                            at, self.timeline) for i in part]
            cited = await state_store.cited_entries(session, {s for d in decisions for s in d.evidence_seqs})
            return [answer_json(questions[i], decision, at_text, known_at_text, seen, cited)
                    for i, decision in zip(part, decisions, strict=True)]

        if len(sessions) == 1:
            return await answered(sessions[0], range(len(items)))
        first, *others = sessions
        async with AsyncExitStack() as stack:
            # Repeatable read on all, the others importing the first's snapshot: every part sees the same ledger,
            # so the parts' watermarks and rows are those of one read.
            await stack.enter_async_context(first.transaction(isolation="repeatable_read", readonly=True))
            snapshot = await first.fetchval("SELECT pg_export_snapshot()")
            for other in others:
                await stack.enter_async_context(other.transaction(isolation="repeatable_read", readonly=True))
                await other.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # an id PostgreSQL made: no quoting
            parts = _split_by_subject(items, len(sessions))
            # Every part to its end before the transactions end: one that raised would leave others mid-statement.
            outcomes = await asyncio.gather(
                *(answered(session, part) for session, part in zip(sessions, parts, strict=False)),
                return_exceptions=True,
            )
        answers: list[dict[str, Any]] = [{} for _ in items]
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            for i, answer in zip(part, outcome, strict=True):
                answers[i] = answer
        return answers

    async def decide(
        self, questions: Sequence[Question], at: datetime | None, known_at: datetime | None,
        *, watermark: int | None = None,
    ) -> list[dict[str, Any]]:
        """Answer every question at one `at` and `known_at` (default: now), in two queries (on two sessions at once
        for many), once everything the question may see is folded (or StateBehind after `state_wait_seconds`).

        With `watermark`, knowledge is cut at that seq instead (how a receipt is reproduced).
        """
        now = datetime.now(UTC)
        at = at or now
        parts = 2 if len(questions) >= PARALLEL_ITEMS and self.pool.get_max_size() >= 2 else 1
        async with self._sessions(parts) as sessions:
            if watermark is not None:
                known_at = await self.recorded_at_of(sessions[0], watermark)
            known_at = known_at or now
            deadline = time.monotonic() + self.state_wait_seconds
            while True:
                try:
                    return await self._answers(sessions, questions, at, known_at, watermark)
                except StateBehind:
                    if time.monotonic() >= deadline:
                        raise
                await asyncio.sleep(0.02)

    async def recorded_at_of(self, connection: asyncpg.Connection, seq: int) -> datetime:
        if seq == 0:
            return datetime(1970, 1, 1, tzinfo=UTC)
        rows = await connection.fetch(query("ledger", "entries_by_seq"), [seq])
        if not rows:
            raise NotFound(f"no ledger entry with seq {seq}")
        recorded_at: datetime = rows[0]["recorded_at"]
        return recorded_at

    async def record_decision(self, questions: Sequence[Question]) -> dict[str, Any]:
        """Evaluate now and append a `decision.recorded` receipt holding the results and the watermark."""
        results = await self.decide(questions, None, None)
        watermark = results[0]["ledger_watermark"] if results else 0
        decision_id = uuid.uuid4()
        now = datetime.now(UTC)
        body = {
            "decision_id": str(decision_id),
            "at": results[0]["at"] if results else format_timestamp(now),
            "watermark": watermark,
            "results": [_receipt_result(r) for r in results],
        }
        content = EntryContent(decision_id, DECISION_RECORDED, None, now, RECEIPT_PRODUCER, body)
        async with self.pool.acquire() as connection, connection.transaction():
            outcome = await append(connection, [Candidate(content)])
        entry = outcome.appended[0]
        return {
            "decision_id": str(decision_id),
            "seq": entry.seq,
            "recorded_at": format_timestamp(entry.recorded_at),
            "watermark": watermark,
            "results": results,
        }

    async def audit_decision(self, decision_id: uuid.UUID) -> dict[str, Any]:
        """Reproduce a receipt from the knowledge at its watermark, and list what hindsight changes."""
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(query("ledger", "entry_by_event_id"), decision_id)
        if row is None or row["event_type"] != DECISION_RECORDED:
            raise NotFound(f"no decision receipt {decision_id}")
        receipt = entry_from_row(row)
        return await self.audit_receipt(receipt)

    async def audit_receipt(self, receipt: LedgerEntry) -> dict[str, Any]:
        body = receipt.body
        stored = list(body["results"])
        questions = [Question(r["subject_id"], r["conversation_id"]) for r in stored]
        at = parse_timestamp(body["at"])
        watermark = int(body["watermark"])
        async with self.pool.acquire() as connection:
            made_under = await timeline_before(connection, receipt.seq) or self.timeline
        reproduced = await self._reproduce(questions, at, watermark, made_under) if questions else []
        mismatches = [
            {"index": i, "recorded": s, "reproduced": r}
            for i, (s, r) in enumerate(zip(stored, reproduced, strict=True))
            if r != s
        ]
        hindsight = await self.decide(questions, at, None) if questions else []
        changed = []
        late_by_subject = await self._late_entries(questions, watermark, at)
        for s, h in zip(stored, hindsight, strict=True):
            if _receipt_result(h) != s:
                changed.append({
                    "subject_id": s["subject_id"],
                    "conversation_id": s["conversation_id"],
                    "recorded": s,
                    "hindsight": _receipt_result(h),
                    "late_events": late_by_subject.get(s["subject_id"], []),
                })
        return {
            "decision_id": body["decision_id"],
            "seq": receipt.seq,
            "recorded_at": format_timestamp(receipt.recorded_at),
            "at": body["at"],
            "watermark": watermark,
            "reproduced": not mismatches,
            "policy_timeline_id": made_under.timeline_id,
            "mismatches": mismatches,
            "hindsight_policy_timeline_id": self.timeline.timeline_id,
            "hindsight_watermark": hindsight[0]["ledger_watermark"] if hindsight else watermark,
            "changed_in_hindsight": changed,
        }

    async def _reproduce(
        self, questions: Sequence[Question], at: datetime, watermark: int, timeline: PolicyTimeline
    ) -> list[dict[str, Any]]:
        """A receipt's results from the knowledge at its watermark, under the timeline it was made under: from the
        state tables when that is this service's, else folded from the receipt's subjects' ledger entries (the
        state tables hold only the intervals of the timeline they were folded under)."""
        if timeline == self.timeline:
            return [_receipt_result(a) for a in await self.decide(questions, at, None, watermark=watermark)]
        subjects = sorted({q.subject_id for q in questions})
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(query("state", "subjects_history"), subjects, watermark)
        known: dict[str, list[LedgerEntry]] = {subject: [] for subject in subjects}
        for row in rows:
            known[row["subject_id"]].append(entry_from_row(row))
        return [
            _decision_result(q, decide_from_known(known[q.subject_id], q.subject_id, q.conversation_id, at, timeline))
            for q in questions
        ]

    async def _late_entries(
        self, questions: Sequence[Question], watermark: int, at: datetime
    ) -> dict[str, list[dict[str, Any]]]:
        """Entries recorded after the watermark about things that happened by `at`: late events."""
        subjects = sorted({q.subject_id for q in questions})
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(query("ledger", "subject_entries_after"), subjects, watermark, at)
        late: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            entry = entry_from_row(row)
            assert entry.subject_id is not None
            late.setdefault(entry.subject_id, []).append(evidence_json(entry))
        return late

    async def head(self) -> dict[str, Any]:
        async with self.pool.acquire() as connection:
            head = await read_head(connection)
        return {
            "seq": head.seq,
            "entry_hash": head.entry_hash.hex(),
            "recorded_at": format_timestamp(head.recorded_at) if head.recorded_at else None,
        }


def _split_by_subject(items: Sequence[tuple[str, str]], parts: int) -> list[list[int]]:
    """At most `parts` lists of the items' indexes, each subject's items in one of them (its rows are read once)."""
    subjects = sorted({subject for subject, _ in items})
    part_of = {subject: i * parts // len(subjects) for i, subject in enumerate(subjects)}
    split: list[list[int]] = [[] for _ in range(parts)]
    for index, (subject, _) in enumerate(items):
        split[part_of[subject]].append(index)
    return [part for part in split if part]


def receipt_view(decision: Decision) -> dict[str, Any]:
    """What a receipt keeps of a decision, beside its question: enough to reproduce it and compare."""
    return {
        "eligible": decision.eligible,
        "basis": list(decision.basis),
        "reasons": list(decision.reasons),
        "policy_version": decision.policy_version,
        "evidence_seqs": list(decision.evidence_seqs),
    }


def _decision_result(question: Question, decision: Decision) -> dict[str, Any]:
    return {"subject_id": question.subject_id, "conversation_id": question.conversation_id, **receipt_view(decision)}


def _receipt_result(answer: Mapping[str, Any]) -> dict[str, Any]:
    """What a receipt keeps of an answer: enough to reproduce and compare, with evidence seqs."""
    return {
        "subject_id": answer["subject_id"],
        "conversation_id": answer["conversation_id"],
        "eligible": answer["eligible"],
        "basis": answer["basis"],
        "reasons": answer["reasons"],
        "policy_version": answer["policy_version"],
        "evidence_seqs": [e["seq"] for e in answer["evidence"]],
    }
