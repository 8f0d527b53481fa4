"""Decides whether a conversation may be used for training at an instant: SPEC section 5, rule by rule.

`decide_eligibility` reads only three things from the facts, so the audit API may hand it partial facts:
the consent interval containing `at`, the account interval containing `at`, and the facts of the
conversation with `occurred_at <= at`.

Answers, beyond the SPEC's wording:
- an eligible answer has empty `reasons` (its `basis` says why);
- a not-eligible answer has exactly one reason, the code of the rule that decided it;
- `evidence_seqs` are the entries the answer rests on: the registration and the entry that set the account
  type (once past rule 1), the deletion that decided rules 2 and 4, the consent change deciding
  consent_on(at) (rule 5, when a choice was made), and for rule 5: when eligible, the entries behind each
  basis that holds (counted activities, feedback, open flags); when not, every event of the conversation
  in view, since each was examined and found not to count. An absence (rule 1) has no evidence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from consent_ledger.core.facts import (
    AccountInterval,
    ConsentInterval,
    ConversationFact,
    ConversationKind,
    SubjectFacts,
    fold_subject,
)
from consent_ledger.core.ledger import LedgerEntry
from consent_ledger.core.policy import PolicyTimeline

UNKNOWN_ACCOUNT = "unknown_account"
ACCOUNT_DELETED = "account_deleted"
COMMERCIAL_ACCOUNT = "commercial_account"
CONVERSATION_DELETED = "conversation_deleted"
UNKNOWN_CONVERSATION = "unknown_conversation"
OPTED_OUT = "opted_out"
NO_OPT_IN = "no_opt_in"
NO_ACTIVITY_UNDER_CONSENT = "no_activity_under_consent"

BASIS_CONSENT = "consent"
BASIS_FEEDBACK = "feedback"
BASIS_SAFETY_FLAG = "safety_flag"


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer to "may this conversation be used for training at `at`?" and what it rests on."""

    eligible: bool
    basis: tuple[str, ...]
    """The bases that hold, in SPEC order: consent, feedback, safety_flag."""
    reasons: tuple[str, ...]
    """Empty when eligible; otherwise the code of the rule that decided it."""
    policy_version: str
    """The policy in force at `at`."""
    evidence_seqs: tuple[int, ...]
    """Sorted seqs of the ledger entries the answer rests on."""


def _refusal(code: str, policy_version: str, evidence: Iterable[int | None]) -> Decision:
    return Decision(False, (), (code,), policy_version, _sorted_seqs(evidence))


