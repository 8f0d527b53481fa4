"""The `consent-ledger` command: run the services, publish events, ask questions, verify and replay."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop
from pydantic import ValidationError

from consent_ledger.config import Settings

app = typer.Typer(
    help="Consent ledger: the system of record for training consent. Every option can also be set with "
    "the CONSENT_LEDGER_* environment variable shown in its help; see README, Configuration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def load_settings() -> Settings:
    known = {f"CONSENT_LEDGER_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(name for name in os.environ if name.startswith("CONSENT_LEDGER_") and name not in known)
    if unknown:
        typer.secho(f"unknown setting(s) {', '.join(unknown)}: check the spelling against README, Configuration "
                    "(a misspelt setting would otherwise be ignored silently).", fg="red", err=True)
        raise typer.Exit(2)
    try:
        return Settings()
    except ValidationError as error:
        typer.secho(f"invalid configuration:\n{error}\nFix the CONSENT_LEDGER_* variables named above.",
                    fg="red", err=True)
        raise typer.Exit(2) from None


def require_servers(settings: Settings) -> Settings:
    """Service commands need real addresses; `up` is the way to get embedded ones."""
    missing = [name for name, value in (
        ("CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
        ("CONSENT_LEDGER_DATABASE_URL", settings.database_url),
    ) if not value]
    if missing:
        typer.secho(
            f"{' and '.join(missing)} not set. Set them to your Kafka and PostgreSQL, "
            "or run `consent-ledger up` to start everything on embedded servers.", fg="red", err=True,
        )
        raise typer.Exit(2)
    return settings


def require_database(settings: Settings) -> str:
    if not settings.database_url:
        typer.secho("CONSENT_LEDGER_DATABASE_URL is not set: point it at the ledger's PostgreSQL "
                    "(`consent-ledger up` prints the value to use).", fg="red", err=True)
        raise typer.Exit(2)
    return settings.database_url


def parse_instant(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    from consent_ledger.core.events import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError:
        typer.secho(f"{option}: {value!r} is not an RFC 3339 timestamp such as 2025-10-01T12:00:00Z",
                    fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="publish a demo history and print what the services make of it")] = False,
    exit_after_demo: Annotated[bool, typer.Option(help="stop once the demo is printed (for scripts)")] = False,
    api_port: Annotated[int | None, typer.Option(envvar="CONSENT_LEDGER_API_PORT",
                                                 help="audit API port (default: a free one, printed)")] = None,
) -> None:
    """Start the whole stack in the foreground (embedded broker and PostgreSQL unless configured)."""
    from consent_ledger.apps.stack import run_stack

    settings = load_settings()
    # Beside whatever else runs on the machine (another `up`, a dev server on 8080): a free port unless one is asked
    # for, like the embedded servers'; the address is printed with the tokens.
    settings = settings.model_copy(update={"api_port": 0 if api_port is None else api_port})
    raise typer.Exit(run_stack(settings, demo=demo, exit_after_demo=exit_after_demo))


@app.command()
def migrate() -> None:
    """Apply the database migrations this release needs (CONSENT_LEDGER_ADMIN_DATABASE_URL or DATABASE_URL)."""
    from consent_ledger.adapters.postgres.migrations import migrate as apply

    settings = load_settings()
    url = settings.admin_database_url or require_database(settings)
    done = asyncio.run(apply(url))
    typer.echo(f"applied {len(done)} migration(s): {', '.join(f'{m.version}_{m.name}' for m in done) or 'none'}")


@app.command("ledger-writer")
def ledger_writer() -> None:
    """Run the ledger writer (and the outbox feeding ledger.entries) until SIGTERM."""
    from consent_ledger.adapters.logs import configure_logging
    from consent_ledger.apps.lifecycle import tune_gc
    from consent_ledger.apps.writer_service import run_writer_service

    settings = require_servers(load_settings())
    configure_logging(settings.log_level)
    tune_gc()
    uvloop.run(run_writer_service(settings))


@app.command("stream-processor")
def stream_processor() -> None:
    """Run one stream-processor worker (start several for scale-out) until SIGTERM."""
    from consent_ledger.adapters.logs import configure_logging
    from consent_ledger.apps.processor_service import run_processor_service

    settings = require_servers(load_settings())
    configure_logging(settings.log_level)
    run_processor_service(settings)


@app.command("audit-api")
def audit_api() -> None:
    """Serve the audit HTTP API (OpenAPI at /openapi.json) until SIGTERM."""
    from consent_ledger.adapters.logs import configure_logging
    from consent_ledger.apps.audit_api.server import serve

    settings = load_settings()
    require_database(settings)
    configure_logging(settings.log_level)
    uvloop.run(serve(settings))


@app.command()
def publish(
    file: Annotated[str, typer.Argument(help="JSON-lines file of events, one per line; - for standard input")],
) -> None:
    """Validate and publish events (JSON form) to Kafka; exits non-zero if any was not acknowledged."""
    from consent_ledger.apps.publishing import publish_file

    settings = load_settings()
    if not settings.kafka_bootstrap_servers:
        typer.secho("CONSENT_LEDGER_KAFKA_BOOTSTRAP_SERVERS is not set (`consent-ledger up` prints it).",
                    fg="red", err=True)
        raise typer.Exit(2)
    stream = sys.stdin if file == "-" else Path(file).open(encoding="utf-8")  # noqa: SIM115
    with stream:
        report = asyncio.run(publish_file(settings, stream, progress=sys.stderr.isatty()))
    typer.echo(f"sent {report.sent}, invalid {len(report.invalid)}, failed {len(report.failed)}")
    for line, reason in report.invalid[:20]:
        typer.echo(f"  line {line}: {reason}", err=True)
    for event_id, error in report.failed[:20]:
        typer.echo(f"  event {event_id}: not acknowledged: {error}", err=True)
    if report.invalid or report.failed:
        raise typer.Exit(1)


@app.command()
def eligibility(
    subject: Annotated[str, typer.Option(help="subject_id")],
    conversation: Annotated[str, typer.Option(help="conversation_id")],
    at: Annotated[str | None, typer.Option(help="instant asked about (RFC 3339); default now")] = None,
    known_at: Annotated[str | None, typer.Option(help="knowledge cut (RFC 3339); default now")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
) -> None:
    """Was this conversation eligible for training at `at`, as known at `known_at`, and why."""
    from consent_ledger.apps.audit_api.queries import ask_one
    from consent_ledger.apps.audit_api.render import render_decision
    from consent_ledger.apps.audit_api.service import SAME_POLICY_FILE, StateBehind
    from consent_ledger.core.eligibility import FoldedUnderAnotherPolicy

    settings = load_settings()
    require_database(settings)
    try:
        answer = asyncio.run(ask_one(settings, subject, conversation, parse_instant(at, "--at"),
                                     parse_instant(known_at, "--known-at")))
    except StateBehind as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(3) from None
    except FoldedUnderAnotherPolicy as error:
        typer.secho(f"{error}: {SAME_POLICY_FILE}", fg="red", err=True)
        raise typer.Exit(3) from None
    typer.echo(json.dumps(answer, indent=2) if as_json else render_decision(answer))


@app.command()
def verify(
    batch: Annotated[int, typer.Option(help="entries read per round trip")] = 20_000,
) -> None:
    """Recompute the hash chain from seq 1; names the first bad seq and exits 1 if there is one."""
    from consent_ledger.apps.verification import verify_ledger

    settings = load_settings()
    result = asyncio.run(verify_ledger(require_database(settings), batch=batch, progress=sys.stderr.isatty()))
    if result.first_break is None:
        typer.echo(f"chain intact: {result.checked} entries, head seq {result.checked}")
        return
    typer.secho(f"chain broken at seq {result.first_break.seq}: {result.first_break.detail}. "
                f"{result.checked} entries before it verified. Restore the ledger from a backup and verify it "
                "(deploy/OPERATIONS.md).", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def replay(
    report: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("replay-report.json"),
    until: Annotated[str | None, typer.Option(help="replay only what was known at this instant")] = None,
    policy: Annotated[Path | None, typer.Option(help="'what if' under this policy timeline JSON")] = None,
) -> None:
    """Rebuild all state from the ledger, compare with the live tables, verify, re-audit; non-zero on any difference."""
    from consent_ledger.apps.lifecycle import tune_gc
    from consent_ledger.apps.replay import run_replay

    settings = load_settings()
    require_database(settings)
    tune_gc()
    code = asyncio.run(run_replay(settings, report_path=report, until=parse_instant(until, "--until"),
                                  policy_file=policy, progress=sys.stderr.isatty()))
    raise typer.Exit(code)


@app.command()
def bench(
    events: Annotated[int, typer.Option(help="events to ingest")] = 1_000_000,
    subjects: Annotated[int, typer.Option(help="distinct subjects")] = 100_000,
    output: Annotated[Path, typer.Option(help="JSON results file")] = Path("bench-results/results.json"),
    writers: Annotated[int, typer.Option(min=1, help="ledger-writer processes sharing the event topics")] = 1,
    query_scale: Annotated[int, typer.Option(
        help="afterwards, grow the ledger to this many entries (directly, skipping Kafka) and measure single "
             "questions again; 0 to skip")] = 0,
) -> None:
    """Measure ingest, fold, queries and replay against the raw COPY limit; prints a table."""
    from consent_ledger.apps.bench import run_bench

    raise typer.Exit(run_bench(load_settings(), events=events, subjects=subjects, output=output, writers=writers,
                               query_scale=query_scale))


def main() -> Any:
    return app()


