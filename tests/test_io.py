"""retrac._io: record_differences names every differing leaf; atomic writers leave no temporary file."""

from __future__ import annotations

import numpy as np

from retrac._io import atomic_save_npz, atomic_write_text, record_differences


def test_record_differences_one_way_ignores_extra_keys_of_actual():
    expected = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
    actual = {"a": 1, "b": {"c": [1, 3], "d": "x", "extra": 5}, "more": True}
    assert record_differences(expected, actual) == ["b.c[1]: expected 2, found 3"]
    assert record_differences({"gone": 1}, {}, actual_name="index has") == [
        "gone: expected 1, index has none"
    ]
    assert record_differences(expected, expected) == []


def test_record_differences_both_ways_names_keys_of_either_side_sorted():
    stored = {"config": {"dim": 32, "kind": "dense"}, "old": 1}
    given = {"config": {"dim": 16, "kind": "dense"}, "new": 2}
    assert record_differences(stored, given, expected_name="stored", actual_name="given", both_ways=True) == [
        "config.dim: stored 32, given 16",
        "new: stored none, given 2",
        "old: stored 1, given none",
    ]
    # lists of other lengths are compared whole
    assert record_differences([1, 2], [1, 2, 3]) == [": expected [1, 2], found [1, 2, 3]"]


def test_atomic_writers_replace_whole_files(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    npz = atomic_save_npz(tmp_path / "b.npz", x=np.arange(3))
    with np.load(npz) as arrays:
        np.testing.assert_array_equal(arrays["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.npz", "sub"]
