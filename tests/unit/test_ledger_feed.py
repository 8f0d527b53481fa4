"""The `ledger.entries` feed as processors read it: messages merged, and runs of offsets without a gap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consent_ledger.adapters.kafka.ledger_feed import (
    Announcement,
    WatermarkTick,
    announcement_messages,
    merge_announcements,
    tick_message,
    unbroken_runs,
)


def test_messages_merge_into_each_subject_s_highest_seq_and_ticks_come_back() -> None:
    announced = {"b": 9}
    [first] = announcement_messages([Announcement("a", 3), Announcement("b", 4), Announcement("a", 7)])
    [second] = announcement_messages([Announcement("c", 8), Announcement("a", 5)])
    assert merge_announcements(first, announced) is None
    assert merge_announcements(second, announced) is None
    assert announced == {"a": 7, "b": 9, "c": 8}
    assert merge_announcements(tick_message(12, 4), announced) == WatermarkTick(12, 4)
    assert announced == {"a": 7, "b": 9, "c": 8}


def test_the_one_entry_messages_of_older_outboxes_merge_too() -> None:
    announced: dict[str, int] = {}
    merge_announcements(b'{"kind": "entry", "subject_id": "a", "seq": 2, "event_type": "consent.changed"}', announced)
    merge_announcements(b'{"kind": "entry", "subject_id": null, "seq": 3, "event_type": "decision.recorded"}',
                        announced)
    assert announced == {"a": 2}


def test_runs_per_partition_with_interleaved_partitions() -> None:
    partitions = [0, 1, 0, 1, 2, 0]
    offsets = [10, 7, 11, 8, 3, 12]
    assert unbroken_runs(partitions, offsets) == {0: (10, 12), 1: (7, 8), 2: (3, 3)}


def test_a_gap_or_a_step_back_breaks_only_its_partition() -> None:
    assert unbroken_runs([0, 0, 1, 1], [4, 6, 2, 3]) == {1: (2, 3)}
    assert unbroken_runs([0, 0], [5, 5]) == {}  # redelivered
    assert unbroken_runs([0, 0], [5, 4]) == {}


def test_without_offsets_nothing_is_known_to_be_unbroken() -> None:
    assert unbroken_runs([0, 1], None) == {}


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=30))
def test_a_run_is_reported_exactly_when_each_partition_s_offsets_count_up_by_one(
    messages: list[tuple[int, int]],
) -> None:
    runs = unbroken_runs([p for p, _ in messages], [o for _, o in messages])
    for partition in {p for p, _ in messages}:
        mine = [o for p, o in messages if p == partition]
        consecutive = mine == list(range(mine[0], mine[0] + len(mine)))
        assert runs.get(partition) == ((mine[0], mine[-1]) if consecutive else None)
