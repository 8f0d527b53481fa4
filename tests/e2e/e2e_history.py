"""A history that makes every rule and reason code of SPEC section 5 the answer somewhere."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from consent_ledger.core.events import Event, EventType, parse_timestamp

E = EventType


def event(subject: str, event_type: EventType, occurred_at: str, **body: str) -> Event:
    return Event(uuid.uuid4(), event_type, subject, parse_timestamp(occurred_at), "e2e-test", body)


def history() -> list[Event]:
    return [
        # alice: no choice; a chat started in the opt-in era, resumed in the opt-out era.
        event("alice", E.ACCOUNT_REGISTERED, "2025-06-01T09:00:00Z", account_type="consumer"),
        event("alice", E.CONVERSATION_STARTED, "2025-07-01T10:00:00Z", conversation_id="a1"),
        event("alice", E.CONVERSATION_RESUMED, "2025-10-05T10:00:00Z", conversation_id="a1"),
        # bob: opted out; one chat reported as feedback, one not.
        event("bob", E.ACCOUNT_REGISTERED, "2025-05-01T09:00:00Z", account_type="consumer"),
        event("bob", E.CONSENT_CHANGED, "2025-10-01T08:00:00Z", choice="opt_out", source="policy_prompt"),
        event("bob", E.CONVERSATION_STARTED, "2025-10-02T10:00:00Z", conversation_id="b1"),
        event("bob", E.FEEDBACK_REPORTED, "2025-10-03T10:00:00Z", conversation_id="b1", rating="report"),
        event("bob", E.CONVERSATION_STARTED, "2025-10-04T10:00:00Z", conversation_id="b2"),
        # carol: opted out, a chat flagged for safety review, later cleared.
        event("carol", E.ACCOUNT_REGISTERED, "2025-04-01T09:00:00Z", account_type="consumer"),
        event("carol", E.CONVERSATION_STARTED, "2025-10-02T11:00:00Z", conversation_id="c1"),
        event("carol", E.CONSENT_CHANGED, "2025-10-05T08:00:00Z", choice="opt_out", source="settings"),
        event("carol", E.SAFETY_FLAGGED, "2025-10-06T12:00:00Z", conversation_id="c1", flag_id="f1",
              category="violence"),
        event("carol", E.SAFETY_CLEARED, "2025-10-08T12:00:00Z", conversation_id="c1", flag_id="f1"),
        # dave: commercial, then consumer: only activity after the change counts.
        event("dave", E.ACCOUNT_REGISTERED, "2025-03-01T09:00:00Z", account_type="commercial"),
        event("dave", E.CONVERSATION_STARTED, "2025-10-02T12:00:00Z", conversation_id="d1"),
        event("dave", E.ACCOUNT_TYPE_CHANGED, "2025-10-10T12:00:00Z", account_type="consumer"),
        event("dave", E.CONVERSATION_RESUMED, "2025-10-12T12:00:00Z", conversation_id="d1"),
        # erin: a deleted chat.
        event("erin", E.ACCOUNT_REGISTERED, "2025-02-01T09:00:00Z", account_type="consumer"),
        event("erin", E.CONVERSATION_STARTED, "2025-10-02T13:00:00Z", conversation_id="e1"),
        event("erin", E.CONVERSATION_DELETED, "2025-10-20T13:00:00Z", conversation_id="e1"),
        # gina: a deleted account.
        event("gina", E.ACCOUNT_REGISTERED, "2025-02-01T09:00:00Z", account_type="consumer"),
        event("gina", E.CONVERSATION_STARTED, "2025-10-02T13:00:00Z", conversation_id="g1"),
        event("gina", E.ACCOUNT_DELETED, "2025-10-15T00:00:00Z"),
        # hank: opted out during the chat, opted in again without resuming it.
        event("hank", E.ACCOUNT_REGISTERED, "2025-02-01T09:00:00Z", account_type="consumer"),
        event("hank", E.CONSENT_CHANGED, "2025-10-01T00:00:00Z", choice="opt_out", source="settings"),
        event("hank", E.CONVERSATION_STARTED, "2025-10-02T00:00:00Z", conversation_id="h1"),
        event("hank", E.CONSENT_CHANGED, "2025-10-03T00:00:00Z", choice="opt_in", source="settings"),
        # ivan: opted in before the switch, chat at the boundary instant itself.
        event("ivan", E.ACCOUNT_REGISTERED, "2025-01-01T00:00:00Z", account_type="consumer"),
        event("ivan", E.CONVERSATION_STARTED, "2025-09-28T00:00:00Z", conversation_id="i1"),
        # frank: will opt out late (LATE below).
        event("frank", E.ACCOUNT_REGISTERED, "2025-09-01T09:00:00Z", account_type="consumer"),
        event("frank", E.CONVERSATION_STARTED, "2025-10-02T14:00:00Z", conversation_id="f1"),
    ]


# (subject, conversation, at) -> (eligible, basis or reason): written from the SPEC's rules by hand.
EXPECTED = {
    ("nobody", "x1", "2025-10-10T00:00:00Z"): (False, "unknown_account"),
    ("alice", "a1", "2025-05-01T00:00:00Z"): (False, "unknown_account"),
    ("alice", "a1", "2025-07-15T00:00:00Z"): (False, "no_opt_in"),
    ("alice", "a1", "2025-10-01T00:00:00Z"): (False, "no_activity_under_consent"),
    ("alice", "a1", "2025-10-10T00:00:00Z"): (True, "consent"),
    ("alice", "zz", "2025-10-10T00:00:00Z"): (False, "unknown_conversation"),
    ("bob", "b1", "2025-10-10T00:00:00Z"): (True, "feedback"),
    ("bob", "b2", "2025-10-10T00:00:00Z"): (False, "opted_out"),
    ("carol", "c1", "2025-10-04T00:00:00Z"): (True, "consent"),
    ("carol", "c1", "2025-10-07T00:00:00Z"): (True, "safety_flag"),
    ("carol", "c1", "2025-10-09T00:00:00Z"): (False, "opted_out"),
    ("dave", "d1", "2025-10-05T00:00:00Z"): (False, "commercial_account"),
    ("dave", "d1", "2025-10-11T00:00:00Z"): (False, "no_activity_under_consent"),
    ("dave", "d1", "2025-10-13T00:00:00Z"): (True, "consent"),
    ("erin", "e1", "2025-10-10T00:00:00Z"): (True, "consent"),
    ("erin", "e1", "2025-10-21T00:00:00Z"): (False, "conversation_deleted"),
    ("gina", "g1", "2025-10-10T00:00:00Z"): (True, "consent"),
    ("gina", "g1", "2025-10-16T00:00:00Z"): (False, "account_deleted"),
    ("hank", "h1", "2025-10-02T12:00:00Z"): (False, "opted_out"),
    ("hank", "h1", "2025-10-04T00:00:00Z"): (False, "no_activity_under_consent"),
    ("ivan", "i1", "2025-09-28T00:00:00Z"): (True, "consent"),
    ("frank", "f1", "2025-10-10T00:00:00Z"): (True, "consent"),
}


@dataclass(frozen=True)
class Late:
    events: list[Event]
    question: tuple[str, str, str]


LATE = Late(
    [event("frank", E.CONSENT_CHANGED, "2025-10-01T09:00:00Z", choice="opt_out", source="support")],
    ("frank", "f1", "2025-10-10T00:00:00Z"),
)
