"""Hypothesis strategies for valid events of every type, shared by the test suites."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from consent_ledger.core.events import (
    BODY_FIELDS,
    MAX_SUBJECT_ID_LENGTH,
    MAX_TEXT_LENGTH,
    Event,
    EventType,
    event_from_json,
    format_timestamp,
)

# Hypothesis rarely picks these on its own; they are the ones that break naive encoders.
_ODD = "é\u0301ß漢字🙂👩‍🔬\u05d0\u0627Ωﬁ\U0001f3f3 \"'\\{}<>&%"
_ALPHABET = st.one_of(
    # Not the categories `str.isprintable` refuses: controls, format, surrogates, private use,
    # unassigned, separators (the plain space is added back below).
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")),
    st.sampled_from([c for c in _ODD if c.isprintable()]),
    st.just(" "),
)


def printable_text(max_size: int = MAX_TEXT_LENGTH) -> st.SearchStrategy[str]:
    """Non-empty printable text as the contract allows: any script, emoji, combining marks, quotes."""
    # Hypothesis favours short text; the near-limit branch keeps the length bound exercised.
    return st.one_of(
        st.text(_ALPHABET, min_size=1, max_size=max_size),
        st.text(_ALPHABET, min_size=max(1, max_size - 8), max_size=max_size),
    )


def subject_ids() -> st.SearchStrategy[str]:
    """Pseudonymous subject ids: 1 to 128 printable characters."""
    return printable_text(MAX_SUBJECT_ID_LENGTH)


def timestamps(
    min_value: datetime = datetime(2000, 1, 1), max_value: datetime = datetime(2100, 1, 1)
) -> st.SearchStrategy[datetime]:
    """Aware UTC instants with microseconds, by default between the years 2000 and 2100."""
    return st.datetimes(min_value=min_value, max_value=max_value, timezones=st.just(UTC))


def bodies(event_type: EventType) -> st.SearchStrategy[dict[str, str]]:
    fields: dict[str, st.SearchStrategy[str]] = {
        name: st.sampled_from(allowed) if allowed is not None else printable_text()
        for name, allowed in BODY_FIELDS[event_type].items()
    }
    return st.fixed_dictionaries(fields)


@st.composite
def event_json(
    draw: st.DrawFn,
    event_types: Sequence[EventType] = tuple(EventType),
    subject_id: st.SearchStrategy[str] | None = None,
    occurred_at: st.SearchStrategy[datetime] | None = None,
) -> dict[str, Any]:
    """The JSON form of a valid event (as `event_to_json` writes it)."""
    event_type = draw(st.sampled_from(event_types))
    return {
        "event_id": str(draw(st.uuids())),
        "event_type": event_type.value,
        "subject_id": draw(subject_id if subject_id is not None else subject_ids()),
        "occurred_at": format_timestamp(draw(occurred_at if occurred_at is not None else timestamps())),
        "producer": draw(printable_text()),
        "body": draw(bodies(event_type)),
    }


def events(
    event_types: Sequence[EventType] = tuple(EventType),
    subject_id: st.SearchStrategy[str] | None = None,
    occurred_at: st.SearchStrategy[datetime] | None = None,
) -> st.SearchStrategy[Event]:
    """Valid events of the given types (default: all), validated by the same code as real input."""
    return event_json(event_types, subject_id, occurred_at).map(event_from_json)
