"""End to end: `consent-ledger replay` over a ledger built by the running system, then over tampered copies."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from e2e_history import LATE, history
from test_audit_e2e import jsonl, ledger_entries

from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.core.eligibility import decide_from_entries
from consent_ledger.core.policy import timeline_from_json, timeline_to_json


async def build_ledger(system: Any) -> None:
    events = history()
    assert system.cli("publish", "-", stdin=jsonl(events)).returncode == 0
    await system.wait_folded(len(events) + 1)  # and the policy.published entry
    subject, conversation, _ = LATE.question
    receipt = await system.client.post(
        "/v1/decisions", json={"items": [{"subject_id": subject, "conversation_id": conversation},
                                         {"subject_id": "alice", "conversation_id": "a1"}]},
        headers=system.headers("pipeline"),
    )
    assert receipt.status_code == 200, receipt.text
    assert system.cli("publish", "-", stdin=jsonl(LATE.events)).returncode == 0
    await system.wait_folded(len(events) + 3)  # with the policy.published entry and the receipt


def replay(system: Any, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "replay.json"
    done = system.cli("replay", "--report", str(report), *args)
    return done.returncode, json.loads(report.read_text()), done.stdout + done.stderr


async def test_replay_of_a_clean_ledger_finds_nothing(system: Any, tmp_path: Path) -> None:
    await build_ledger(system)
    code, report, output = replay(system, tmp_path)
    assert code == 0, output
    assert report["ok"] is True
    assert report["chain"]["first_bad_seq"] is None
    assert report["state"]["differences"] == 0
    assert all(t["rebuilt_rows"] > 0 for t in report["state"]["tables"].values())
    assert report["receipts"] == {"receipts_checked": 1, "not_reproduced": 0, "mismatches": [],
                                  "items_changed_in_hindsight": 1,
                                  "reproduced_under": {load_timeline(None).timeline_id: 1}}
    print(output)


async def test_tampering_is_named_and_fails_the_replay(system: Any, admin_db: asyncpg.Connection,
                                                      tmp_path: Path) -> None:
    await build_ledger(system)
    assert replay(system, tmp_path)[0] == 0

    # A derived row altered.
    await admin_db.execute(
        "UPDATE consent_intervals SET consent_on = NOT consent_on "
        "WHERE ctid = (SELECT ctid FROM consent_intervals WHERE subject_id = 'bob' AND choice = 'opt_out' LIMIT 1)"
    )
    code, report, output = replay(system, tmp_path)
    assert code == 1
    table = report["state"]["tables"]["consent_intervals"]
    assert (table["extra_in_live"], table["missing_from_live"]) == (1, 1)
    assert table["examples_extra"][0]["subject_id"] == "bob"
    assert "consent_intervals" in output

    # A derived row deleted.
    await admin_db.execute("UPDATE consent_intervals SET consent_on = NOT consent_on "
                           "WHERE subject_id = 'bob' AND choice = 'opt_out'")
    await admin_db.execute("DELETE FROM conversation_facts WHERE subject_id = 'erin' AND kind = 'deleted'")
    code, report, _ = replay(system, tmp_path)
    assert code == 1
    assert report["state"]["tables"]["conversation_facts"]["missing_from_live"] == 1
    assert report["state"]["tables"]["consent_intervals"]["extra_in_live"] == 0

    # A derived row's fact_hash altered (the fold would no longer find it to close it): one extra, one missing.
    first = await admin_db.fetchrow(
        "SELECT ctid, fact_hash FROM conversation_facts WHERE subject_id = 'erin' ORDER BY seq LIMIT 1"
    )
    await admin_db.execute("UPDATE conversation_facts SET fact_hash = '\\x0f'::bytea WHERE ctid = $1", first["ctid"])
    code, report, _ = replay(system, tmp_path)
    facts = report["state"]["tables"]["conversation_facts"]
    assert (code, facts["extra_in_live"], facts["missing_from_live"]) == (1, 1, 2)  # and the deleted row above
    assert facts["examples_extra"][0]["fact_hash"] == "0f"
    await admin_db.execute("UPDATE conversation_facts SET fact_hash = $1 WHERE fact_hash = '\\x0f'::bytea",
                           first["fact_hash"])

    # A derived row twice (under another fact_hash): counted once extra.
    await admin_db.execute(
        "INSERT INTO account_intervals SELECT subject_id, '\\x00'::bytea, valid_from, valid_to, registered, "
        "account_type, deleted, registered_seq, type_seq, deleted_seq, known_from, known_to "
        "FROM account_intervals WHERE subject_id = 'bob' ORDER BY known_from LIMIT 1"
    )
    code, report, _ = replay(system, tmp_path)
    accounts = report["state"]["tables"]["account_intervals"]
    assert (code, accounts["extra_in_live"], accounts["missing_from_live"]) == (1, 1, 0)
    assert accounts["examples_extra"][0]["subject_id"] == "bob"
    await admin_db.execute("DELETE FROM account_intervals WHERE fact_hash = '\\x00'::bytea")

    # The current-state table altered: bob's account shown as deleted.
    await admin_db.execute(
        "UPDATE subject_current_state SET state = jsonb_set(state::jsonb, '{deleted}', 'true')"
        " WHERE subject_id = 'bob'"
    )
    code, report, output = replay(system, tmp_path)
    assert code == 1
    current = report["state"]["tables"]["subject_current_state"]
    assert (current["extra_in_live"], current["missing_from_live"]) == (1, 1)
    assert current["examples_extra"][0]["subject_id"] == "bob"
    assert "subject_current_state" in output
    await admin_db.execute(
        "UPDATE subject_current_state SET state = jsonb_set(state::jsonb, '{deleted}', 'false')"
        " WHERE subject_id = 'bob'"
    )

    # A decision receipt's stored results altered by a superuser who bypasses the append-only guard.
    receipt_seq = await admin_db.fetchval("SELECT seq FROM ledger WHERE event_type = 'decision.recorded'")
    async with admin_db.transaction():
        await admin_db.execute("SET LOCAL session_replication_role = replica")
        await admin_db.execute(
            "UPDATE ledger SET body = jsonb_set(body, '{results,1,eligible}', 'false') WHERE seq = $1", receipt_seq
        )
    code, report, output = replay(system, tmp_path)
    assert code == 1
    assert report["chain"]["first_bad_seq"] == receipt_seq
    assert report["receipts"]["not_reproduced"] == 1
    assert report["receipts"]["mismatches"][0]["index"] == 1
    assert f"BROKEN at seq {receipt_seq}" in output

    # An event altered in the middle of the ledger.
    async with admin_db.transaction():
        await admin_db.execute("SET LOCAL session_replication_role = replica")
        await admin_db.execute("UPDATE ledger SET producer = 'forged' WHERE seq = 5")
    code, report, _ = replay(system, tmp_path)
    assert (code, report["chain"]["first_bad_seq"]) == (1, 5)


async def test_what_if_changes_exactly_what_brute_force_says(system: Any, tmp_path: Path) -> None:
    await build_ledger(system)
    default = load_timeline(None)
    moved = timeline_to_json(default)
    moved["timeline_id"] = "switch-moved-to-2025-10-06"
    moved["periods"][1]["from"] = "2025-10-06T00:00:00.000000Z"
    alternative = timeline_from_json(moved)
    policy = tmp_path / "moved.json"
    policy.write_text(json.dumps(moved))

    code, report, output = replay(system, tmp_path, "--policy", str(policy))
    assert code == 0, output  # a what-if is an answer, not a discrepancy

    entries = await ledger_entries(system.settings.database_url)
    at = datetime.fromisoformat(report["what_if"]["at"].replace("Z", "+00:00")).astimezone(UTC)
    expected: Counter[str] = Counter()
    pairs = sorted({(e.subject_id, e.body["conversation_id"]) for e in entries
                    if e.subject_id and "conversation_id" in e.body})
    for subject, conversation in pairs:
        subject_entries = [e for e in entries if e.subject_id == subject]
        verdicts = []
        for timeline in (default, alternative):
            decision = decide_from_entries(subject_entries, subject, conversation, at, at, timeline)
            verdicts.append("eligible" if decision.eligible else decision.reasons[0])
        if verdicts[0] != verdicts[1]:
            expected[f"{verdicts[0]} -> {verdicts[1]}"] += 1
    assert report["what_if"]["conversations_checked"] == len(pairs)
    assert report["what_if"]["changes_by_answer"] == dict(expected)
    assert sum(expected.values()) > 0, "the moved switch date should change some answers in this history"
