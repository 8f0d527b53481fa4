"""The ledger writer under faults (SIGKILL, lost PostgreSQL sessions, restarted servers), judged by the checker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from ledger_support import (
    WriterProcess,
    add_mix,
    ensure_event_topics,
    offsets_reached,
    stored_offsets,
    subjects,
    wait_until,
)

from consent_ledger.adapters.embedded import EmbeddedBroker, EmbeddedPostgres
from consent_ledger.adapters.postgres.connection import connect
from consent_ledger.adapters.postgres.migrations import migrate
from consent_ledger.adapters.postgres.roles import ensure_service_login
from consent_ledger.config import Settings
from history_checker import History, Outcome, check

BATCH_MAX = 200  # small batches: many commits, so that faults land inside and between transactions
WAIT_S = 180.0
POLICY_ENTRIES = 1  # the writer service records the policy timeline once, however often it starts


# ---------------------------------------------------------------------------------------------- helpers


async def publish(history: History, settings: Settings) -> None:
    assert settings.kafka_bootstrap_servers is not None
    sent = await history.publish(settings.kafka_bootstrap_servers)
    refused = [send for send in sent if send.outcome is not Outcome.ACKNOWLEDGED]
    assert not refused, f"{len(refused)} sends not acknowledged, e.g. {refused[0].error}"


async def scalar(database_url: str, sql: str, *args: Any) -> Any:
    """One value on a fresh connection: the scenarios restart PostgreSQL under long-lived ones."""
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


async def event_entries(database_url: str) -> int:
    return int(await scalar(database_url, "SELECT count(*) FROM ledger WHERE subject_id IS NOT NULL"))


class Supervisor:
    """Restarts the writer whenever it exits, as systemd or Kubernetes would, and keeps its exit codes."""

    def __init__(self, writer: WriterProcess) -> None:
        self.writer = writer
        self.exits: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            if not self.writer.running():
                if self.writer.process is not None:
                    self.exits.append(self.writer.process.returncode)
                await asyncio.sleep(0.5)  # a supervisor's restart delay
                self.writer.start()
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self.writer.start()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def finish(
    writer: WriterProcess, settings: Settings, history: History, describe: Callable[[], Awaitable[str]]
) -> None:
    """Let the (running or restarted) writer reach every log end, then stop it cleanly: exit code 0."""
    assert settings.database_url is not None
    if not writer.running():
        writer.start()
    ends = history.acknowledged_ends()

    async def caught_up() -> bool:
        assert writer.running(), f"the writer exited on its own; {writer.tail()}"
        connection = await asyncpg.connect(settings.database_url)
        try:
            return offsets_reached(await stored_offsets(connection, settings.writer_group_id), ends)
        finally:
            await connection.close()

    await wait_until(caught_up, WAIT_S, describe)
    writer.signal(signal.SIGTERM)
    assert await writer.wait(60) == 0, writer.tail()


async def kafka_committed(settings: Settings, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The writer group's offsets as committed in Kafka (for the report: correctness rests on the stored ones)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.writer_group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        return {tp: await consumer.committed(TopicPartition(*tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


def reported(name: str, started: float, report: Any, **faults: object) -> None:
    figures = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in faults.items())
    print(f"{name}: {time.monotonic() - started:.0f}s; {figures}; {report.summary()}")


@pytest.fixture
def writer_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"writer_batch_max": BATCH_MAX})


# ---------------------------------------------------------------------------------------------- a. SIGKILL


@pytest.mark.slow  # a restart after SIGKILL waits for the killed member's session to expire: ~20 s a cycle
async def test_sigkill_after_the_postgres_commit_and_at_random_points(
    writer_settings: Settings, soak: bool, tmp_path: Path
) -> None:
    """Half the kills fire the moment PostgreSQL reports a commit (LISTEN on the writer's own NOTIFY, delivered
    at COMMIT), before the writer commits the batch to Kafka; the others at a random instant."""
    settings = writer_settings
    assert settings.database_url is not None
    assert settings.admin_database_url is not None
    started = time.monotonic()
    kills = 24 if soak else 3
    history = History(settings.topics.name, label="sigkill")
    people = subjects(500)
    await ensure_event_topics(settings)
    per_run = 5000  # at most appended by one run before its kill (measured as it goes)
    add_mix(history, people, 3 * per_run)
    await publish(history, settings)
    writer = WriterProcess(settings, tmp_path / "writer.log", WAIT_S)

    async def describe() -> str:
        return f"ledger holds {await event_entries(settings.admin_database_url or '')}; {writer.tail()}"

    # The kill after a commit is sent from the notification callback itself: nothing runs in between.
    armed: dict[str, int] = {}

    def on_commit(*_: object) -> None:
        if "pid" in armed:
            armed["countdown"] -= 1
            if armed["countdown"] <= 0:
                os.kill(armed.pop("pid"), signal.SIGKILL)

    listener = await connect(settings.admin_database_url)
    await listener.add_listener("ledger_appended", on_commit)
    kafka_behind = 0
    modes: list[str] = []
    try:
        for number in range(kills):
            before = await event_entries(settings.admin_database_url)
            if len(history.valid_event_ids()) - before < 3 * per_run:  # the next kill must still find work in hand
                add_mix(history, people, 3 * per_run)
                await publish(history, settings)
            after_commit = number % 2 == 0
            writer.start()
            assert writer.process is not None
            if after_commit:
                armed.update(pid=writer.process.pid, countdown=history.rng.randint(1, 8))
            else:

                async def appending(floor: int = before) -> bool:
                    assert writer.running(), f"the writer exited on its own; {writer.tail()}"
                    return await event_entries(settings.admin_database_url or "") > floor

                await wait_until(appending, WAIT_S, describe, poll_s=0.02)
                await asyncio.sleep(history.rng.uniform(0.0, 1.0))
                writer.signal(signal.SIGKILL)
            assert await writer.wait(WAIT_S) == -signal.SIGKILL, writer.tail()
            armed.clear()
            stored = await stored_offsets(listener, settings.writer_group_id)
            committed = await kafka_committed(settings, sorted(stored))
            behind = any(committed[tp] < offset for tp, offset in stored.items())
            kafka_behind += behind
            count = await event_entries(settings.admin_database_url)
            per_run = max(per_run, count - before)
            modes.append(f"{'after-commit' if after_commit else 'random'}{' (kafka behind)' if behind else ''}")
            assert count < len(history.valid_event_ids()), "the stream ended before the kill: nothing was interrupted"
        await finish(writer, settings, history, describe)
    finally:
        writer.kill()
        await listener.close()
    report = await check(
        history, settings.database_url, group_id=settings.writer_group_id, system_entries=POLICY_ENTRIES
    )
    reported(
        "sigkill",
        started,
        report,
        kills=kills,
        landed_between_postgres_and_kafka_commit=kafka_behind,
        kinds=modes,
    )
    report.assert_clean()


# ---------------------------------------------------------------------------------------------- b, c. PostgreSQL

# Test-only, in this test's database: a deferred trigger that makes COMMIT sleep when asked, so that a session
# can be terminated while it is inside COMMIT rather than only before or after it.
SLOW_COMMIT = """
CREATE TABLE fault_control (commit_delay float8 NOT NULL);
INSERT INTO fault_control VALUES (0);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  delay float8;
BEGIN
  SELECT commit_delay INTO delay FROM fault_control;
  IF delay > 0 AND current_setting('fault.slept', true) IS DISTINCT FROM 'yes' THEN
    PERFORM set_config('fault.slept', 'yes', true);
    PERFORM pg_sleep(delay);
  END IF;
  RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON consumer_offsets
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
# The service login's sessions in this database only: other tests' databases share the login.
SERVICE_BACKENDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND usename = 'consent_ledger'"
    " AND pid <> pg_backend_pid()"
)
FAULTS = ("terminate_in_commit", "restart_fast", "terminate_at_random", "restart_immediate")


