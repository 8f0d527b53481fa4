"""HTTP routes of the audit API (FastAPI): SPEC section 6 paths and field names, bearer-token roles."""

from __future__ import annotations

import base64
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consent_ledger.adapters import metrics
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres.connection import create_pool
from consent_ledger.adapters.postgres.ledger_store import entry_from_row
from consent_ledger.adapters.postgres.migrations import pending_migrations
from consent_ledger.adapters.postgres.queries import query
from consent_ledger.adapters.postgres.state_store import consent_timeline
from consent_ledger.apps.audit_api.service import (
    SAME_POLICY_FILE,
    EligibilityService,
    NotFound,
    Question,
    StateBehind,
)
from consent_ledger.apps.policy_record import differs_from_recorded
from consent_ledger.config import Settings
from consent_ledger.core.eligibility import FoldedUnderAnotherPolicy
from consent_ledger.core.events import MAX_SUBJECT_ID_LENGTH, format_timestamp, parse_timestamp
from consent_ledger.core.ledger import LedgerEntry

AUDITOR, PIPELINE, ADMIN = "auditor", "pipeline", "admin"
ANSWERING = frozenset({AUDITOR, PIPELINE, ADMIN})
AUDITING = frozenset({AUDITOR, ADMIN})
RECORDING = frozenset({PIPELINE, ADMIN})
ADMINISTERING = frozenset({ADMIN})

# PostgreSQL text cannot hold NUL: an id with one is malformed (422), never a query that fails (500).
NO_NUL = r"^[^\x00]*$"
# ids of rejections are bigints: a larger `after` is malformed, not a query that fails.
MAX_BIGINT = 2**63 - 1

bearer = HTTPBearer(auto_error=False, description="a token configured for the auditor, pipeline or admin role")


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject_id: str = Field(min_length=1, max_length=MAX_SUBJECT_ID_LENGTH, pattern=NO_NUL)
    conversation_id: str = Field(min_length=1, max_length=256, pattern=NO_NUL)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: str | None = Field(None, description="RFC 3339 instant; default now")
    known_at: str | None = Field(None, description="RFC 3339 knowledge cut; default now")
    items: list[Item] = Field(min_length=1)


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Item] = Field(min_length=1)


def instant(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        raise HTTPException(
            422, f"{name} must be an RFC 3339 timestamp with a UTC offset, e.g. 2025-10-01T12:00:00.000000Z"
        ) from None


def fast_json(content: dict[str, Any]) -> Response:
    """Answers are built from JSON-ready values already: orjson encodes them, skipping FastAPI's re-encoding."""
    return Response(orjson.dumps(content), media_type="application/json")


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "recorded_at": format_timestamp(entry.recorded_at),
        "entry_hash": entry.entry_hash.hex(),
        "event": entry.content.as_json(),
    }


