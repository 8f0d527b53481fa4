"""`consent-ledger up`: servers, migrations and every service in the foreground, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consent_ledger.adapters.embedded import free_port
from consent_ledger.apps.demo import DEMO_QUESTIONS, LATE_QUESTION, demo_history, late_events
from consent_ledger.apps.publishing import publish_events
from consent_ledger.bootstrap import running_stack
from consent_ledger.config import ROLES, Settings

SERVICES = ("ledger-writer", "stream-processor", "audit-api")


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CONSENT_LEDGER_* variables, for child processes."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"CONSENT_LEDGER_{name.upper()}"] = str(value)
    return env


def say(message: str = "") -> None:
    print(message, flush=True)


class Stack:
    """The child service processes, their logs, and an HTTP client for the audit API."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.base_url = f"http://{settings.api_host}:{settings.api_port}"
        self.token = settings.tokens_by_role()

    def start(self) -> None:
        env = {**os.environ, **settings_env(self.settings)}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            with (self.log_dir / f"{service}.log").open("ab") as log:
                self.children[service] = subprocess.Popen(
                    [sys.executable, "-m", "consent_ledger", service], env=env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )

    def stop(self) -> None:
        for service in reversed(SERVICES):
            child = self.children.get(service)
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for service, child in self.children.items():
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                say(f"{service} did not stop within 30s after SIGTERM; killing it")
                child.kill()
                child.wait()

    def dead(self) -> list[str]:
        return [name for name, child in self.children.items() if child.poll() is not None]

    def role_token(self, role: str) -> str:
        return next(token for token, token_role in self.token.items() if token_role == role)

    def get(self, path: str, role: str = "auditor", **params: str) -> tuple[int, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(
            f"{self.base_url}{path}{query}", headers={"Authorization": f"Bearer {self.role_token(role)}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body or b"null")
            except ValueError:
                return error.code, body.decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0, *, min_head: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.dead():
                raise RuntimeError(f"{', '.join(self.dead())} exited; see the logs in {self.log_dir}")
            with contextlib.suppress(OSError, ValueError):
                status, last = self.get("/readyz")
                if status == 200 and last["ledger_head"] >= min_head and last["state_lag"] == 0:
                    return dict(last)
            time.sleep(0.25)
        raise RuntimeError(f"the stack was not ready within {timeout:.0f}s (last /readyz: {last}); "
                           f"see the logs in {self.log_dir}")


@contextlib.contextmanager
def _run_directory(settings: Settings) -> Iterator[Path]:
    """With the in-memory broker, state must not outlive it: one fresh directory per run."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.kafka_bootstrap_servers is not None:
        yield settings.data_dir
        return
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=settings.data_dir))
    try:
        yield run_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_stack(settings: Settings, *, demo: bool, exit_after_demo: bool) -> int:
    # A role with no token configured gets one for this run, printed with the others: the demo and the printed
    # examples ask as auditor and record as pipeline, and configured tokens are kept as they are.
    configured = set(settings.tokens_by_role().values())
    generated = [role for role in ROLES if role not in configured]
    settings = settings.model_copy(update={f"{role}_tokens": _secret(f"{role}-{secrets.token_urlsafe(12)}")
                                           for role in generated})
    signal.signal(signal.SIGTERM, _interrupt)  # stop as cleanly on SIGTERM as on Ctrl-C
    if settings.api_port == 0:
        settings = settings.model_copy(update={"api_port": free_port()})
    with _run_directory(settings) as run_dir:
        settings = settings.model_copy(update={"data_dir": run_dir})
        say("starting the consent ledger ...")
        with running_stack(settings) as live:
            stack = Stack(live, run_dir / "logs")
            interrupted = False
            try:
                stack.start()
                stack.wait_ready()
                _announce(stack, live, generated)
                if demo:
                    _run_demo(stack, live)
                if not exit_after_demo:
                    say("\nrunning; press Ctrl-C to stop")
                    _wait_until_interrupted(stack)
            except KeyboardInterrupt:
                interrupted = True
            except RuntimeError as error:
                say(f"error: {error}")
                for name in stack.dead():
                    tail = (stack.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
                    say(f"--- last lines of {name}.log ---\n" + "\n".join(tail))
                return 1
            finally:
                say("stopping services ...")
                stack.stop()
                say("stopping servers ...")
            return 0 if not stack.dead() or interrupted or exit_after_demo else 1


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _wait_until_interrupted(stack: Stack) -> None:
    while True:
        dead = stack.dead()
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited unexpectedly; see the logs in {stack.log_dir}")
        time.sleep(0.5)


def _announce(stack: Stack, live: Settings, generated: list[str]) -> None:
    say(f"\nKafka:      {live.kafka_bootstrap_servers}")
    say(f"PostgreSQL: {live.database_url}")
    say(f"audit API:  {stack.base_url}  (OpenAPI: {stack.base_url}/docs)")
    say(f"logs:       {stack.log_dir}")
    for role in ROLES:
        origin = "made for this run" if role in generated else f"from CONSENT_LEDGER_{role.upper()}_TOKENS"
        say(f"token ({role}): {stack.role_token(role)}  ({origin})")
    say("\ntry:")
    say(f"  curl -H 'Authorization: Bearer {stack.role_token('auditor')}' "
        f"'{stack.base_url}/v1/eligibility?subject_id=alice&conversation_id=a-chat-1&at=2025-10-10T00:00:00Z'")
    say(f"  CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVERS={live.kafka_bootstrap_servers} consent-ledger publish events.jsonl")


def _run_demo(stack: Stack, live: Settings) -> None:
    first, late = demo_history(), late_events()
    base = stack.wait_ready()["ledger_head"]  # the entries already there, such as the policy.published one
    report = asyncio.run(publish_events(live, first))
    say(f"\ndemo: published {report.sent} events (first wave)")
    ready = stack.wait_ready(min_head=base + len(first))
    _, head = stack.get("/v1/ledger/head")
    known_before_late = head["recorded_at"]
    report = asyncio.run(publish_events(live, late))
    say(f"demo: published {report.sent} late event (frank's opt-out of 1 October, reported late)")
    ready = stack.wait_ready(min_head=base + len(first) + len(late))
    say(f"\nthe ledger: {ready['ledger_head']} entries, the policy timeline and the events "
        f"(head after the first wave: seq {head['seq']}, hash {head['entry_hash'][:16]}...)")
    for subject in sorted({e.subject_id for e in first}):
        _, timeline = stack.get(f"/v1/subjects/{subject}/timeline")
        for entry in timeline["entries"]:
            event = entry["event"]
            detail = ", ".join(f"{k}={v}" for k, v in event["body"].items())
            say(f"  seq {entry['seq']:>3}  {event['occurred_at'][:19]}  {subject:<6} "
                f"{event['event_type']:<22} {detail}")
    say("\naudit answers:")
    for question in DEMO_QUESTIONS:
        _print_answer(stack, question.subject_id, question.conversation_id, question.at, None, question.story)
    say(f"\n{LATE_QUESTION.story}:")
    _print_answer(stack, LATE_QUESTION.subject_id, LATE_QUESTION.conversation_id, LATE_QUESTION.at,
                  known_before_late, "known before the late event")
    _print_answer(stack, LATE_QUESTION.subject_id, LATE_QUESTION.conversation_id, LATE_QUESTION.at, None,
                  "known now")


def _print_answer(stack: Stack, subject: str, conversation: str, at: str, known_at: str | None, story: str) -> None:
    params = {"subject_id": subject, "conversation_id": conversation, "at": at}
    if known_at:
        params["known_at"] = known_at
    status, answer = stack.get("/v1/eligibility", **params)
    if status != 200:
        say(f"  {subject}/{conversation} at {at[:10]}: HTTP {status} {answer}")
        if status >= 500:
            tail = (stack.log_dir / "audit-api.log").read_text(errors="replace").splitlines()[-12:]
            say("\n".join(tail))
        return
    verdict = "eligible" if answer["eligible"] else "not eligible"
    why = ",".join(answer["basis"]) if answer["eligible"] else ",".join(answer["reasons"])
    seqs = ",".join(str(e["seq"]) for e in answer["evidence"])
    say(f"  {subject:<6} {conversation:<9} at {at[:10]}: {verdict:<12} ({why}; {answer['policy_version']}; "
        f"evidence seq {seqs or '-'}; watermark {answer['ledger_watermark']})  {story}")
