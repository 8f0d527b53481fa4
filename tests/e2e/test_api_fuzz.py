"""The audit API fuzzed from its own OpenAPI document (schemathesis): no request, valid or not, gets a 5xx.

The app is reached in-process over ASGI: schemathesis runs the app's lifespan (its database pool) in its own
event-loop thread; the test ends it before the test's database is dropped. One test per operation, each on a
fresh database, so that receipts recorded by POST /v1/decisions do not change what the others see.

(`schemathesis.pytest.from_fixture` would be the usual wiring, but schemathesis 4.32 sets `Function._nodeid`,
which pytest 9.2 no longer has; hypothesis drives each operation's strategy here instead.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from consent_ledger.apps.audit_api.app import create_app
from consent_ledger.config import Settings

# The admin token: every operation admits the admin role, so every operation is reached past authentication.
ADMIN = {"Authorization": "Bearer admin-token"}
MAX_EXAMPLES = 25  # per operation, valid and invalid requests together


def operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the OpenAPI document; building the app touches no server."""
    document: dict[str, Any] = create_app(Settings(database_url="postgresql://unused@127.0.0.1/unused",
                                                   _env_file=None)).openapi()  # type: ignore[call-arg]
    return [(method.upper(), path) for path, item in document["paths"].items() for method in item]


@pytest.fixture
def api_schema(settings: Settings) -> Iterator[Any]:
    # A receipt recorded by POST /v1/decisions is an entry that no processor folds here (none runs), so the
    # questions after it wait for the state and then answer 503: a short wait keeps the fuzzing bounded.
    app = create_app(settings.model_copy(update={"state_wait_seconds": 0.1}))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()  # closes the app's pool while its database still exists


def check_response(case: schemathesis.Case) -> None:
    response = case.call(headers=ADMIN)
    if response.status_code == 503:
        # 503 "state is behind" is the API's contract, not a fault: a question is never answered from state
        # tables that have not folded everything it may see, and no stream processor runs in this test. Only
        # that 503 (or /readyz reporting it) is excused; any other 5xx, a 500 above all, fails below.
        body = response.json()
        assert "needed_seq" in body or body.get("ready") is False, (case.operation.label, response.text)
        return
    case.validate_response(response, checks=[not_a_server_error])


@pytest.mark.parametrize(("method", "path"), operations())
def test_no_request_gets_a_server_error(api_schema: Any, method: str, path: str) -> None:
    operation = api_schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, headers=ADMIN),
        operation.as_strategy(GenerationMode.NEGATIVE, headers=ADMIN),
    )

    # Invalid-data generation may discard many draws, and each example is a database round trip.
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=strategy)
    def fuzz(case: schemathesis.Case) -> None:
        check_response(case)

    fuzz()


# What the fuzzing found (or reading its findings led to), asked every time rather than left to chance: each
# was a 500 before the fix, from PostgreSQL (NUL in text, bigint overflow) or from Python (an offset moving an
# instant out of the years 1 to 9999).
EDGE_REQUESTS = [
    ("GET", "/v1/eligibility", {"params": {"subject_id": "a\x00b", "conversation_id": "c"}}, "subject_id"),
    ("GET", "/v1/eligibility", {"params": {"subject_id": "s", "conversation_id": "\x00"}}, "conversation_id"),
    ("POST", "/v1/eligibility/batch", {"json": {"items": [{"subject_id": "\x00", "conversation_id": "c"}]}},
     "subject_id"),
    ("POST", "/v1/decisions", {"json": {"items": [{"subject_id": "s", "conversation_id": "c\x00"}]}},
     "conversation_id"),
    ("GET", "/v1/subjects/a%00b/timeline", {}, "subject_id"),
    ("GET", "/v1/rejections", {"params": {"after": str(2**63)}}, "after"),
    ("GET", "/v1/eligibility", {"params": {"subject_id": "s", "conversation_id": "c",
                                           "at": "0001-01-01T00:00:00+01:00"}}, "RFC 3339"),
    ("GET", "/v1/eligibility", {"params": {"subject_id": "s", "conversation_id": "c",
                                           "known_at": "9999-12-31T23:59:59-01:00"}}, "RFC 3339"),
    ("POST", "/v1/eligibility/batch", {"json": {"at": "0001-01-01T00:30:00+00:31",
                                                "items": [{"subject_id": "s", "conversation_id": "c"}]}},
     "RFC 3339"),
    ("GET", "/v1/subjects/s/timeline", {"params": {"known_at": "9999-12-31T23:00:00-01:00"}}, "RFC 3339"),
]


@pytest.mark.parametrize(("method", "path", "request_args", "named"), EDGE_REQUESTS)
async def test_edge_inputs_are_malformed_requests_not_server_errors(
    api: Any, method: str, path: str, request_args: dict[str, Any], named: str
) -> None:
    response = await api.client.request(method, path, headers=ADMIN, **request_args)
    assert response.status_code == 422, (response.status_code, response.text)
    assert named in response.text
