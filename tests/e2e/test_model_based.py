"""A hypothesis state machine drives the running system and checks every audit answer against SPEC section 5."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, Phase, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test
from system_support import SESSION_TIMEOUT, TOKENS, Ledger, Workers

from audit_client import audit_client
from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.kafka.producer import EventProducer
from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.config import Settings
from consent_ledger.core.eligibility import decide_from_entries
from consent_ledger.core.events import EVENT_TOPICS, Event, EventType, format_timestamp, parse_timestamp
from consent_ledger.core.ledger import EntryContent, LedgerEntry
from consent_ledger.core.policy import PolicyTimeline
from spec_reference import SWITCH, spec_answer

T = TypeVar("T")
Draft = tuple[EventType, int, datetime, dict[str, str]]
"""An event to be: (type, subject index, occurred_at, body)."""
E = EventType
MICROSECOND = timedelta(microseconds=1)
# Few instants, at and around the policy switch, so that ties, one-microsecond gaps and both policies are common.
INSTANTS = tuple(
    SWITCH + delta
    for delta in (
        -timedelta(days=3),
        -timedelta(days=1),
        -MICROSECOND,
        timedelta(0),
        MICROSECOND,
        timedelta(days=1),
        timedelta(days=3),
    )
)
EARLY = SWITCH - timedelta(days=30)
CONVERSATIONS = ("c1", "c2")
ACCOUNTS = ("consumer", "consumer", "commercial")
# How the second subject starts: mostly registered early as a consumer; or commercial, late, or never.
REGISTRATIONS = (
    (EARLY, "consumer"),
    (EARLY, "consumer"),
    (EARLY, "commercial"),
    (SWITCH + timedelta(days=1), "consumer"),
    None,
)
# Weighted by repetition towards what decides answers: activity, consent changes, flags and their clearing;
# an account deletion, which ends every later answer, is rare.
EVENT_TYPES = (
    E.CONVERSATION_STARTED,
    E.CONVERSATION_STARTED,
    E.CONVERSATION_STARTED,
    E.CONVERSATION_RESUMED,
    E.CONVERSATION_RESUMED,
    E.CONVERSATION_RESUMED,
    E.CONVERSATION_RESUMED,
    E.CONSENT_CHANGED,
    E.CONSENT_CHANGED,
    E.CONSENT_CHANGED,
    E.SAFETY_FLAGGED,
    E.SAFETY_FLAGGED,
    E.SAFETY_CLEARED,
    E.FEEDBACK_REPORTED,
    E.FEEDBACK_REPORTED,
    E.CONVERSATION_DELETED,
    E.ACCOUNT_TYPE_CHANGED,
    E.ACCOUNT_REGISTERED,
    E.ACCOUNT_DELETED,
)
UNCHAINED = bytes(32)  # the reference fold never reads entry hashes
FOLD_DEADLINE = 120.0  # seconds for the fold to reach the head; a restarted worker needs ~15 s to rejoin


def scale(soak: bool) -> tuple[int, int, int]:
    """(examples, steps per example, worker restarts allowed per example)."""
    return (40, 30, 3) if soak else (5, 15, 1)


@dataclass
class Harness:
    """The long-lived system the state machine drives from its own thread, through the test's event loop."""

    loop: asyncio.AbstractEventLoop
    settings: Settings
    client: httpx.AsyncClient
    producer: EventProducer
    workers: Workers
    writer: asyncio.Task[None]
    timeline: PolicyTimeline
    worker: subprocess.Popen[bytes]
    connection: asyncpg.Connection
    head: int = 1
    """The ledger head every question must see: the policy entry and every distinct event sent so far."""
    killed: set[int] = field(default_factory=set)
    stats: Counter[str] = field(default_factory=Counter)
    fold_wait_seconds: float = 0.0
    steps_per_example: list[int] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    """What the current example has done so far, with times: printed with its failure."""
    failure: str | None = None
    """The first failure, with its example's trace: hypothesis replays a failing example to confirm it, which
    against a running system may not fail the same way, and would then report only that."""
    started: float = field(default_factory=time.monotonic)

    def log(self, what: str) -> None:
        self.trace.append(f"{time.monotonic() - self.started:7.1f}s {what}")

    def record(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = f"{type(error).__name__}: {error}\nthe example so far:\n" + "\n".join(self.trace)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = FOLD_DEADLINE + 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def publish(self, events: list[Event]) -> None:
        report = self.run(self.producer.publish(events))
        assert (report.sent, report.failed) == (len(events), []), report

    def restart(self, stop: signal.Signals) -> None:
        """Stop the worker (SIGTERM: faust's clean stop; SIGKILL: a crash) and start a fresh one."""
        self.killed.add(self.worker.pid)
        if stop == signal.SIGKILL:
            os.killpg(self.worker.pid, stop)
        else:
            self.worker.send_signal(stop)
        self.worker.wait(60)
        if stop == signal.SIGKILL:
            # A restart back-off, as an orchestrator's: on the embedded broker, a member joining while a killed
            # one is still in the group (until its session times out) was seen never to get its partitions.
            time.sleep(SESSION_TIMEOUT)
        self.worker = self.workers.start()

    def wait_folded(self) -> dict[str, Any]:
        """Until the ledger holds exactly `head` entries and the state tables have folded all of them."""
        return self.run(self._wait_folded())

    async def _wait_folded(self) -> dict[str, Any]:
        started = time.monotonic()
        while True:
            body: dict[str, Any] = (await self.client.get("/readyz")).json()
            # More entries than events sent would be a duplicate stored twice.
            assert body["ledger_head"] <= self.head, (body, self.head)
            if body["ledger_head"] == self.head and body["folded_seq"] >= self.head:
                self.stats["fold waits"] += 1
                self.fold_wait_seconds += time.monotonic() - started
                return body
            problem = None
            if self.writer.done():
                problem = f"the ledger writer stopped: {self.writer}"
            elif self.workers.unexpected_exits(self.killed):
                problem = f"a stream processor exited: {self.workers.unexpected_exits(self.killed)}"
            elif time.monotonic() - started > FOLD_DEADLINE:
                progress = await self.connection.fetch(
                    "SELECT partition, watermark_seq FROM processor_progress ORDER BY partition"
                )
                problem = (
                    f"not folded within {FOLD_DEADLINE:.0f}s: {body}, expected head {self.head}, progress per "
                    f"partition {[tuple(row) for row in progress]}"
                )
            if problem:
                raise AssertionError(f"{problem}\n{self.workers.logs()}")
            await asyncio.sleep(0.05)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        response = self.run(self.client.get(path, params=params, headers=_auditor()))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.run(self.client.post(path, json=body, headers=_auditor()))
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


def _auditor() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS['auditor']}"}


