"""The audit API's service over real state tables: a large batch read in parts answers as one read would."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from audit_client import audit_client
from consent_ledger.adapters.kafka.ledger_feed import Announcement, announcement_messages, tick_message
from consent_ledger.adapters.policy_files import DEFAULT_TIMELINE, load_timeline
from consent_ledger.adapters.postgres import state_store
from consent_ledger.adapters.postgres.connection import connect, create_pool
from consent_ledger.adapters.postgres.ledger_store import Candidate, append
from consent_ledger.apps.audit_api.service import PARALLEL_ITEMS, EligibilityService, Question, receipt_view
from consent_ledger.apps.bench import history
from consent_ledger.apps.policy_record import record_policy_if_changed
from consent_ledger.apps.replay import reaudit_receipts
from consent_ledger.apps.stream_processor import SubjectFolder
from consent_ledger.config import Settings
from consent_ledger.core.eligibility import decide_from_entries
from consent_ledger.core.ledger import EntryContent, LedgerEntry
from consent_ledger.core.policy import PolicyTimeline

AUDITOR = {"Authorization": "Bearer auditor-token"}
STATE_TABLES = ("consent_intervals", "account_intervals", "conversation_facts", "subject_fold_state",
                "subject_current_state", "processor_progress")


@pytest.fixture
async def folded(settings: Settings) -> list[LedgerEntry]:
    """A 3,000-event history over 120 subjects in the ledger and folded into the state tables."""
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    entries: list[LedgerEntry] = []
    try:
        events = list(history(3000, 120, seed=3))
        for start in range(0, len(events), 500):
            async with connection.transaction():
                candidates = [Candidate(EntryContent.of_event(e)) for e in events[start:start + 500]]
                entries += (await append(connection, candidates)).appended
    finally:
        await connection.close()
    folder = SubjectFolder(settings, load_timeline(None))
    await folder.start()
    try:
        announced = [Announcement(e.subject_id, e.seq) for e in entries if e.subject_id]
        await folder.fold_batch([(0, m) for m in announcement_messages(announced)])
        await folder.fold_batch([(0, tick_message(entries[-1].seq, 1))])
    finally:
        await folder.stop()
    return entries


async def service(settings: Settings, pool_size: int) -> EligibilityService:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=pool_size, stateless=True)
    return EligibilityService(pool, load_timeline(None), app_id=settings.processor_group_id, partitions=1)


async def test_a_batch_read_in_parts_answers_as_the_brute_force_fold(
    settings: Settings, folded: list[LedgerEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read in two parts by subject, each part's evidence after its decisions: every answer, with its evidence, in
    the questions' order."""
    real = state_store.decision_inputs
    reads: list[int] = []

    async def reading(*args: Any) -> state_store.DecisionInputs:
        reads.append(len(args[1]))
        return await real(*args)

    monkeypatch.setattr(state_store, "decision_inputs", reading)
    by_subject: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in folded:
        if entry.subject_id:
            by_subject[entry.subject_id].append(entry)
    questions = sorted({Question(e.subject_id, e.body["conversation_id"])
                        for e in folded if e.subject_id and "conversation_id" in e.body},
                       key=lambda q: (q.subject_id, q.conversation_id))
    assert len(questions) >= PARALLEL_ITEMS  # else the batch would be read in one part
    svc = await service(settings, 4)
    timeline = load_timeline(None)
    known_at = folded[-1].recorded_at
    try:
        occurred = sorted(e.occurred_at for e in folded)
        for at in (occurred[len(occurred) // 3], occurred[-1] + timedelta(days=1)):
            answers = await svc.decide(questions, at, known_at)
            assert [(a["subject_id"], a["conversation_id"]) for a in answers] == [
                (q.subject_id, q.conversation_id) for q in questions]
            assert {a["ledger_watermark"] for a in answers} == {folded[-1].seq}
            verdicts = set()
            for answer in answers:
                expected = decide_from_entries(by_subject[answer["subject_id"]], answer["subject_id"],
                                               answer["conversation_id"], at, known_at, timeline)
                assert (answer["eligible"], answer["basis"], answer["reasons"]) == (
                    expected.eligible, list(expected.basis), list(expected.reasons)), answer
                assert [e["seq"] for e in answer["evidence"]] == list(expected.evidence_seqs), answer
                verdicts.add(answer["eligible"])
            assert verdicts == {True, False}  # the history gives both answers: a comparison that can fail
    finally:
        await svc.pool.close()
    assert (len(reads), sum(reads)) == (4, 2 * len(questions))  # two `at`s, each read in two parts


async def test_large_batches_at_once_on_a_small_pool_all_finish(
    settings: Settings, folded: list[LedgerEntry]
) -> None:
    """Two sessions per large batch: taken together, or two batches would each hold one and wait for the other."""
    questions = [Question(e.subject_id, e.body["conversation_id"])
                 for e in folded if e.subject_id and "conversation_id" in e.body][:PARALLEL_ITEMS]
    svc = await service(settings, 2)
    try:
        asked = [svc.decide(questions, None, None) for _ in range(4)] + [svc.decide(questions[:1], None, None)]
        answers = await asyncio.wait_for(asyncio.gather(*asked), timeout=30)
        assert [len(a) for a in answers] == [PARALLEL_ITEMS] * 4 + [1]
    finally:
        await svc.pool.close()


async def test_the_parts_of_a_batch_see_one_ledger_while_entries_are_appended(
    settings: Settings, folded: list[LedgerEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry committed between the first part's read and the second's is seen by neither: the second session
    imports the first's snapshot (without it, the parts' watermarks differ and the batch is refused). `known_at`
    lies ahead, as for an entry whose `recorded_at` came before the question's but whose commit came after."""
    assert settings.database_url is not None
    real = state_store.decision_inputs
    calls: list[int] = []

    async def reading(*args: Any) -> state_store.DecisionInputs:
        calls.append(len(calls))
        if len(calls) == 2:  # the second part: commit an entry first, on a session of its own
            appender = await connect(settings.database_url)
            try:
                async with appender.transaction():
                    await append(appender, [Candidate(EntryContent.of_event(next(history(1, 1, seed=99))))])
            finally:
                await appender.close()
        return await real(*args)

    monkeypatch.setattr(state_store, "decision_inputs", reading)
    questions = [Question(e.subject_id, e.body["conversation_id"])
                 for e in folded if e.subject_id and "conversation_id" in e.body][:PARALLEL_ITEMS]
    svc = await service(settings, 2)
    try:
        answers = await svc.decide(questions, None, datetime.now(UTC) + timedelta(hours=1))
    finally:
        await svc.pool.close()
    assert len(calls) == 2  # read in two parts
    assert {a["ledger_watermark"] for a in answers} == {folded[-1].seq}  # not the entry appended meanwhile


async def test_parts_that_saw_different_ledgers_are_refused(
    settings: Settings, folded: list[LedgerEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused once both parts are done: raised as soon as one part saw it, the transactions were rolled back under
    the other part's running statement (asyncpg: "another operation is in progress")."""
    real = state_store.decision_inputs
    calls: list[int] = []

    async def reading(*args: Any) -> state_store.DecisionInputs:
        later = len(calls)  # the second part as if read from a later snapshot: one more entry seen and folded
        calls.append(later)
        inputs = await real(*args)
        return dataclasses.replace(inputs, watermark=inputs.watermark + later, folded=inputs.folded + later)

    monkeypatch.setattr(state_store, "decision_inputs", reading)
    questions = [Question(e.subject_id, e.body["conversation_id"])
                 for e in folded if e.subject_id and "conversation_id" in e.body][:PARALLEL_ITEMS]
    svc = await service(settings, 2)
    try:
        with pytest.raises(RuntimeError, match="share one snapshot"):
            await svc.decide(questions, None, None)
    finally:
        await svc.pool.close()
    assert len(calls) == 2


async def test_a_new_policy_timeline_is_refused_until_the_state_is_rebuilt_and_old_receipts_still_reproduce(
    settings: Settings, folded: list[LedgerEntry], admin_db: asyncpg.Connection, tmp_path: Path
) -> None:
    """deploy/OPERATIONS.md, "Changing the policy timeline", step by step: until the state tables are rebuilt, the
    API refuses (503 naming both versions) and is not ready; the writer's recorded policy then ticks every
    partition, the processors fold every subject again under it, and the answers are the new policy's. A receipt
    made before the change is still reproduced exactly, under the timeline it was made under, by the API's audit
    and by the replay; hindsight, under the new one, lists the items the change decides otherwise."""
    document = json.loads(DEFAULT_TIMELINE.read_text())
    document["timeline_id"] = "with-v3"
    document["periods"].insert(1, {"policy_version": "v3-test", "from": "2025-07-15T00:00:00.000000Z",
                                   "default_consent_on": True})
    policy_file = tmp_path / "timeline.json"
    policy_file.write_text(json.dumps(document))
    new = load_timeline(policy_file)
    assert settings.database_url is not None

    async def processors_see_tick(timeline: PolicyTimeline, seq: int) -> None:
        folder = SubjectFolder(settings, timeline)
        await folder.start()
        try:
            await folder.fold_batch([(0, tick_message(seq, 1))])  # the tick the outbox sends after an entry
        finally:
            await folder.stop()

    # What the running writer and processors did: the default timeline recorded, and its tick folded.
    recorded = await record_policy_if_changed(settings.database_url, load_timeline(None))
    assert recorded is not None
    await processors_see_tick(load_timeline(None), recorded)
    at = max(e.occurred_at for e in folded) + timedelta(days=1)
    asked = sorted({(e.subject_id, e.body["conversation_id"])
                    for e in folded if e.subject_id and "conversation_id" in e.body})
    question = {"subject_id": asked[0][0], "conversation_id": asked[0][1], "at": at.isoformat()}
    by_subject: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in folded:
        if entry.subject_id:
            by_subject[entry.subject_id].append(entry)

    # A receipt made now under the default timeline, of items the new one decides otherwise now, and others.
    def decided(subject: str, conversation: str, timeline: PolicyTimeline) -> dict[str, object]:
        return receipt_view(decide_from_entries(by_subject[subject], subject, conversation, now, now, timeline))

    now = datetime.now(UTC)
    differ = [q for q in asked if decided(*q, load_timeline(None)) != decided(*q, new)]
    assert differ  # else the receipt could not tell the two timelines apart
    same = [q for q in asked if q not in differ]
    receipt_items = [*differ[:20], *same[:10]]
    async with audit_client(settings.model_copy(update={"topic_partitions": 1})) as old_api:
        made = await old_api.post("/v1/decisions", headers={"Authorization": "Bearer pipeline-token"}, json={
            "items": [{"subject_id": s, "conversation_id": c} for s, c in receipt_items]})
    assert made.status_code == 200, made.text
    await processors_see_tick(load_timeline(None), made.json()["seq"])  # the tick after the receipt's entry

    async with audit_client(settings.model_copy(update={"policy_file": policy_file, "topic_partitions": 1})) as client:
        refused = await client.get("/v1/eligibility", params=question, headers=AUDITOR)
        assert refused.status_code == 503, refused.text
        # Folded under the default timeline, in which v1-opt-in is in force until 2025-09-28.
        assert (refused.json()["folded_policy_version"], refused.json()["policy_version"]) == ("v1-opt-in", "v3-test")
        assert "policy timeline" in " ".join((await client.get("/readyz")).json()["problems"])

        # The procedure: processors stopped, state tables emptied, the writer restarted with the new file.
        await admin_db.execute(f"TRUNCATE {', '.join(STATE_TABLES)}")
        seq = await record_policy_if_changed(settings.database_url, new)
        assert seq is not None
        await processors_see_tick(new, seq)

        assert (await client.get("/readyz")).json()["problems"] == []
        items = [{"subject_id": subject, "conversation_id": conversation} for subject, conversation in asked]
        answered = await client.post("/v1/eligibility/batch", json={"at": at.isoformat(), "items": items},
                                     headers=AUDITOR)
        assert answered.status_code == 200, answered.text
        known_at = datetime.now(UTC)
        changed = 0
        for answer in answered.json()["results"]:
            subject, conversation = answer["subject_id"], answer["conversation_id"]
            expected = decide_from_entries(by_subject[subject], subject, conversation, at, known_at, new)
            before = decide_from_entries(by_subject[subject], subject, conversation, at, known_at,
                                         load_timeline(None))
            assert (answer["eligible"], answer["reasons"], answer["policy_version"]) == (
                expected.eligible, list(expected.reasons), "v3-test"), answer
            changed += (expected.eligible, expected.reasons) != (before.eligible, before.reasons)
        assert changed > 0  # the new default decides some answers: a comparison that can fail

        audit = await client.get(f"/v1/decisions/{made.json()['decision_id']}/audit", headers=AUDITOR)
        assert audit.status_code == 200, audit.text
        report = audit.json()
        assert (report["reproduced"], report["mismatches"]) == (True, [])
        assert (report["policy_timeline_id"], report["hindsight_policy_timeline_id"]) == (
            load_timeline(None).timeline_id, "with-v3")
        assert {(c["subject_id"], c["conversation_id"]) for c in report["changed_in_hindsight"]} == set(
            receipt_items[:len(differ[:20])])

    connection = await connect(settings.database_url)
    try:
        reaudit = await reaudit_receipts(connection, None, new, None, None)
    finally:
        await connection.close()
    assert (reaudit["receipts_checked"], reaudit["not_reproduced"]) == (1, 0), reaudit["mismatches"]
    assert reaudit["reproduced_under"] == {load_timeline(None).timeline_id: 1}
    assert reaudit["items_changed_in_hindsight"] == len(differ[:20])
