"""SPEC section 5 read naively, straight off the ledger entries in view: no intervals, no facts, no core code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from consent_ledger.core.ledger import LedgerEntry

SWITCH = datetime(2025, 9, 28, tzinfo=UTC)
"""The instant v2-opt-out comes into force, written out independently of the code under test."""
ACTIVITY = ("conversation.started", "conversation.resumed")


def _last(view: Sequence[LedgerEntry], types: Iterable[str], moment: datetime) -> LedgerEntry | None:
    found = [e for e in view if e.event_type in set(types) and e.occurred_at <= moment]
    return found[-1] if found else None


def spec_consent_on(view: Sequence[LedgerEntry], moment: datetime) -> bool:
    change = _last(view, ["consent.changed"], moment)
    if change is None:
        return moment >= SWITCH
    return bool(change.body["choice"] == "opt_in")


def spec_account_type(view: Sequence[LedgerEntry], moment: datetime) -> str | None:
    entry = _last(view, ["account.registered", "account.type_changed"], moment)
    return None if entry is None else str(entry.body["account_type"])


def spec_answer(
    entries: Sequence[LedgerEntry], subject: str, conversation: str, at: datetime, known_at: datetime
) -> tuple[bool, tuple[str, ...], str | None, str]:
    """(eligible, basis, first reason, policy_version) by SPEC section 5, word for word."""
    view = sorted(
        (e for e in entries if e.subject_id == subject and e.occurred_at <= at and e.recorded_at <= known_at),
        key=lambda e: (e.occurred_at, e.seq),
    )
    policy = "v2-opt-out" if at >= SWITCH else "v1-opt-in"
    kinds = {e.event_type for e in view}
    if "account.registered" not in kinds:
        return False, (), "unknown_account", policy
    if "account.deleted" in kinds:
        return False, (), "account_deleted", policy
    if spec_account_type(view, at) == "commercial":
        return False, (), "commercial_account", policy
    mine = [e for e in view if e.body.get("conversation_id") == conversation]
    if any(e.event_type == "conversation.deleted" for e in mine):
        return False, (), "conversation_deleted", policy
    basis = []
    counted = [
        e
        for e in mine
        if e.event_type in ACTIVITY
        and spec_consent_on(view, e.occurred_at)
        and spec_account_type(view, e.occurred_at) == "consumer"
    ]
    if spec_consent_on(view, at) and counted:
        basis.append("consent")
    if any(e.event_type == "feedback.reported" for e in mine):
        basis.append("feedback")
    cleared = {e.body["flag_id"] for e in mine if e.event_type == "safety.cleared"}
    if any(e.event_type == "safety.flagged" and e.body["flag_id"] not in cleared for e in mine):
        basis.append("safety_flag")
    if basis:
        return True, tuple(basis), None, policy
    choice = _last(view, ["consent.changed"], at)
    if not mine:
        reason = "unknown_conversation"
    elif choice is not None and choice.body["choice"] == "opt_out":
        reason = "opted_out"
    elif choice is None and at < SWITCH:
        reason = "no_opt_in"
    else:
        reason = "no_activity_under_consent"
    return False, (), reason, policy
