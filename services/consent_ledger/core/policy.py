"""The policy timeline: which consent policy is in force at an instant, and its JSON form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from consent_ledger.core.events import format_timestamp, parse_timestamp

_TIMELINE_KEYS = frozenset({"timeline_id", "description", "periods"})
_PERIOD_KEYS = frozenset({"policy_version", "from", "default_consent_on"})


@dataclass(frozen=True, slots=True)
class PolicyPeriod:
    """One consent policy and the instant it comes into force (inclusive); None = since forever."""

    policy_version: str
    starts_at: datetime | None
    default_consent_on: bool
    """consent_on(t) for a user who made no choice while this policy is in force."""


@dataclass(frozen=True, slots=True)
class PolicyTimeline:
    """Consecutive policy periods: the first since forever, each in force until the next one starts."""

    timeline_id: str
    periods: tuple[PolicyPeriod, ...]
    description: str = field(default="", compare=False)
    """Prose for readers; not part of what the timeline decides, so not compared."""

    def __post_init__(self) -> None:
        _check_periods(self.periods)

    def in_force(self, at: datetime) -> PolicyPeriod:
        """The period in force at `at`; a period applies from its start instant inclusive."""
        current = self.periods[0]
        for period in self.periods[1:]:
            assert period.starts_at is not None  # guaranteed by _check_periods
            if period.starts_at > at:
                break
            current = period
        return current

    @property
    def boundaries(self) -> tuple[datetime, ...]:
        """The instants at which a new policy comes into force, in order."""
        return tuple(p.starts_at for p in self.periods if p.starts_at is not None)


def _check_periods(periods: tuple[PolicyPeriod, ...]) -> None:
    if not periods:
        raise ValueError("a policy timeline needs at least one period")
    if periods[0].starts_at is not None:
        raise ValueError("the first policy period must have from=null: some policy is always in force")
    versions = [p.policy_version for p in periods]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        raise ValueError(f"policy versions must be unique; repeated: {', '.join(duplicates)}")
    previous: datetime | None = None
    for period in periods[1:]:
        if period.starts_at is None:
            raise ValueError(f"only the first period may have from=null, not {period.policy_version!r}")
        if period.starts_at.tzinfo is None:
            raise ValueError(f"period {period.policy_version!r} starts at a naive datetime")
        if previous is not None and period.starts_at <= previous:
            raise ValueError(
                f"periods must be in strictly increasing order of from: {period.policy_version!r} "
                f"starts at {format_timestamp(period.starts_at)}, not after {format_timestamp(previous)}"
            )
        previous = period.starts_at


def _require_keys(obj: Mapping[str, Any], allowed: frozenset[str], required: set[str], where: str) -> None:
    missing = sorted(required - set(obj))
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    unexpected = sorted(set(obj) - allowed)
    if unexpected:
        # A misspelt key (say "form" for "from") would otherwise silently change the policy.
        raise ValueError(f"{where}: unexpected {', '.join(unexpected)}")


def _period_from_json(obj: Any, index: int) -> PolicyPeriod:
    where = f"periods[{index}]"
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object")
    _require_keys(obj, _PERIOD_KEYS, set(_PERIOD_KEYS), where)
    version = obj["policy_version"]
    if not isinstance(version, str) or not version:
        raise ValueError(f"{where}.policy_version must be a non-empty string")
    default_on = obj["default_consent_on"]
    if not isinstance(default_on, bool):
        raise ValueError(f"{where}.default_consent_on must be true or false")
    starts = obj["from"]
    if starts is not None and not isinstance(starts, str):
        raise ValueError(f"{where}.from must be null or an RFC 3339 timestamp")
    try:
        starts_at = None if starts is None else parse_timestamp(starts)
    except ValueError as error:
        raise ValueError(f"{where}.from: {error}") from None
    return PolicyPeriod(version, starts_at, default_on)


def timeline_from_json(obj: Mapping[str, Any]) -> PolicyTimeline:
    """Parse and check the JSON form of a timeline (see schemas/policy/timeline.json)."""
    if not isinstance(obj, Mapping):
        raise ValueError("a policy timeline must be an object")
    _require_keys(obj, _TIMELINE_KEYS, {"timeline_id", "periods"}, "timeline")
    timeline_id = obj["timeline_id"]
    if not isinstance(timeline_id, str) or not timeline_id:
        raise ValueError("timeline_id must be a non-empty string")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ValueError("description must be a string")
    raw_periods = obj["periods"]
    if not isinstance(raw_periods, list):
        raise ValueError("periods must be a list")
    periods = tuple(_period_from_json(p, i) for i, p in enumerate(raw_periods))
    return PolicyTimeline(timeline_id, periods, description)


def timeline_to_json(timeline: PolicyTimeline) -> dict[str, Any]:
    """The JSON form; `timeline_from_json(timeline_to_json(t)) == t`."""
    document: dict[str, Any] = {"timeline_id": timeline.timeline_id}
    if timeline.description:
        document["description"] = timeline.description
    document["periods"] = [
        {
            "policy_version": p.policy_version,
            "from": None if p.starts_at is None else format_timestamp(p.starts_at),
            "default_consent_on": p.default_consent_on,
        }
        for p in timeline.periods
    ]
    return document


OPT_OUT_SWITCH = datetime(2025, 9, 28, tzinfo=UTC)
"""When the consumer product moved from opt-in to opt-out (SPEC section 5)."""

DEFAULT_TIMELINE = PolicyTimeline(
    "default-2025-09-28",
    (
        PolicyPeriod("v1-opt-in", None, default_consent_on=False),
        PolicyPeriod("v2-opt-out", OPT_OUT_SWITCH, default_consent_on=True),
    ),
)
"""The timeline shipped in schemas/policy/timeline.json (a test keeps the two equal)."""