def _sorted_seqs(seqs: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(sorted({s for s in seqs if s is not None}))


def _open_flags(history: Sequence[ConversationFact]) -> list[ConversationFact]:
    # A flag is closed by any clearing of its flag_id in view, whichever of the two happened first.
    cleared = {f.flag_id for f in history if f.kind == ConversationKind.CLEARED}
    return [f for f in history if f.kind == ConversationKind.FLAGGED and f.flag_id not in cleared]


def _bases(consent: ConsentInterval, history: Sequence[ConversationFact]) -> dict[str, list[int]]:
    """The bases that hold, each with the seqs that make it hold."""
    counted = [f.seq for f in history if f.counts_for_consent]
    feedback = [f.seq for f in history if f.kind == ConversationKind.FEEDBACK]
    flags = [f.seq for f in _open_flags(history)]
    bases: dict[str, list[int]] = {}
    if consent.consent_on and counted:
        bases[BASIS_CONSENT] = [*counted, *([] if consent.source_seq is None else [consent.source_seq])]
    if feedback:
        bases[BASIS_FEEDBACK] = feedback
    if flags:
        bases[BASIS_SAFETY_FLAG] = flags
    return bases


def _reason_without_basis(consent: ConsentInterval, history: Sequence[ConversationFact]) -> str:
    if not history:
        return UNKNOWN_CONVERSATION
    if consent.choice == "opt_out":
        return OPTED_OUT
    if consent.choice is None and not consent.consent_on:
        return NO_OPT_IN
    return NO_ACTIVITY_UNDER_CONSENT


class FoldedUnderAnotherPolicy(ValueError):
    """The facts were folded under another policy timeline: their defaults would answer the wrong policy."""

    def __init__(self, at: datetime, folded_version: str, policy_version: str) -> None:
        super().__init__(
            f"the consent interval at {at.isoformat()} was folded under {folded_version!r}, "
            f"but {policy_version!r} is in force in the timeline given"
        )
        self.folded_version = folded_version
        self.policy_version = policy_version


def _consent_in_view(facts: SubjectFacts, at: datetime, policy_version: str) -> ConsentInterval:
    consent = facts.consent_at(at)
    if consent is None:
        raise ValueError(f"the facts of {facts.subject_id!r} have no consent interval containing {at}")
    if consent.policy_version != policy_version:
        raise FoldedUnderAnotherPolicy(at, consent.policy_version, policy_version)
    return consent


def _account_evidence(account: AccountInterval) -> list[int | None]:
    return [account.registered_seq, account.type_seq]


def decide_eligibility(
    facts: SubjectFacts, conversation_id: str, at: datetime, timeline: PolicyTimeline
) -> Decision:
    """SPEC section 5 on the facts of one subject; the first rule that applies decides."""
    policy_version = timeline.in_force(at).policy_version
    account = facts.account_at(at)
    # Rule 1. No account interval at all is a subject the ledger has never heard of.
    if account is None or not account.registered:
        return _refusal(UNKNOWN_ACCOUNT, policy_version, [])
    # Rule 2: never used from the account's deletion on, whatever else holds.
    if account.deleted:
        return _refusal(ACCOUNT_DELETED, policy_version, [account.registered_seq, account.deleted_seq])
    # Rule 3: the type at `at` decides; activity while commercial is also kept out by the fold.
    if account.account_type == "commercial":
        return _refusal(COMMERCIAL_ACCOUNT, policy_version, _account_evidence(account))
    history = [f for f in facts.conversations if f.conversation_id == conversation_id and f.occurred_at <= at]
    history.sort(key=ConversationFact.sort_key)
    # Rule 4: never used from the conversation's deletion on, even if resumed later.
    deletions = [f.seq for f in history if f.kind == ConversationKind.DELETED]
    if deletions:
        return _refusal(CONVERSATION_DELETED, policy_version, [*_account_evidence(account), deletions[0]])
    # Rule 5: the bases; without one, the first reason that fits.
    consent = _consent_in_view(facts, at, policy_version)
    bases = _bases(consent, history)
    if bases:
        evidence = [*_account_evidence(account), *(s for seqs in bases.values() for s in seqs)]
        return Decision(True, tuple(bases), (), policy_version, _sorted_seqs(evidence))
    reason = _reason_without_basis(consent, history)
    examined = [*_account_evidence(account), consent.source_seq, *(f.seq for f in history)]
    return _refusal(reason, policy_version, examined)


def decide_from_entries(
    entries: Iterable[LedgerEntry],
    subject_id: str,
    conversation_id: str,
    at: datetime,
    known_at: datetime,
    timeline: PolicyTimeline,
) -> Decision:
    """The reference answer: fold exactly the SPEC's view of the ledger, then decide."""
    return decide_from_known(
        [e for e in entries if e.recorded_at <= known_at], subject_id, conversation_id, at, timeline
    )


def decide_from_known(
    known: Iterable[LedgerEntry], subject_id: str, conversation_id: str, at: datetime, timeline: PolicyTimeline
) -> Decision:
    """The answer from a subject's entries already cut to what was known (say, up to a receipt's watermark)."""
    view = [e for e in known if e.occurred_at <= at]
    return decide_eligibility(fold_subject(subject_id, view, timeline), conversation_id, at, timeline)