@dataclass(frozen=True)
class Checkpoint:
    """What was known when a question was asked: the ledger head then, and how many distinct events were sent."""

    recorded_at: str
    seq: int
    sent: int


def event_types() -> st.SearchStrategy[EventType]:
    return st.sampled_from(EVENT_TYPES)


@st.composite
def bodies(draw: st.DrawFn, event_type: EventType) -> dict[str, str]:
    conversation = draw(st.sampled_from(CONVERSATIONS))
    flag_id = draw(st.sampled_from(("f1", "f1", "f2")))
    account_type = draw(st.sampled_from(ACCOUNTS))
    return {
        E.CONSENT_CHANGED: {"choice": draw(st.sampled_from(("opt_in", "opt_out"))), "source": "settings"},
        E.ACCOUNT_REGISTERED: {"account_type": account_type},
        E.ACCOUNT_TYPE_CHANGED: {"account_type": account_type},
        E.ACCOUNT_DELETED: {},
        E.SAFETY_FLAGGED: {"conversation_id": conversation, "flag_id": flag_id, "category": "harm"},
        E.SAFETY_CLEARED: {"conversation_id": conversation, "flag_id": flag_id},
        E.FEEDBACK_REPORTED: {"conversation_id": conversation, "rating": draw(st.sampled_from(("up", "report")))},
    }.get(event_type, {"conversation_id": conversation})


