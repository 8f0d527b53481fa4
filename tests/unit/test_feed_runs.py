"""Which partitions' feed messages in a batch follow one another without a gap (the tick check's shortcut)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consent_ledger.adapters.kafka.ledger_feed import unbroken_runs


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
