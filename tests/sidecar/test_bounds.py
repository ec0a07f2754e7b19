"""The one bounded map every in-process memo uses (``flight.remember``)."""

from __future__ import annotations

from sidecar.flight import remember


def test_a_full_map_drops_its_oldest_entry_and_never_grows() -> None:
    table: dict[int, str] = {}
    for key in range(1_000):
        remember(table, key, "v", limit=100)
    assert len(table) == 100
    assert list(table) == list(range(900, 1_000))


def test_a_key_set_again_becomes_the_newest() -> None:
    table = {1: "a", 2: "b", 3: "c"}
    remember(table, 1, "a again", limit=3)
    remember(table, 4, "d", limit=3)
    assert table == {3: "c", 1: "a again", 4: "d"}


def test_stale_entries_go_before_older_live_ones() -> None:
    table = {key: key % 2 == 0 for key in range(10)}  # value: stale
    remember(table, 10, False, limit=10, stale=lambda is_stale: is_stale)
    assert sorted(table) == [1, 3, 5, 7, 9, 10]
