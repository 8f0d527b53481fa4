"""End to end: events published with the CLI, folded by a real faust worker, asked over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from e2e_history import EXPECTED, LATE, history

from consent_ledger.adapters.policy_files import DEFAULT_TIMELINE, load_timeline
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.ledger_store import entry_from_row
from consent_ledger.core.eligibility import decide_from_entries
from consent_ledger.core.events import event_to_json, format_timestamp, parse_timestamp
from consent_ledger.core.ledger import LedgerEntry

ONE_MICROSECOND = timedelta(microseconds=1)


def jsonl(events: list[Any]) -> str:
    return "".join(json.dumps(event_to_json(e)) + "\n" for e in events)


async def ledger_entries(url: str) -> list[LedgerEntry]:
    connection: asyncpg.Connection = await connect(url)
    try:
        return [entry_from_row(r) for r in await connection.fetch("SELECT * FROM ledger ORDER BY seq")]
    finally:
        await connection.close()


async def test_every_rule_answered_right_at_every_instant(system: Any) -> None:
    events = history()
    published = system.cli("publish", "-", stdin=jsonl(events))
    assert published.returncode == 0, published.stderr
    assert f"sent {len(events)}" in published.stdout
    await system.wait_folded(len(events) + 1)  # and the policy.published entry
    head = (await system.get("/v1/ledger/head")).json()["seq"]  # the events and the policy.published entry
    assert head == len(events) + 1

    # The SPEC's codes, each asked where the history makes it the answer.
    for (subject, conversation, at), (eligible, code) in EXPECTED.items():
        response = await system.get("/v1/eligibility", subject_id=subject, conversation_id=conversation, at=at)
        assert response.status_code == 200, response.text
        answer = response.json()
        got = answer["basis"][0] if answer["eligible"] else answer["reasons"][0]
        assert (answer["eligible"], got) == (eligible, code), (subject, conversation, at, answer)
        assert answer["ledger_watermark"] == head
        fields = {"seq", "event_id", "event_type", "occurred_at", "recorded_at"}
        assert all(set(e) == fields for e in answer["evidence"])

    # Before, on and after every event, every conversation agrees with a brute-force fold of the ledger.
    entries = await ledger_entries(system.settings.database_url)
    timeline = load_timeline(None)
    known_at = max(e.recorded_at for e in entries)
    questions = sorted({(e.subject_id, e.body.get("conversation_id", "none")) for e in entries if e.subject_id})
    instants = sorted({t for e in entries for t in (e.occurred_at - ONE_MICROSECOND, e.occurred_at,
                                                    e.occurred_at + ONE_MICROSECOND)})
    asked = 0
    for at in instants:
        items = [{"subject_id": s, "conversation_id": c} for s, c in questions]
        response = await system.client.post(
            "/v1/eligibility/batch", json={"at": format_timestamp(at), "items": items}, headers=system.headers(),
        )
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            subject_entries = [e for e in entries if e.subject_id == result["subject_id"]]
            expected = decide_from_entries(subject_entries, result["subject_id"], result["conversation_id"],
                                           at, known_at, timeline)
            assert (result["eligible"], result["basis"], result["reasons"], result["policy_version"]) == (
                expected.eligible, list(expected.basis), list(expected.reasons), expected.policy_version
            ), (at, result)
            assert [e["seq"] for e in result["evidence"]] == list(expected.evidence_seqs)
            asked += 1
    print(f"checked {asked} answers at {len(instants)} instants against the brute-force fold")


async def test_late_event_changes_known_answer_and_shows_in_receipt_audit(system: Any) -> None:
    events = history()
    assert system.cli("publish", "-", stdin=jsonl(events)).returncode == 0
    await system.wait_folded(len(events) + 1)  # and the policy.published entry
    subject, conversation, at = LATE.question
    before = (await system.get("/v1/eligibility", subject_id=subject, conversation_id=conversation, at=at)).json()
    assert before["eligible"] is True
    head = (await system.get("/v1/ledger/head")).json()

    receipt = await system.client.post(
        "/v1/decisions", json={"items": [{"subject_id": subject, "conversation_id": conversation}]},
        headers=system.headers("pipeline"),
    )
    assert receipt.status_code == 200, receipt.text
    recorded = receipt.json()
    assert recorded["watermark"] == head["seq"]

    assert system.cli("publish", "-", stdin=jsonl(LATE.events)).returncode == 0
    await system.wait_folded(head["seq"] + 1 + len(LATE.events))

    then = (await system.get("/v1/eligibility", subject_id=subject, conversation_id=conversation, at=at,
                             known_at=head["recorded_at"])).json()
    now = (await system.get("/v1/eligibility", subject_id=subject, conversation_id=conversation, at=at)).json()
    assert (then["eligible"], then["ledger_watermark"]) == (True, head["seq"])
    assert (now["eligible"], now["reasons"]) == (False, ["opted_out"])
    late_seq = now["ledger_watermark"]
    assert late_seq in [e["seq"] for e in now["evidence"]]

    audit = (await system.get(f"/v1/decisions/{recorded['decision_id']}/audit")).json()
    assert audit["reproduced"] is True, audit["mismatches"]
    assert audit["policy_timeline_id"] == audit["hindsight_policy_timeline_id"] == "default-2025-09-28"
    [changed] = audit["changed_in_hindsight"]
    assert changed["subject_id"] == subject
    assert changed["hindsight"]["reasons"] == ["opted_out"]
    assert [e["seq"] for e in changed["late_events"]] == [late_seq]

    event = (await system.get(f"/v1/events/{LATE.events[0].event_id}")).json()
    assert event["seq"] == late_seq
    assert event["event"] == event_to_json(LATE.events[0])
    timeline = (await system.get(f"/v1/subjects/{subject}/timeline")).json()
    assert [i["choice"] for i in timeline["consent_intervals"]] == [None, None, "opt_out"]
    assert parse_timestamp(timeline["consent_intervals"][-1]["from"]) == LATE.events[0].occurred_at


ENDPOINTS = [
    ("GET", "/v1/eligibility?subject_id=s&conversation_id=c", {"auditor", "pipeline", "admin"}),
    ("POST", "/v1/eligibility/batch", {"auditor", "pipeline", "admin"}),
    ("GET", "/v1/subjects/s/timeline", {"auditor", "admin"}),
    ("GET", f"/v1/events/{uuid.UUID(int=1)}", {"auditor", "admin"}),
    ("GET", "/v1/ledger/head", {"auditor", "pipeline", "admin"}),
    ("GET", "/v1/rejections", {"admin"}),
    ("POST", "/v1/decisions", {"pipeline", "admin"}),
    ("GET", f"/v1/decisions/{uuid.UUID(int=1)}/audit", {"auditor", "admin"}),
]


async def test_role_matrix(api: Any) -> None:
    body = {"items": [{"subject_id": "s", "conversation_id": "c"}]}
    for method, path, allowed in ENDPOINTS:
        for role, token in [("none", None), ("bogus", "not-a-token"), ("auditor", "auditor-token"),
                            ("pipeline", "pipeline-token"), ("admin", "admin-token")]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await api.client.request(method, path, headers=headers,
                                                   json=body if method == "POST" else None)
            if token is None or role == "bogus":
                expected = {401}
            elif role in allowed:
                # Authorised: 404 for the unknown event or decision asked for; 503 once a receipt is in the
                # ledger, since no stream processor runs here to fold up to it.
                expected = {200, 404, 503}
            else:
                expected = {403}
            assert response.status_code in expected, (method, path, role, response.status_code, response.text)


@pytest.mark.parametrize(("params", "message"), [
    ({"subject_id": "s", "conversation_id": "c", "at": "yesterday"}, "RFC 3339"),
    ({"subject_id": "s", "conversation_id": "c", "known_at": "2025-10-01T00:00:00"}, "RFC 3339"),
    ({"conversation_id": "c"}, "subject_id"),
    ({"subject_id": "x" * 129, "conversation_id": "c"}, "subject_id"),
])
async def test_malformed_questions_get_422_with_a_clear_message(api: Any, params: dict[str, str],
                                                               message: str) -> None:
    response = await api.get("/v1/eligibility", **params)
    assert response.status_code == 422
    assert message in response.text


async def test_the_cli_answers_as_the_api_does_and_says_what_to_do_when_it_cannot(system: Any, tmp_path: Any) -> None:
    events = history()
    assert system.cli("publish", "-", stdin=jsonl(events)).returncode == 0
    await system.wait_folded(len(events) + 1)
    known_at = (await system.get("/v1/ledger/head")).json()["recorded_at"]
    for (subject, conversation, at), (eligible, code) in EXPECTED.items():
        question = ("--subject", subject, "--conversation", conversation, "--at", at, "--known-at", known_at)
        asked = system.cli("eligibility", *question, "--json")
        assert asked.returncode == 0, asked.stderr
        over_http = await system.get("/v1/eligibility", subject_id=subject, conversation_id=conversation, at=at,
                                     known_at=known_at)
        assert json.loads(asked.stdout) == over_http.json()
        readable = system.cli("eligibility", *question).stdout
        assert readable.startswith("ELIGIBLE" if eligible else "NOT ELIGIBLE"), readable
        assert code in readable, readable

    # Asked under another policy timeline than the one the state was folded under: refused, with what to do.
    document = json.loads(DEFAULT_TIMELINE.read_text())
    document["periods"].insert(1, {"policy_version": "v3-test", "from": "2025-07-01T00:00:00.000000Z",
                                   "default_consent_on": True})
    (tmp_path / "timeline.json").write_text(json.dumps(document))
    refused = subprocess.run(
        [sys.executable, "-m", "consent_ledger", "eligibility", "--subject", "alice", "--conversation", "a1",
         "--at", "2025-07-15T00:00:00Z"],
        env={**system.env, "CONSENT_LEDGER_POLICY_FILE": str(tmp_path / "timeline.json")},
        capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 3, refused.stderr
    assert "folded under 'v1-opt-in'" in refused.stderr
    assert "CONSENT_LEDGER_POLICY_FILE" in refused.stderr
    assert "Traceback" not in refused.stderr