@contextlib.asynccontextmanager
async def own_postgres(data_dir: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A durable PostgreSQL of this test's own, migrated, with the service login: it may be restarted at will."""
    server = EmbeddedPostgres(data_dir, durable=True)
    await asyncio.to_thread(server.start)
    try:
        admin = await asyncpg.connect(server.superuser_url())
        try:
            await admin.execute("CREATE DATABASE consent_ledger")
        finally:
            await admin.close()
        await migrate(server.superuser_url("consent_ledger"))
        await ensure_service_login(server.superuser_url("consent_ledger"), "consent_ledger")
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def terminate_in_commit(admin_url: str) -> None:
    """Hold the writer's next COMMIT in the deferred trigger and terminate its session there."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute("UPDATE fault_control SET commit_delay = 0.5")
        caught: list[asyncpg.Record] = []
        deadline = time.monotonic() + 30
        while not caught and time.monotonic() < deadline:
            caught = await admin.fetch(
                f"{SERVICE_BACKENDS} AND state = 'active' AND query ILIKE 'COMMIT%' AND wait_event = 'PgSleep'"
            )
            await asyncio.sleep(0.01)
        await admin.execute("UPDATE fault_control SET commit_delay = 0")
        assert caught, "no COMMIT caught within 30 s"
        for row in caught:
            await admin.execute("SELECT pg_terminate_backend($1)", row["pid"])
    finally:
        await admin.close()


async def restart(server: EmbeddedPostgres, *, immediate: bool, down_s: float) -> None:
    """Stop PostgreSQL (fast: sessions rolled back and a checkpoint; immediate: recovery from the WAL on start)
    and start it again on the same port and data directory."""
    port = server.port
    if immediate:
        assert server.process is not None
        server.process.send_signal(signal.SIGQUIT)
        await asyncio.to_thread(server.process.wait, 30)
        server.process = None
    else:
        await asyncio.to_thread(server.stop)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(server.start, port=port)


@pytest.mark.slow  # each fault costs a writer restart (a group join: 6 s, and 18 s the first time)
async def test_postgres_sessions_terminated_and_server_restarted_mid_ingest(
    writer_settings: Settings, soak: bool, tmp_path: Path
) -> None:
    """On a durable PostgreSQL of its own, while the writer appends: `pg_terminate_backend` on the writer's
    sessions inside COMMIT (held there by a deferred trigger) and at random instants, and the server stopped fast
    or immediately and started again. Every exit of the writer is non-zero; restarted by a supervisor, it
    completes the ledger exactly once, chained, with nothing lost from the durable server."""
    started = time.monotonic()
    faults = FAULTS * (5 if soak else 1)
    async with own_postgres(tmp_path / "postgres") as server:
        admin_url = server.superuser_url("consent_ledger")
        settings = writer_settings.model_copy(
            update={"database_url": server.service_url(), "admin_database_url": admin_url}
        )
        assert settings.database_url is not None
        history = History(settings.topics.name, label="postgres faults")
        people = subjects(500)
        await ensure_event_topics(settings)
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(SLOW_COMMIT)
        finally:
            await admin.close()
        per_run = 4000
        add_mix(history, people, 3 * per_run)
        await publish(history, settings)
        writer = WriterProcess(settings, tmp_path / "writer.log", WAIT_S)
        supervisor = Supervisor(writer)

        async def count() -> int:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                return await event_entries(admin_url)
            return -1

        async def describe() -> str:
            return f"ledger holds {await count()}; {writer.tail()}"

        try:
            supervisor.start()
            for fault in faults:
                floor, exits = await count(), len(supervisor.exits)
                if len(history.valid_event_ids()) - floor < 3 * per_run:  # the fault must find work in hand
                    add_mix(history, people, 3 * per_run)
                    await publish(history, settings)

                async def appending(floor: int = floor) -> bool:
                    return await count() > floor

                await wait_until(appending, WAIT_S, describe, poll_s=0.05)
                if fault == "terminate_in_commit":
                    await terminate_in_commit(admin_url)
                elif fault == "terminate_at_random":
                    await asyncio.sleep(history.rng.uniform(0.0, 1.0))
                    await scalar(admin_url, f"SELECT count(pg_terminate_backend(pid)) FROM ({SERVICE_BACKENDS}) AS s")
                else:
                    await asyncio.sleep(history.rng.uniform(0.0, 1.0))
                    await restart(server, immediate=fault == "restart_immediate", down_s=history.rng.uniform(0, 2))

                async def exited(exits: int = exits) -> bool:
                    return len(supervisor.exits) > exits

                await wait_until(exited, 60, describe)
                per_run = max(per_run, await count() - floor)
            await supervisor.stop()
            assert all(code > 0 for code in supervisor.exits), f"exit codes {supervisor.exits}"
            await finish(writer, settings, history, describe)
        finally:
            await supervisor.stop()
            writer.kill()
        report = await check(
            history, settings.database_url, group_id=settings.writer_group_id, system_entries=POLICY_ENTRIES
        )
    reported(
        "postgres faults",
        started,
        report,
        faults=dict(Counter(faults)),
        writer_exits=supervisor.exits,
        writer_starts=writer.starts,
    )
    report.assert_clean()


# ---------------------------------------------------------------------------------------------- d. broker restart


@pytest.mark.slow  # a broker restart and a writer's rejoin
async def test_broker_restart_loses_the_log_and_the_writer_stops_with_an_alert(
    writer_settings: Settings, soak: bool, tmp_path: Path
) -> None:
    """The in-memory broker restarted: its log is gone and new messages start again at offset 0. The running
    writer (and under --soak a restarted one) must stop non-zero with the BrokerLogLost alert, neither appending
    nor skipping."""
    started = time.monotonic()
    with EmbeddedBroker(tmp_path / "broker") as broker:
        settings = writer_settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
        assert settings.database_url is not None
        history = History(settings.topics.name, label="broker restart")
        people = subjects(300)
        await ensure_event_topics(settings)
        add_mix(history, people, 3000)
        await publish(history, settings)
        writer = WriterProcess(settings, tmp_path / "writer.log", WAIT_S)

        async def describe() -> str:
            return f"ledger holds {await event_entries(settings.database_url or '')}; {writer.tail()}"

        async def stored() -> dict[tuple[str, int], int]:
            connection = await asyncpg.connect(settings.database_url)
            try:
                return await stored_offsets(connection, settings.writer_group_id)
            finally:
                await connection.close()

        ends = history.acknowledged_ends()
        try:
            writer.start()

            async def caught_up() -> bool:
                assert writer.running(), writer.tail()
                return offsets_reached(await stored(), ends)

            await wait_until(caught_up, WAIT_S, describe)
            before = await stored()
            before_report = await check(history, settings.database_url, system_entries=POLICY_ENTRIES)
            before_report.assert_clean()

            port = broker.port
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start, port=port)
            # Producers carry on against the new, empty log: fewer messages than the ledger already holds.
            after = History(settings.topics.name, seed=history.seed + 1, label="after the broker restart")
            await ensure_event_topics(settings)
            add_mix(after, people, 200)
            await publish(after, settings)
            new_ends = after.acknowledged_ends()
            assert all(new_ends[tp] < before[tp] for tp in new_ends), "the new log must end before the stored offsets"

            codes = [await writer.wait(WAIT_S)]  # the running writer
            if soak:  # and a restart, as a supervisor would (a fresh start is also in test_ledger_writer.py)
                writer.start()
                codes.append(await writer.wait(WAIT_S))
        finally:
            writer.kill()
        output = writer.log.read_text(errors="replace")
        assert all(code > 0 for code in codes), f"exit codes {codes}; {writer.tail()}"
        alerts = output.count("BrokerLogLost: ")
        assert alerts == len(codes), writer.tail(60)
        assert "the broker lost its log or is another cluster. Nothing was skipped or re-read" in output
        # Nothing new appended or rejected (any would be 'never sent' for this history), no offset moved.
        report = await check(
            history, settings.database_url, group_id=settings.writer_group_id, system_entries=POLICY_ENTRIES
        )
        assert await stored() == before
    reported(
        "broker restart",
        started,
        report,
        broker_restarts=1,
        writer_exit_codes=codes,
        alerts=alerts,
        sent_after_restart=len(after.sends),
    )
    report.assert_clean()
