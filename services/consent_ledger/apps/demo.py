"""The demo history of `up --demo`: subjects across the 2025-09-28 policy switch, and questions about them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from consent_ledger.core.events import Event, EventType, parse_timestamp

PRODUCER = "demo"


def _event(subject: str, event_type: EventType, occurred_at: str, **body: str) -> Event:
    # Deterministic ids: running the demo twice against one ledger stores each event once.
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"consent-ledger-demo/{subject}/{event_type}/{occurred_at}")
    return Event(event_id, event_type, subject, parse_timestamp(occurred_at), PRODUCER, body)


def demo_history() -> list[Event]:
    """The first wave: what producers report on time."""
    e = EventType
    return [
        _event("alice", e.ACCOUNT_REGISTERED, "2025-06-01T09:00:00Z", account_type="consumer"),
        _event("alice", e.CONVERSATION_STARTED, "2025-07-01T10:00:00Z", conversation_id="a-chat-1"),
        _event("alice", e.CONVERSATION_RESUMED, "2025-10-05T10:00:00Z", conversation_id="a-chat-1"),
        _event("bob", e.ACCOUNT_REGISTERED, "2025-05-01T09:00:00Z", account_type="consumer"),
        _event("bob", e.CONSENT_CHANGED, "2025-10-01T08:00:00Z", choice="opt_out", source="policy_prompt"),
        _event("bob", e.CONVERSATION_STARTED, "2025-10-02T10:00:00Z", conversation_id="b-chat-1"),
        _event("bob", e.FEEDBACK_REPORTED, "2025-10-03T10:00:00Z", conversation_id="b-chat-1", rating="report"),
        _event("bob", e.CONVERSATION_STARTED, "2025-10-04T10:00:00Z", conversation_id="b-chat-2"),
        _event("carol", e.ACCOUNT_REGISTERED, "2025-04-01T09:00:00Z", account_type="consumer"),
        _event("carol", e.CONVERSATION_STARTED, "2025-10-02T11:00:00Z", conversation_id="c-chat-1"),
        _event("carol", e.CONSENT_CHANGED, "2025-10-05T08:00:00Z", choice="opt_out", source="settings"),
        _event("carol", e.SAFETY_FLAGGED, "2025-10-06T12:00:00Z", conversation_id="c-chat-1", flag_id="flag-1",
               category="self_harm"),
        _event("carol", e.SAFETY_CLEARED, "2025-10-08T12:00:00Z", conversation_id="c-chat-1", flag_id="flag-1"),
        _event("dave", e.ACCOUNT_REGISTERED, "2025-03-01T09:00:00Z", account_type="commercial"),
        _event("dave", e.CONVERSATION_STARTED, "2025-10-02T12:00:00Z", conversation_id="d-chat-1"),
        _event("erin", e.ACCOUNT_REGISTERED, "2025-02-01T09:00:00Z", account_type="consumer"),
        _event("erin", e.CONVERSATION_STARTED, "2025-10-02T13:00:00Z", conversation_id="e-chat-1"),
        _event("erin", e.CONVERSATION_DELETED, "2025-10-20T13:00:00Z", conversation_id="e-chat-1"),
        _event("frank", e.ACCOUNT_REGISTERED, "2025-09-01T09:00:00Z", account_type="consumer"),
        _event("frank", e.CONVERSATION_STARTED, "2025-10-02T14:00:00Z", conversation_id="f-chat-1"),
    ]


def late_events() -> list[Event]:
    """The second wave: frank's opt-out of 1 October, reported weeks late by the support desk."""
    return [_event("frank", EventType.CONSENT_CHANGED, "2025-10-01T09:00:00Z", choice="opt_out", source="support")]


@dataclass(frozen=True)
class DemoQuestion:
    subject_id: str
    conversation_id: str
    at: str
    story: str


DEMO_QUESTIONS = [
    DemoQuestion("alice", "a-chat-1", "2025-07-15T00:00:00Z", "before the switch, no choice made: opt-in era"),
    DemoQuestion("alice", "a-chat-1", "2025-10-10T00:00:00Z", "resumed after the switch: opt-out era default"),
    DemoQuestion("bob", "b-chat-1", "2025-10-10T00:00:00Z", "opted out, but reported this chat as feedback"),
    DemoQuestion("bob", "b-chat-2", "2025-10-10T00:00:00Z", "opted out, another chat"),
    DemoQuestion("carol", "c-chat-1", "2025-10-07T00:00:00Z", "opted out, chat flagged for safety review"),
    DemoQuestion("carol", "c-chat-1", "2025-10-09T00:00:00Z", "the flag was cleared"),
    DemoQuestion("dave", "d-chat-1", "2025-10-10T00:00:00Z", "commercial account"),
    DemoQuestion("erin", "e-chat-1", "2025-10-10T00:00:00Z", "before the chat was deleted"),
    DemoQuestion("erin", "e-chat-1", "2025-10-21T00:00:00Z", "after the chat was deleted"),
]
LATE_QUESTION = DemoQuestion("frank", "f-chat-1", "2025-10-10T00:00:00Z", "a late opt-out changes what we know")
