"""The producer library: publish events to their Kafka topics, Avro-encoded and keyed by subject."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from consent_ledger.adapters.avro.codec import encode_event
from consent_ledger.core.events import TOPIC_OF, Event, InvalidEvent, RejectReason, event_from_json


@dataclass
class PublishReport:
    """What one `publish` call achieved: events the brokers acknowledged, and those they did not."""

    sent: int = 0
    failed: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    """`(event_id, error)` of each event that was not acknowledged; publishing it again is safe."""

    @property
    def ok(self) -> bool:
        return not self.failed


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class EventProducer:
    """Publishes events to `<topic_prefix><topic of the event type>`, keyed by `subject_id`.

    Use as `async with EventProducer(servers, prefix) as producer: report = await producer.publish(events)`.
    Delivery is at least once: a retried batch may land twice, and the ledger stores each `event_id` once.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic_prefix: str = "",
        *,
        max_in_flight: int = 10_000,
        linger_ms: int = 5,
        max_batch_size: int = 256 * 1024,
        request_timeout_ms: int = 30_000,
        retry_backoff_ms: int = 200,
        client_id: str = "consent-ledger-producer",
        encode: Callable[[Event], bytes] = encode_event,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.topic_prefix = topic_prefix
        self._max_in_flight = max_in_flight
        self._encode = encode
        self._options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "client_id": client_id,
            # Every in-sync replica must have the event before it counts as sent: the ledger is a record.
            "acks": "all",
            # Tansu has no idempotent producer; duplicates from retries are absorbed by event_id instead.
            "enable_idempotence": False,
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_size,
            # aiokafka retries failed batches itself, retry_backoff_ms apart, until request_timeout_ms; it
            # keeps one batch in flight per partition, so a retry never overtakes a subject's later events.
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": retry_backoff_ms,
        }
        self._producer: AIOKafkaProducer | None = None

    def topic_of(self, event: Event) -> str:
        return f"{self.topic_prefix}{TOPIC_OF[event.event_type]}"

    async def __aenter__(self) -> EventProducer:
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # start() leaves its connections open when it fails
            raise
        self._producer = producer
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is still buffered

    async def publish(
        self, events: Iterable[Event], progress: Callable[[int], None] | None = None
    ) -> PublishReport:
        """Send every event and wait for each acknowledgement; `progress` gets the count settled so far.

        Events are handed to the client in iteration order, so one subject's events keep their order.
        At most `max_in_flight` events wait for acknowledgement at once, which bounds memory for
        arbitrarily long inputs.
        """
        producer = self._producer
        if producer is None:
            raise RuntimeError("EventProducer is not started: use it as `async with EventProducer(...)`")
        report = PublishReport()
        slots = asyncio.Semaphore(self._max_in_flight)
        pending: set[asyncio.Future[Any]] = set()
        # A topic whose metadata never arrived would cost every later event the full timeout.
        unavailable: dict[str, str] = {}
        settled = 0
        # Set by the last callback: waiting on the futures alone could return before their callbacks ran.
        drained = asyncio.Event()
        input_done = False

        def settle(event_id: uuid.UUID, future: asyncio.Future[Any]) -> None:
            nonlocal settled
            pending.discard(future)
            slots.release()
            if future.cancelled():
                report.failed.append((event_id, "cancelled"))
            elif (error := future.exception()) is not None:
                report.failed.append((event_id, _describe(error)))
            else:
                report.sent += 1
            settled += 1
            if progress is not None:
                progress(settled)
            if input_done and not pending:
                drained.set()

        def fail_now(event_id: uuid.UUID, reason: str) -> None:
            nonlocal settled
            report.failed.append((event_id, reason))
            settled += 1
            if progress is not None:
                progress(settled)

        for event in events:
            topic = self.topic_of(event)
            if topic in unavailable:
                fail_now(event.event_id, unavailable[topic])
                continue
            try:
                value = self._encode(event)
            except (InvalidEvent, ValueError) as error:
                fail_now(event.event_id, _describe(error))
                continue
            await slots.acquire()
            try:
                future = await producer.send(topic, value, key=event.subject_id.encode())
            except KafkaTimeoutError as error:
                slots.release()
                unavailable[topic] = f"{_describe(error)} (topic {topic!r})"
                fail_now(event.event_id, unavailable[topic])
                continue
            except Exception as error:  # e.g. MessageSizeTooLargeError: this event only, go on
                slots.release()
                fail_now(event.event_id, _describe(error))
                continue
            pending.add(future)
            future.add_done_callback(functools.partial(settle, event.event_id))
        input_done = True
        if pending:
            await drained.wait()
        return report


def read_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, Event | InvalidEvent]]:
    """Parse JSON lines into `(line number, event or the reason it is invalid)`; blank lines are skipped."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as error:
            yield number, InvalidEvent(RejectReason.UNDECODABLE, f"line {number} is not JSON: {error}")
            continue
        try:
            yield number, event_from_json(obj)
        except InvalidEvent as invalid:
            yield number, invalid
