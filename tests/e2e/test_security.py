"""Security of the audit API: SQL injection is data, errors name no subject, tokens are never logged."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from e2e_history import history
from test_audit_e2e import jsonl

from consent_ledger.config import Settings

INJECTIONS = [
    "' OR 1=1 --",
    "'; DROP TABLE ledger; --",
    "alice' OR '1'='1",
    "alice'; DELETE FROM ledger WHERE '1'='1'; --",
    "\" OR \"\"=\"",
    "alice') UNION SELECT * FROM ledger --",
    "$$; TRUNCATE ledger; $$",
    "\\'; DROP TABLE consent_intervals; --",
    "%' OR subject_id LIKE '%",
    "1 OR 1=1",
]
TABLES = ("ledger", "consent_intervals", "account_intervals", "conversation_facts", "subject_fold_state",
          "processor_progress", "rejected_events")
TOKENS = ("auditor-token", "pipeline-token", "admin-token")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A short processor session timeout: the embedded broker holds a group join for half of it (5 s, not 30 s).
    Debug logs from the processor, for the check that no token reaches them."""
    return settings.model_copy(update={"processor_session_timeout_seconds": 10.0, "log_level": "debug"})


async def populated(system: Any) -> int:
    """The e2e history published and folded; returns the ledger head."""
    events = history()
    published = system.cli("publish", "-", stdin=jsonl(events))
    assert published.returncode == 0, published.stderr
    body = await system.wait_folded(len(events) + 1)  # and the policy.published entry
    return int(body["ledger_head"])


async def table_counts(db: asyncpg.Connection) -> dict[str, int | None]:
    counts: dict[str, int | None] = {}
    for table in TABLES:
        exists = await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
        counts[table] = await db.fetchval(f"SELECT count(*) FROM {table}") if exists else None
    return counts


async def test_sql_injection_in_every_parameter_is_answered_as_data(system: Any, admin_db: asyncpg.Connection) -> None:
    head = await populated(system)
    before = await table_counts(admin_db)
    assert before["ledger"] == head
    assert all(before[t] for t in ("consent_intervals", "account_intervals", "conversation_facts")), before
    auditor, admin = system.headers("auditor"), system.headers("admin")
    asked = 0

    async def ask(method: str, path: str, allowed: set[int], **kwargs: Any) -> Any:
        nonlocal asked
        asked += 1
        response = await system.client.request(method, path, **kwargs)
        assert response.status_code in allowed, (method, path, kwargs, response.status_code, response.text)
        return response

    for payload in INJECTIONS:
        # As a subject or conversation id it is an id nobody has: the answer is about nobody, not about everyone.
        answer = (await ask("GET", "/v1/eligibility", {200}, headers=auditor,
                            params={"subject_id": payload, "conversation_id": "a1"})).json()
        assert (answer["eligible"], answer["reasons"][0], answer["evidence"]) == (False, "unknown_account", [])
        answer = (await ask("GET", "/v1/eligibility", {200}, headers=auditor,
                            params={"subject_id": "alice", "conversation_id": payload})).json()
        assert (answer["eligible"], answer["reasons"][0]) == (False, "unknown_conversation"), answer
        for name in ("at", "known_at"):
            await ask("GET", "/v1/eligibility", {422}, headers=auditor,
                      params={"subject_id": "alice", "conversation_id": "a1", name: payload})

        timeline = await ask("GET", f"/v1/subjects/{quote(payload, safe='')}/timeline", {200, 404}, headers=auditor)
        if timeline.status_code == 200:  # a '/' in the payload may make it another path
            assert timeline.json()["entries"] == []
        await ask("GET", "/v1/subjects/alice/timeline", {422}, headers=auditor, params={"known_at": payload})
        await ask("GET", f"/v1/events/{quote(payload, safe='')}", {404, 422}, headers=auditor)
        await ask("GET", f"/v1/decisions/{quote(payload, safe='')}/audit", {404, 422}, headers=auditor)
        await ask("GET", "/v1/rejections", {422}, headers=admin, params={"after": payload})

        items = [{"subject_id": payload, "conversation_id": "a1"}, {"subject_id": "alice", "conversation_id": payload}]
        batch = (await ask("POST", "/v1/eligibility/batch", {200}, headers=auditor, json={"items": items})).json()
        assert [r["reasons"][0] for r in batch["results"]] == ["unknown_account", "unknown_conversation"]
        for name in ("at", "known_at"):
            await ask("POST", "/v1/eligibility/batch", {422}, headers=auditor, json={"items": items, name: payload})

    # Nothing was dropped, deleted or truncated, and the chain still verifies from the first entry to the last.
    assert await table_counts(admin_db) == before
    verified = system.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    print(f"\n{asked} requests with {len(INJECTIONS)} injection payloads; tables unchanged: {before}")