class LatencyMetrics:
    """Observes each request's latency by route, method and status: plain ASGI, because Starlette's
    BaseHTTPMiddleware runs every request through extra tasks and streams (a third of a question's time)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router records the matched route in the scope it was given.
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.API_LATENCY.labels(path, scope["method"], str(status)).observe(time.perf_counter() - started)


async def service(request: Request) -> EligibilityService:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop that cost more than the question.
    svc: EligibilityService = request.app.state.service
    return svc


Service = Annotated[EligibilityService, Depends(service)]


def create_app(settings: Settings) -> FastAPI:
    tokens = settings.tokens_by_role()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert settings.database_url is not None
        # Generic plans: PostgreSQL kept re-planning the question's statement (1.3 ms of planning against 0.6 ms of
        # execution for one item), as its cost model underrates planning; the generic plan is as fast at 1,000 items.
        pool = await create_pool(settings.database_url, min_size=2, max_size=10, stateless=True,
                                 server_settings={"plan_cache_mode": "force_generic_plan"})
        app.state.pool = pool
        app.state.service = EligibilityService(
            pool, load_timeline(settings.policy_file), app_id=settings.processor_group_id,
            partitions=settings.topic_partitions, state_wait_seconds=settings.state_wait_seconds,
        )
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="Consent ledger audit API",
        version="1",
        description="Was this conversation eligible for training at instant T, why, and what did we know then.",
        lifespan=lifespan,
    )

    def role_of(credentials: HTTPAuthorizationCredentials | None) -> str:
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        presented = credentials.credentials.encode()
        role = None
        for token, token_role in tokens.items():
            # Compare against every token, in constant time, so timing tells nothing about which matched.
            if hmac.compare_digest(presented, token.encode()):
                role = token_role
        if role is None:
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return role

    def allow(roles: frozenset[str]) -> Callable[..., Awaitable[str]]:
        async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
            role = role_of(credentials)
            if role not in roles:
                raise HTTPException(403, f"role {role!r} may not do this; it needs one of {sorted(roles)}")
            return role
        return check

    @app.exception_handler(StateBehind)
    async def state_behind(_request: Request, error: StateBehind) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error), "needed_seq": error.needed, "folded_seq": error.folded},
            status_code=503, headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, error: RequestValidationError) -> JSONResponse:
        # What is wrong and where, never the value sent: FastAPI's default echoes it (`input`), which would put
        # the subject ids of a malformed question into the answer, and differ between a known and an unknown one.
        detail = [{key: value for key, value in e.items() if key != "input"} for e in error.errors()]
        return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)

    @app.exception_handler(FoldedUnderAnotherPolicy)
    async def folded_under_another_policy(_request: Request, error: FoldedUnderAnotherPolicy) -> JSONResponse:
        # Not the question's fault and not transient: the services were given different policy files.
        return JSONResponse({
            "detail": f"{error}: {SAME_POLICY_FILE}",
            "folded_policy_version": error.folded_version, "policy_version": error.policy_version,
        }, status_code=503)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    app.add_middleware(LatencyMetrics)

    @app.get("/v1/eligibility", dependencies=[Depends(allow(ANSWERING))])
    async def eligibility(
        svc: Service,
        subject_id: Annotated[str, Query(min_length=1, max_length=MAX_SUBJECT_ID_LENGTH, pattern=NO_NUL)],
        conversation_id: Annotated[str, Query(min_length=1, max_length=256, pattern=NO_NUL)],
        at: str | None = None,
        known_at: str | None = None,
    ) -> Response:
        """One decision (SPEC section 5) for a conversation at `at` as known at `known_at`."""
        answers = await svc.decide(
            [Question(subject_id, conversation_id)], instant(at, "at"), instant(known_at, "known_at")
        )
        return fast_json(answers[0])

    @app.post("/v1/eligibility/batch", dependencies=[Depends(allow(ANSWERING))])
    async def eligibility_batch(svc: Service, request: BatchRequest) -> Response:
        """Many decisions at one `at` and `known_at`, answered in a few queries."""
        if len(request.items) > settings.batch_max_items:
            raise HTTPException(422, f"a batch holds at most {settings.batch_max_items} items; split it")
        questions = [Question(i.subject_id, i.conversation_id) for i in request.items]
        results = await svc.decide(questions, instant(request.at, "at"), instant(request.known_at, "known_at"))
        watermark = results[0]["ledger_watermark"]
        return fast_json({"at": results[0]["at"], "known_at": results[0]["known_at"], "ledger_watermark": watermark,
                          "results": results})

    @app.get("/v1/subjects/{subject_id}/timeline", dependencies=[Depends(allow(AUDITING))])
    async def timeline(
        svc: Service, subject_id: Annotated[str, Path(pattern=NO_NUL)], known_at: str | None = None
    ) -> dict[str, Any]:
        """Consent intervals and the subject's ledger entries, as known at `known_at`."""
        cut = instant(known_at, "known_at")
        async with svc.pool.acquire() as connection:
            cut = cut or await connection.fetchval("SELECT clock_timestamp()")
            assert cut is not None
            watermark = await svc.watermark_at(connection, cut)
            intervals = await consent_timeline(connection, subject_id, cut)
            rows = await connection.fetch(query("ledger", "subject_entries"), subject_id, cut)
        return {
            "subject_id": subject_id,
            "known_at": format_timestamp(cut),
            "ledger_watermark": watermark,
            "consent_intervals": [
                {
                    "from": format_timestamp(i.valid_from) if i.valid_from else None,
                    "to": format_timestamp(i.valid_to) if i.valid_to else None,
                    "consent_on": i.consent_on,
                    "choice": i.choice,
                    "policy_version": i.policy_version,
                    "source_seq": i.source_seq,
                }
                for i in intervals
            ],
            "entries": [entry_json(entry_from_row(row)) for row in rows],
        }

    @app.get("/v1/events/{event_id}", dependencies=[Depends(allow(AUDITING))])
    async def event(svc: Service, event_id: uuid.UUID) -> dict[str, Any]:
        """The ledger entry of an event: seq, recorded_at, entry_hash and the event."""
        async with svc.pool.acquire() as connection:
            row = await connection.fetchrow(query("ledger", "entry_by_event_id"), event_id)
        if row is None:
            raise HTTPException(404, f"no ledger entry for event_id {event_id}")
        return entry_json(entry_from_row(row))

    @app.get("/v1/ledger/head", dependencies=[Depends(allow(ANSWERING))])
    async def head(svc: Service) -> dict[str, Any]:
        """seq, entry_hash and recorded_at of the last entry."""
        return await svc.head()

    @app.get("/v1/rejections", dependencies=[Depends(allow(ADMINISTERING))])
    async def rejections(
        svc: Service, after: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Rejected inputs, oldest first, after the id `after`; `next_after` pages on."""
        async with svc.pool.acquire() as connection:
            rows = await connection.fetch(query("ledger", "rejections_after"), after, limit)
        items = [
            {
                "id": row["id"],
                "reason": row["reason"],
                "detail": row["detail"],
                "field": row["field"],
                "event_id": str(row["event_id"]) if row["event_id"] else None,
                "topic": row["source_topic"],
                "partition": row["source_partition"],
                "offset": row["source_offset"],
                "rejected_at": format_timestamp(row["rejected_at"]),
                "original_bytes": base64.b64encode(bytes(row["raw"])).decode(),
            }
            for row in rows
        ]
        return {"rejections": items, "next_after": items[-1]["id"] if items else after}

    @app.post("/v1/decisions", dependencies=[Depends(allow(RECORDING))])
    async def record_decision(svc: Service, request: DecisionRequest) -> dict[str, Any]:
        """Evaluate the items now and append a `decision.recorded` receipt to the ledger."""
        if len(request.items) > settings.batch_max_items:
            raise HTTPException(422, f"a decision holds at most {settings.batch_max_items} items; split it")
        return await svc.record_decision([Question(i.subject_id, i.conversation_id) for i in request.items])

    @app.get("/v1/decisions/{decision_id}/audit", dependencies=[Depends(allow(AUDITING))])
    async def audit_decision(svc: Service, decision_id: uuid.UUID) -> dict[str, Any]:
        """Reproduce a receipt at its watermark (must match) and list what changed in hindsight."""
        return await svc.audit_decision(decision_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(svc: Service) -> JSONResponse:
        """Connected, migrated, the policy timeline the one last recorded, and the state within the allowed lag."""
        problems: list[str] = []
        assert settings.database_url is not None
        pending = await pending_migrations(settings.database_url)
        if pending:
            problems.append(f"migrations pending: {[m.version for m in pending]}")
        async with svc.pool.acquire() as connection:
            head = (await svc.head())["seq"]
            folded = await svc.folded(connection)
            if await differs_from_recorded(connection, svc.timeline):
                problems.append("this API's policy timeline differs from the last one the writer recorded in the "
                                f"ledger: {SAME_POLICY_FILE}")
        lag = max(0, head - folded)
        metrics.STATE_LAG.set(lag)
        if lag > settings.readiness_max_lag:
            problems.append(f"state lags the ledger by {lag} entries (allowed {settings.readiness_max_lag})")
        body = {"ready": not problems, "ledger_head": head, "folded_seq": folded, "state_lag": lag,
                "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
