"""The producer contract: event types, their topics and bodies, and validation of the JSON form."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    CONSENT_CHANGED = "consent.changed"
    ACCOUNT_REGISTERED = "account.registered"
    ACCOUNT_TYPE_CHANGED = "account.type_changed"
    ACCOUNT_DELETED = "account.deleted"
    CONVERSATION_STARTED = "conversation.started"
    CONVERSATION_RESUMED = "conversation.resumed"
    CONVERSATION_DELETED = "conversation.deleted"
    SAFETY_FLAGGED = "safety.flagged"
    SAFETY_CLEARED = "safety.cleared"
    FEEDBACK_REPORTED = "feedback.reported"


class RejectReason(StrEnum):
    """Why an input did not enter the ledger; stored with every rejected input."""

    UNDECODABLE = "undecodable"
    UNKNOWN_SCHEMA = "unknown_schema"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    WRONG_TOPIC = "wrong_topic"
    OCCURRED_AT_IN_FUTURE = "occurred_at_in_future"
    EVENT_ID_CONFLICT = "event_id_conflict"
    OVERSIZED = "oversized"


TOPIC_OF: Mapping[EventType, str] = {
    EventType.CONSENT_CHANGED: "consent.changes",
    EventType.ACCOUNT_REGISTERED: "accounts",
    EventType.ACCOUNT_TYPE_CHANGED: "accounts",
    EventType.ACCOUNT_DELETED: "accounts",
    EventType.CONVERSATION_STARTED: "conversations",
    EventType.CONVERSATION_RESUMED: "conversations",
    EventType.CONVERSATION_DELETED: "conversations",
    EventType.SAFETY_FLAGGED: "safety.flags",
    EventType.SAFETY_CLEARED: "safety.flags",
    EventType.FEEDBACK_REPORTED: "feedback.reports",
}
EVENT_TOPICS: tuple[str, ...] = tuple(dict.fromkeys(TOPIC_OF.values()))

CONSENT_CHOICES = ("opt_in", "opt_out")
CONSENT_SOURCES = ("settings", "signup", "policy_prompt", "api", "support")
ACCOUNT_TYPES = ("consumer", "commercial")
FEEDBACK_RATINGS = ("up", "down", "report")

# Body fields per type; a tuple of allowed values for enums, None for free non-empty text.
BODY_FIELDS: Mapping[EventType, Mapping[str, tuple[str, ...] | None]] = {
    EventType.CONSENT_CHANGED: {"choice": CONSENT_CHOICES, "source": CONSENT_SOURCES},
    EventType.ACCOUNT_REGISTERED: {"account_type": ACCOUNT_TYPES},
    EventType.ACCOUNT_TYPE_CHANGED: {"account_type": ACCOUNT_TYPES},
    EventType.ACCOUNT_DELETED: {},
    EventType.CONVERSATION_STARTED: {"conversation_id": None},
    EventType.CONVERSATION_RESUMED: {"conversation_id": None},
    EventType.CONVERSATION_DELETED: {"conversation_id": None},
    EventType.SAFETY_FLAGGED: {"conversation_id": None, "flag_id": None, "category": None},
    EventType.SAFETY_CLEARED: {"conversation_id": None, "flag_id": None},
    EventType.FEEDBACK_REPORTED: {"conversation_id": None, "rating": FEEDBACK_RATINGS},
}
ENVELOPE_FIELDS = ("event_id", "event_type", "subject_id", "occurred_at", "producer")
MAX_SUBJECT_ID_LENGTH = 128
MAX_TEXT_LENGTH = 256


class InvalidEvent(ValueError):
    """An input that breaks the producer contract; `reason` is its rejection code, `field` the culprit."""

    def __init__(self, reason: RejectReason, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


@dataclass(frozen=True, slots=True)
class Event:
    """One producer event, validated: the envelope plus its type-specific body."""

    event_id: uuid.UUID
    """Idempotency key: the same id is stored once."""
    event_type: EventType
    subject_id: str
    """Pseudonymous user id, 1 to 128 characters."""
    occurred_at: datetime
    """When it happened in the world; timezone-aware UTC, microsecond precision."""
    producer: str
    """Name of the emitting service."""
    body: Mapping[str, str] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return TOPIC_OF[self.event_type]

    @property
    def conversation_id(self) -> str | None:
        return self.body.get("conversation_id")


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (at most microsecond precision) into an aware UTC datetime."""
    if not _RFC3339.match(text):
        raise ValueError(f"not an RFC 3339 timestamp with a UTC offset: {text!r}")
    parsed = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before the year 1 in UTC
        raise ValueError(f"not an instant between the years 1 and 9999 in UTC: {text!r}") from None


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with exactly six fractional digits and a `Z`: the one textual form used everywhere."""
    if moment.tzinfo is not UTC:
        if moment.tzinfo is None:
            raise ValueError("naive datetime: every instant in the ledger is timezone-aware")
        moment = moment.astimezone(UTC)
    # isoformat, not strftime: it runs in C and zero-pads years before 1000 (strftime does not on Linux);
    # in UTC it ends in "+00:00", replaced by "Z".
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def _text(obj: Mapping[str, Any], name: str, *, max_length: int = MAX_TEXT_LENGTH) -> str:
    if name not in obj or obj[name] is None:
        raise InvalidEvent(RejectReason.MISSING_FIELD, f"missing field {name!r}", name)
    value = obj[name]
    if not isinstance(value, str):
        raise InvalidEvent(RejectReason.INVALID_FIELD, f"field {name!r} must be a string", name)
    if not 1 <= len(value) <= max_length:
        raise InvalidEvent(
            RejectReason.INVALID_FIELD, f"field {name!r} must have 1 to {max_length} characters", name
        )
    if not value.isprintable():
        # Invisible characters in ids (zero-width joiners, non-breaking spaces) would let two ids look alike.
        bad = next(c for c in value if not c.isprintable())
        raise InvalidEvent(
            RejectReason.INVALID_FIELD,
            f"field {name!r} has a character that is not printable (U+{ord(bad):04X}): only printable characters "
            "and the plain space are allowed",
            name,
        )
    return value


def event_from_json(obj: Mapping[str, Any], *, occurred_at: datetime | None = None) -> Event:
    """Validate the JSON form of an event (envelope fields at top level, body under `body`).

    A decoder that already holds `occurred_at` as an aware datetime (Avro's timestamp-micros) passes it,
    skipping a text round trip; every other rule is checked the same way for both wire forms.
    """
    if not isinstance(obj, Mapping):
        raise InvalidEvent(RejectReason.INVALID_FIELD, "an event must be a JSON object")
    raw_type = _text(obj, "event_type")
    try:
        event_type = EventType(raw_type)
    except ValueError:
        raise InvalidEvent(
            RejectReason.UNKNOWN_SCHEMA, f"unknown event_type {raw_type!r}", "event_type"
        ) from None
    try:
        event_id = uuid.UUID(_text(obj, "event_id"))
    except ValueError:
        raise InvalidEvent(RejectReason.INVALID_FIELD, "event_id must be a UUID", "event_id") from None
    subject_id = _text(obj, "subject_id", max_length=MAX_SUBJECT_ID_LENGTH)
    if occurred_at is None:
        try:
            occurred_at = parse_timestamp(_text(obj, "occurred_at"))
        except ValueError as error:
            raise InvalidEvent(RejectReason.INVALID_FIELD, str(error), "occurred_at") from None
    producer = _text(obj, "producer")
    raw_body = obj.get("body", {})
    if raw_body is None:
        raw_body = {}
    if not isinstance(raw_body, Mapping):
        raise InvalidEvent(RejectReason.INVALID_FIELD, "body must be an object", "body")
    body: dict[str, str] = {}
    for name, allowed in BODY_FIELDS[event_type].items():
        value = _text(raw_body, name)
        if allowed is not None and value not in allowed:
            raise InvalidEvent(
                RejectReason.INVALID_FIELD, f"{name} must be one of {', '.join(allowed)}", f"body.{name}"
            )
        body[name] = value
    unexpected = set(raw_body) - set(body)
    if unexpected:
        name = sorted(unexpected)[0]
        raise InvalidEvent(
            RejectReason.INVALID_FIELD, f"unexpected field {name!r} for {event_type}", f"body.{name}"
        )
    return Event(event_id, event_type, subject_id, occurred_at, producer, body)


def event_to_json(event: Event) -> dict[str, Any]:
    """The JSON form of an event; `event_from_json(event_to_json(e)) == e`."""
    return {
        "event_id": str(event.event_id),
        "event_type": event.event_type.value,
        "subject_id": event.subject_id,
        "occurred_at": format_timestamp(event.occurred_at),
        "producer": event.producer,
        "body": dict(event.body),
    }


def check_not_in_future(event: Event, now: datetime, allowed_skew: timedelta) -> None:
    """Refuse an event stamped further in the future than the producers' clocks may drift."""
    if event.occurred_at > now + allowed_skew:
        raise InvalidEvent(
            RejectReason.OCCURRED_AT_IN_FUTURE,
            f"occurred_at {format_timestamp(event.occurred_at)} is more than {allowed_skew} after "
            f"the ledger's clock {format_timestamp(now)}",
            "occurred_at",
        )
