"""Publishes a JSON-lines file of events: validate every line, send the valid ones, report the rest."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from consent_ledger.adapters.kafka.admin import ensure_topics
from consent_ledger.adapters.kafka.producer import EventProducer, read_jsonl
from consent_ledger.apps.progress import progress_bar
from consent_ledger.config import Settings
from consent_ledger.core.events import EVENT_TOPICS, Event, InvalidEvent


@dataclass
class FileReport:
    sent: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) of lines that were not sent because they break the contract."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(event_id, error) of events the broker did not acknowledge; publishing them again is safe."""


async def publish_events(settings: Settings, events: Iterable[Event], *, progress: bool = False) -> FileReport:
    assert settings.kafka_bootstrap_servers is not None
    batch = list(events)
    await ensure_topics(
        settings.kafka_bootstrap_servers, [settings.topics.name(t) for t in EVENT_TOPICS],
        settings.topic_partitions, settings.topic_replication,
    )
    report = FileReport()
    with progress_bar("publishing", len(batch), enabled=progress) as advance:
        settled_before = 0

        def on_progress(settled: int) -> None:
            nonlocal settled_before
            advance(settled - settled_before)
            settled_before = settled

        async with EventProducer(settings.kafka_bootstrap_servers, settings.topic_prefix) as producer:
            sent = await producer.publish(batch, progress=on_progress)
    report.sent = sent.sent
    report.failed = [(str(event_id), error) for event_id, error in sent.failed]
    return report


async def publish_file(settings: Settings, lines: Iterable[str], *, progress: bool = False) -> FileReport:
    events: list[Event] = []
    invalid: list[tuple[int, str]] = []
    for number, parsed in read_jsonl(lines):
        if isinstance(parsed, InvalidEvent):
            invalid.append((number, f"{parsed.reason}: {parsed.detail}"))
        else:
            events.append(parsed)
    report = await publish_events(settings, events, progress=progress)
    report.invalid = invalid
    return report