@st.composite
def event_drafts(draw: st.DrawFn) -> Draft:
    """(type, subject index, occurred_at, body): the subject becomes this example's own id when sent."""
    event_type = draw(event_types())
    return event_type, draw(st.integers(0, 1)), draw(st.sampled_from(INSTANTS)), draw(bodies(event_type))


def recorded(step: Callable[..., None]) -> Callable[..., None]:
    """Logs a step in its example's trace, and keeps its failure, if any, on the harness (see `Harness.failure`)."""

    @functools.wraps(step)
    def run(self: LedgerModel, *args: Any, **kwargs: Any) -> None:
        shown = ", ".join(f"{name}={value!r}" for name, value in kwargs.items() if name != "data")
        self.harness.log(f"{step.__name__}({shown[:400]})")
        try:
            step(self, *args, **kwargs)
        except BaseException as error:
            self.harness.record(error)
            raise

    return run


class LedgerModel(RuleBasedStateMachine):
    """The events sent so far are the model; each answer is checked against SPEC section 5 over them."""

    harness: ClassVar[Harness]
    restarts_allowed: ClassVar[int]

    def __init__(self) -> None:
        super().__init__()
        # Fresh subjects per example: the system outlives the examples, their histories must not meet.
        self.subjects = [f"model-{uuid.uuid4().hex[:10]}-s{index}" for index in range(2)]
        self.sent: list[Event] = []
        self.checkpoints: list[Checkpoint] = []
        self.restarts = 0
        self.steps = 0
        self.harness.stats["examples"] += 1
        self.harness.trace = []
        self.harness.log(f"example {self.harness.stats['examples']}: subjects {self.subjects}")

    # Publishing.

    def _send(self, events: list[Event]) -> None:
        known = {e.event_id for e in self.sent}
        fresh = list({e.event_id: e for e in events if e.event_id not in known}.values())  # a duplicate once
        self.harness.publish(events)
        self.sent.extend(fresh)
        self.harness.head += len(fresh)
        self.harness.stats["events sent"] += len(events)
        self.harness.stats["distinct events"] += len(fresh)

    def _event(self, event_type: EventType, subject: int, occurred_at: datetime, body: dict[str, str]) -> Event:
        return Event(uuid.uuid4(), event_type, self.subjects[subject], occurred_at, "model-test", body)

    @initialize(account=st.sampled_from(REGISTRATIONS), drafts=st.lists(event_drafts(), min_size=4, max_size=10))
    @recorded
    def begin(self, account: tuple[datetime, str] | None, drafts: list[Draft]) -> None:
        """The first subject registers early as a consumer (so that many answers can be eligible); the second
        mostly too, but may be commercial, register late or never. Then a first history, in order of occurrence:
        every example has one to ask about, whichever rules hypothesis's swarm testing leaves enabled."""
        events = [self._event(E.ACCOUNT_REGISTERED, 0, EARLY, {"account_type": "consumer"})]
        if account is not None:
            events.append(self._event(E.ACCOUNT_REGISTERED, 1, account[0], {"account_type": account[1]}))
        self._send(events)
        self._send(sorted((self._event(*d) for d in drafts), key=lambda e: e.occurred_at))

    @rule(
        drafts=st.lists(event_drafts(), min_size=1, max_size=5),
        arrival=st.sampled_from(("in order", "reversed", "late")),
        redeliveries=st.integers(0, 2),
        duplicate=st.booleans(),
        data=st.data(),
    )
    @recorded
    def publish(
        self,
        drafts: list[Draft],
        arrival: str,
        redeliveries: int,
        duplicate: bool,
        data: st.DataObject,
    ) -> None:
        """A batch of new events in order of occurrence, against it, or with one arriving late (it happened before
        the latest event already sent for its subject); with events sent before sent again (same event_id and
        body), and one event twice in the batch. One rule for all, so that no example goes without any of them
        (hypothesis's swarm testing disables a random subset of the rules in each example)."""
        events = sorted((self._event(*d) for d in drafts), key=lambda e: e.occurred_at, reverse=arrival == "reversed")
        if arrival == "late":
            first = events[0]
            latest = max((e.occurred_at for e in self.sent if e.subject_id == first.subject_id), default=None)
            if latest is not None and first.occurred_at >= latest:
                events[0] = dataclasses.replace(first, occurred_at=latest - timedelta(hours=1))
            self.harness.stats["late events"] += 1
        if self.sent and redeliveries:
            again = data.draw(st.lists(st.sampled_from(self.sent), min_size=redeliveries, max_size=redeliveries))
            events[len(events) // 2 : len(events) // 2] = again
            self.harness.stats["redelivered events"] += len(again)
        if duplicate:
            events.append(events[0])
        self._send(events)
        self._step(f"publish ({arrival})")

    @precondition(lambda self: self.restarts < self.restarts_allowed)
    @rule(stop=st.sampled_from((signal.SIGTERM, signal.SIGKILL)))
    @recorded
    def restart_worker(self, stop: signal.Signals) -> None:
        self.restarts += 1
        self.harness.restart(stop)
        self._step(f"restart_worker ({stop.name})")

    def _step(self, name: str) -> None:
        self.harness.stats[f"step: {name}"] += 1
        self.steps += 1

    # Questions.

    @rule(data=st.data())
    @recorded
    def ask(self, data: st.DataObject) -> None:
        """One question over HTTP, now or as known at an earlier question, checked against the events sent."""
        self.harness.wait_folded()
        head = self.harness.get("/v1/ledger/head")
        assert head["seq"] == self.harness.head, (head, self.harness.head)
        self.checkpoints.append(Checkpoint(head["recorded_at"], head["seq"], len(self.sent)))
        checkpoint = data.draw(st.sampled_from(self.checkpoints), label="known at")
        subject = data.draw(st.sampled_from(self.subjects), label="subject")
        conversation = data.draw(st.sampled_from(CONVERSATIONS), label="conversation")
        at = data.draw(st.sampled_from(self._instants()), label="at")
        known = checkpoint is not self.checkpoints[-1]
        params = {"subject_id": subject, "conversation_id": conversation, "at": format_timestamp(at)}
        if known:
            params["known_at"] = checkpoint.recorded_at
        self.harness.log(f"  GET /v1/eligibility {params}")
        answer = self.harness.get("/v1/eligibility", **params)
        self._check(answer, checkpoint, at)
        self._step("ask as known earlier" if known else "ask as known now")

    @recorded
    def teardown(self) -> None:
        """Every subject and conversation at every instant that matters, with everything known now, in batches."""
        self.harness.steps_per_example.append(self.steps)
        if not self.sent:
            return
        self.harness.wait_folded()
        head = self.harness.get("/v1/ledger/head")
        checkpoint = Checkpoint(head["recorded_at"], head["seq"], len(self.sent))
        items = [{"subject_id": s, "conversation_id": c} for s in self.subjects for c in CONVERSATIONS]
        for at in self._instants():
            body = self.harness.post("/v1/eligibility/batch", {"at": format_timestamp(at), "items": items})
            for answer in body["results"]:
                self._check(answer, checkpoint, at)
                self.harness.stats["answers checked at the end of an example"] += 1

    def _instants(self) -> list[datetime]:
        moments = set(INSTANTS) | {EARLY - MICROSECOND}
        for event in self.sent:
            moments |= {event.occurred_at - MICROSECOND, event.occurred_at, event.occurred_at + MICROSECOND}
        return sorted(moments)

    def _check(self, answer: dict[str, Any], checkpoint: Checkpoint, at: datetime) -> None:
        """The answer against the core's reference fold and against the naive reading of the SPEC, both over the
        events sent before the checkpoint (in the order they were sent, which is their ledger order per topic)."""
        subject, conversation = answer["subject_id"], answer["conversation_id"]
        entries = [
            LedgerEntry(seq, parse_timestamp(checkpoint.recorded_at), EntryContent.of_event(event), UNCHAINED)
            for seq, event in enumerate(self.sent[: checkpoint.sent], start=1)
            if event.subject_id == subject
        ]
        known_at = parse_timestamp(checkpoint.recorded_at)
        expected = decide_from_entries(entries, subject, conversation, at, known_at, self.harness.timeline)
        got = (answer["eligible"], tuple(answer["basis"]), tuple(answer["reasons"]), answer["policy_version"])
        context = (subject, conversation, format_timestamp(at), checkpoint, answer)
        assert got == (expected.eligible, expected.basis, expected.reasons, expected.policy_version), context
        naive = spec_answer(entries, subject, conversation, at, known_at)
        assert (got[0], got[1], got[2][:1] or (None,), got[3]) == (naive[0], naive[1], (naive[2],), naive[3]), (
            naive,
            context,
        )
        by_seq = {entry.seq: str(entry.event_id) for entry in entries}
        assert {e["event_id"] for e in answer["evidence"]} == {by_seq[s] for s in expected.evidence_seqs}, context
        assert answer["ledger_watermark"] == checkpoint.seq, context
        self.harness.stats["answers checked"] += 1
        self.harness.stats[f"eligible: {'+'.join(got[1])}" if got[0] else f"refused: {got[2][0]}"] += 1
        note(f"checked {subject} {conversation} at {format_timestamp(at)}: {got}")


@pytest.mark.slow
async def test_audit_answers_follow_the_spec_under_interleaved_publishing_restarts_and_questions(
    settings: Settings,
    writer: asyncio.Task[None],
    workers: Workers,
    service_db: asyncpg.Connection,
    soak: bool,
) -> None:
    examples, steps, restarts = scale(soak)
    assert settings.kafka_bootstrap_servers is not None
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        [settings.topics.name(t) for t in EVENT_TOPICS],
        settings.topic_partitions,
        settings.topic_replication,
    )
    worker = workers.start()
    ledger = Ledger(service_db, settings)
    started = time.monotonic()
    async with (
        audit_client(settings) as client,
        EventProducer(settings.kafka_bootstrap_servers, settings.topic_prefix) as producer,
    ):
        harness = Harness(
            asyncio.get_running_loop(),
            settings,
            client,
            producer,
            workers,
            writer,
            load_timeline(settings.policy_file),
            worker,
            service_db,
        )
        LedgerModel.harness, LedgerModel.restarts_allowed = harness, restarts
        await asyncio.to_thread(harness.wait_folded)  # the policy entry: the first worker has joined and folds
        ready = time.monotonic() - started
        try:
            await asyncio.to_thread(run_state_machine_as_test, LedgerModel, settings=settings_for(examples, steps))
        except BaseException as error:
            if harness.failure is not None:
                raise AssertionError(harness.failure) from error
            raise
    assert await ledger.head() == harness.head
    stats = harness.stats
    print(
        f"\nmodel-based: {stats['examples']} examples, steps {harness.steps_per_example} (at most {steps}), in "
        f"{time.monotonic() - started:.0f}s "
        f"(first fold after {ready:.0f}s; waits for the fold: {harness.fold_wait_seconds:.0f}s); "
        f"{dict(sorted(stats.items()))}"
    )
    assert stats["step: ask as known now"] + stats["step: ask as known earlier"] > 0
    assert any(key.startswith("eligible") for key in stats)
    assert any(key.startswith("refused") for key in stats)


def settings_for(examples: int, steps: int) -> hypothesis_settings:
    """Few examples (each step is real work on real servers), no shrinking (a failing sequence of at most
    `steps` steps reads well enough, and shrinking would replay it against the servers hundreds of times)."""
    return hypothesis_settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        print_blob=True,
        suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much),
    )
