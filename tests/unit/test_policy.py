"""The policy timeline: parsing and checking its JSON form, and which policy is in force when."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consent_ledger.core.policy import (
    DEFAULT_TIMELINE,
    PolicyPeriod,
    PolicyTimeline,
    timeline_from_json,
    timeline_to_json,
)

SHIPPED = Path(__file__).resolve().parents[2] / "schemas" / "policy" / "timeline.json"
SWITCH = datetime(2025, 9, 28, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)

VALID: dict[str, Any] = {
    "timeline_id": "t",
    "periods": [
        {"policy_version": "a", "from": None, "default_consent_on": False},
        {"policy_version": "b", "from": "2025-09-28T00:00:00Z", "default_consent_on": True},
        {"policy_version": "c", "from": "2026-01-01T00:00:00.000001+01:00", "default_consent_on": False},
    ],
}


DELETE = object()


def with_change(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


def test_shipped_timeline_is_the_default_of_the_spec() -> None:
    shipped = timeline_from_json(json.loads(SHIPPED.read_text()))
    assert shipped == DEFAULT_TIMELINE
    assert [(p.policy_version, p.starts_at, p.default_consent_on) for p in shipped.periods] == [
        ("v1-opt-in", None, False),
        ("v2-opt-out", SWITCH, True),
    ]
    assert shipped.description


def test_v2_is_in_force_from_the_switch_instant_inclusive() -> None:
    assert DEFAULT_TIMELINE.in_force(SWITCH).policy_version == "v2-opt-out"
    assert DEFAULT_TIMELINE.in_force(SWITCH + MICROSECOND).policy_version == "v2-opt-out"


def test_v1_is_in_force_one_microsecond_before_the_switch() -> None:
    period = DEFAULT_TIMELINE.in_force(SWITCH - MICROSECOND)
    assert period.policy_version == "v1-opt-in"
    assert period.default_consent_on is False


def test_boundaries_are_the_start_instants_after_the_first() -> None:
    timeline = timeline_from_json(VALID)
    assert timeline.boundaries == (SWITCH, datetime(2025, 12, 31, 23, 0, 0, 1, tzinfo=UTC))
    assert DEFAULT_TIMELINE.boundaries == (SWITCH,)


def test_in_force_walks_every_period() -> None:
    timeline = timeline_from_json(VALID)
    third = datetime(2025, 12, 31, 23, 0, 0, 1, tzinfo=UTC)
    assert [timeline.in_force(t).policy_version for t in (datetime.min.replace(tzinfo=UTC), SWITCH, third)] == [
        "a",
        "b",
        "c",
    ]
    assert timeline.in_force(third - MICROSECOND).policy_version == "b"


def test_json_round_trip() -> None:
    timeline = timeline_from_json(VALID)
    assert timeline_from_json(timeline_to_json(timeline)) == timeline
    shipped = json.loads(SHIPPED.read_text())
    assert timeline_to_json(timeline_from_json(shipped)) == shipped


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (with_change(("periods",), []), "at least one period"),
        (with_change(("periods",), {"a": 1}), "periods must be a list"),
        (with_change(("timeline_id",), DELETE), "missing timeline_id"),
        (with_change(("timeline_id",), ""), "timeline_id must be a non-empty string"),
        (with_change(("colour",), "blue"), "unexpected colour"),
        (with_change(("periods", 0, "from"), "2020-01-01T00:00:00Z"), "first policy period must have from=null"),
        (with_change(("periods", 1, "from"), None), "only the first period may have from=null"),
        (with_change(("periods", 2, "from"), "2025-09-28T00:00:00Z"), "strictly increasing"),
        (with_change(("periods", 2, "from"), "2025-09-27T00:00:00Z"), "strictly increasing"),
        (with_change(("periods", 2, "policy_version"), "a"), "unique; repeated: a"),
        (with_change(("periods", 1, "policy_version"), ""), "periods[1].policy_version"),
        (with_change(("periods", 1, "from"), "2025-09-28"), "periods[1].from"),
        (with_change(("periods", 1, "from"), "2025-09-28T00:00:00"), "periods[1].from"),
        (with_change(("periods", 1, "from"), 1759017600), "periods[1].from"),
        (with_change(("periods", 1, "default_consent_on"), "true"), "default_consent_on must be true or false"),
        (with_change(("periods", 1, "default_consent_on"), 1), "default_consent_on must be true or false"),
        (with_change(("periods", 1, "default_consent_on"), DELETE), "periods[1]: missing default_consent_on"),
        (with_change(("periods", 1, "form"), None), "periods[1]: unexpected form"),
        (with_change(("periods", 1), "v2"), "periods[1] must be an object"),
    ],
)
def test_invalid_timelines_are_refused_with_the_reason(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        timeline_from_json(document)


def test_a_timeline_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="first policy period"):
        PolicyTimeline("t", (PolicyPeriod("v2", SWITCH, True),))
    with pytest.raises(ValueError, match="naive"):
        PolicyTimeline("t", (PolicyPeriod("v1", None, False), PolicyPeriod("v2", datetime(2025, 9, 28), True)))
