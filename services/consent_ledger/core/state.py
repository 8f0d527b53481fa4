"""The current state of a subject, summarised from its facts: the `subject_current_state` table's rows."""

from __future__ import annotations

from typing import Any

from consent_ledger.core.facts import SubjectFacts


def current_state(facts: SubjectFacts) -> dict[str, Any]:
    """Latest consent choice, account and each conversation's status: what holds from the last event on."""
    consent = facts.consent[-1] if facts.consent else None
    account = facts.account[-1] if facts.account else None
    conversations: dict[str, dict[str, Any]] = {}
    for fact in facts.conversations:
        status = conversations.setdefault(
            fact.conversation_id,
            {"activities": 0, "counted_activities": 0, "deleted": False, "open_flags": [], "feedback": 0},
        )
        if fact.kind in ("started", "resumed"):
            status["activities"] += 1
            status["counted_activities"] += int(fact.counts_for_consent)
        elif fact.kind == "deleted":
            status["deleted"] = True
        elif fact.kind == "feedback":
            status["feedback"] += 1
        elif fact.kind == "flagged" and fact.flag_id not in status["open_flags"]:
            status["open_flags"].append(fact.flag_id)
    for fact in facts.conversations:
        if fact.kind == "cleared" and fact.flag_id in conversations[fact.conversation_id]["open_flags"]:
            conversations[fact.conversation_id]["open_flags"].remove(fact.flag_id)
    return {
        "consent_choice": consent.choice if consent else None,
        "consent_on": consent.consent_on if consent else None,
        "account_type": account.account_type if account else None,
        "registered": account.registered if account else False,
        "deleted": account.deleted if account else False,
        "conversations": conversations,
    }