# Error responses that ask about a subject: each must be the same whether the subject exists or not, and never
# name it. (role, method, path template, request arguments, expected status); {s} is the subject.
ERRORS = [
    (None, "GET", "/v1/subjects/{s}/timeline", {}, 401),
    ("bogus", "GET", "/v1/eligibility", {"params": {"subject_id": "{s}", "conversation_id": "a1"}}, 401),
    ("pipeline", "GET", "/v1/subjects/{s}/timeline", {}, 403),
    ("auditor", "POST", "/v1/decisions", {"json": {"items": [{"subject_id": "{s}", "conversation_id": "a1"}]}}, 403),
    ("pipeline", "GET", "/v1/rejections", {"params": {"after": "{s}"}}, 403),
    ("auditor", "GET", "/v1/eligibility", {"params": {"subject_id": "{s}", "conversation_id": "a1", "at": "x"}},
     422),
    ("auditor", "GET", "/v1/eligibility", {"params": {"subject_id": "{s}"}}, 422),
    ("auditor", "GET", "/v1/subjects/{s}/timeline", {"params": {"known_at": "yesterday"}}, 422),
    ("auditor", "POST", "/v1/eligibility/batch", {"json": {"items": [{"subject_id": "{s}"}]}}, 422),
    ("auditor", "POST", "/v1/eligibility/batch",
     {"json": {"items": [{"subject_id": "{s}", "conversation_id": "a1", "extra": "{s}"}]}}, 422),
    ("pipeline", "POST", "/v1/decisions", {"json": {"items": [{"subject_id": "{s}", "conversation_id": ""}]}}, 422),
    ("auditor", "GET", "/v1/eligibility", {"params": {"subject_id": "{s}" * 40, "conversation_id": "a1"}}, 422),
]


def fill(value: Any, subject: str) -> Any:
    if isinstance(value, str):
        return value.replace("{s}", subject)
    if isinstance(value, dict):
        return {k: fill(v, subject) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, subject) for v in value]
    return value


async def test_error_responses_never_name_the_subject_and_do_not_tell_known_from_unknown(system: Any) -> None:
    await populated(system)
    known = (await system.get("/v1/subjects/alice/timeline")).json()
    assert known["entries"], "alice should be in the ledger"
    for role, method, path, arguments, status in ERRORS:
        bodies = []
        for subject in ("alice", "nobody"):
            headers = {} if role is None else {"Authorization": "Bearer not-a-token"} if role == "bogus" \
                else system.headers(role)
            response = await system.client.request(method, fill(path, subject), headers=headers,
                                                   **fill(arguments, subject))
            assert response.status_code == status, (role, method, path, subject, response.text)
            assert subject not in response.text, (role, method, path, response.text)
            bodies.append(response.text)
        # The same answer for a subject in the ledger and one that never was: nothing to probe for existence.
        assert bodies[0] == bodies[1], (role, method, path, bodies)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record at DEBUG from every logger in this process, from before the system starts."""
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_tokens_are_never_logged(debug_logs: pytest.LogCaptureFixture, system: Any) -> None:
    await populated(system)
    wrong = "not-a-real-token-5f3c9e"
    requests = [
        ("GET", "/v1/eligibility", {"params": {"subject_id": "alice", "conversation_id": "a1"}}),
        ("POST", "/v1/eligibility/batch", {"json": {"items": [{"subject_id": "bob", "conversation_id": "b1"}]}}),
        ("GET", "/v1/subjects/alice/timeline", {}),
        ("GET", "/v1/ledger/head", {}),
        ("GET", "/v1/rejections", {}),
        ("POST", "/v1/decisions", {"json": {"items": [{"subject_id": "alice", "conversation_id": "a1"}]}}),
        ("GET", "/v1/eligibility", {"params": {"subject_id": "alice", "conversation_id": "a1", "at": "bad"}}),
    ]
    statuses = set()
    for token in (*TOKENS, wrong):
        for scheme in ("Bearer", "bearer", "Basic"):
            for method, path, arguments in requests:
                response = await system.client.request(
                    method, path, headers={"Authorization": f"{scheme} {token}"}, **arguments
                )
                statuses.add(response.status_code)
                assert token not in response.text, (method, path, response.text)
    assert {200, 401, 403, 422} <= statuses, statuses
    assert debug_logs.records, "no log records were captured: the check below would prove nothing"
    logged = debug_logs.text
    processor_log = system.processor_log.read_text(errors="replace")
    for token in (*TOKENS, wrong):
        assert token not in logged, f"{token!r} logged in-process"
        assert token not in processor_log, f"{token!r} in the stream processor's log"
    print(f"\n{len(debug_logs.records)} log records in-process, {len(processor_log.splitlines())} lines from the "
          f"processor, no token in any")
