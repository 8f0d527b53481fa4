"""The hash chain: the README's recipe recomputes it, any change is caught at its seq, batching does not matter."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from consent_ledger.core.events import Event
from consent_ledger.core.ledger import (
    GENESIS_HASH,
    ChainVerifier,
    EntryContent,
    LedgerEntry,
    append_entries,
    canonical_json,
)
from strategies import events

T = datetime(2026, 1, 1, tzinfo=UTC)


def readme_recipe(entries: list[LedgerEntry]) -> list[bytes]:
    """The few lines an auditor writes from README, "Verifying the chain by hand", without our code."""
    hashes, previous = [], bytes(32)
    for entry in entries:
        doc = {
            "seq": entry.seq, "event_id": str(entry.event_id), "event_type": entry.event_type,
            "subject_id": entry.subject_id, "producer": entry.content.producer, "body": dict(entry.body),
            "recorded_at": entry.recorded_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "occurred_at": entry.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        previous = hashlib.sha256(previous + data).digest()
        hashes.append(previous)
    return hashes


def in_batches(contents: list[EntryContent], sizes: list[int]) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    start = 0
    for number, size in enumerate(sizes):
        batch = contents[start:start + size]
        previous = entries[-1].entry_hash if entries else GENESIS_HASH
        entries += append_entries(previous, len(entries), T + timedelta(seconds=number), batch)
        start += size
    return entries


@given(st.lists(events(), min_size=1, max_size=12), st.data())
def test_any_batching_gives_a_chain_the_readme_recipe_and_the_verifier_accept(
    generated: list[Event], data: st.DataObject
) -> None:
    contents = [EntryContent.of_event(e) for e in generated if e.occurred_at.year >= 1000]
    sizes = []
    remaining = len(contents)
    while remaining:
        sizes.append(data.draw(st.integers(1, remaining)))
        remaining -= sizes[-1]
    entries = in_batches(contents, sizes)
    assert [e.seq for e in entries] == list(range(1, len(contents) + 1))
    assert [e.entry_hash for e in entries] == readme_recipe(entries)
    verifier = ChainVerifier()
    assert verifier.feed(entries) is None
    assert verifier.checked == len(entries)


@given(st.lists(events(), min_size=3, max_size=8), st.data())
def test_a_change_anywhere_is_named_at_its_seq(generated: list[Event], data: st.DataObject) -> None:
    entries = append_entries(GENESIS_HASH, 0, T, [EntryContent.of_event(e) for e in generated])
    index = data.draw(st.integers(0, len(entries) - 1))
    original = entries[index]
    forged_content = dataclasses.replace(original.content, producer=original.content.producer + "!")
    tampered = {
        "content": dataclasses.replace(original, content=forged_content),
        "hash": dataclasses.replace(original, entry_hash=bytes(32)),
        "seq": dataclasses.replace(original, seq=original.seq + 100),
        "recorded_at": dataclasses.replace(original, recorded_at=original.recorded_at - timedelta(seconds=1)),
    }[data.draw(st.sampled_from(["content", "hash", "seq", "recorded_at"]))]
    forged = [*entries[:index], tampered, *entries[index + 1:]]
    chain_break = ChainVerifier().feed(forged)
    assert chain_break is not None
    assert chain_break.seq == tampered.seq


JSON_DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=16,
)


@given(JSON_DOCUMENTS)
def test_canonical_json_is_the_readme_json_dumps_byte_for_byte(document: object) -> None:
    # canonical_json writes with orjson for speed; the chain is defined by the json.dumps recipe.
    expected = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_json(document) == expected
