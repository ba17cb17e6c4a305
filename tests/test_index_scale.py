"""The index at scale: on-disk inverted lists, exact re-ranking, the measured auto rule.

Relations: an index whose IVF lists were written to disk (parts merged into ``OnDiskInvertedLists``)
answers every query exactly as the same index built in memory, before and after saving, loading and
moving its folder; re-ranked scores equal exact inner products and, with every row as a candidate,
the exact top-k; an Attributor's re-ranked answer equals the flat index's.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from retrac.errors import ConfigError
from retrac.query.index import build_index, exact_search, load_index, save_index
from retrac.query.index.ondisk import ONDISK_FILENAME, ondisk_file
from retrac.query.index.rerank import exact_scores, rerank

DIM = 24
ROWS = 6000
pytestmark = pytest.mark.filterwarnings("ignore:.*scans over a quarter")  # toy partitions of random rows


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    rows = centres[rng.integers(0, 40, ROWS)] + 0.3 * rng.standard_normal((ROWS, DIM)).astype(np.float32)
    queries = centres[rng.integers(0, 40, 30)] + 0.3 * rng.standard_normal((30, DIM)).astype(np.float32)
    return rows.astype(np.float32), queries.astype(np.float32)


def blocks_of(rows, size=1000):
    return lambda: (rows[i : i + size] for i in range(0, len(rows), size))


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,Flat"])
def test_on_disk_index_search_equals_the_in_memory_one(data, tmp_path, factory):
    rows, queries = data
    memory = build_index(blocks_of(rows), ROWS, DIM, factory, seed=3)
    # a budget below the lists' size sends them to disk, in parts of 10,000 rows (here: one per block)
    disk = build_index(
        blocks_of(rows), ROWS, DIM, factory, seed=3, memory_budget_bytes=1000, scratch_dir=tmp_path
    )
    assert disk.build_params["on_disk"] and not memory.build_params.get("on_disk")
    assert ondisk_file(disk.index) is not None and ondisk_file(memory.index) is None
    assert disk.search_params == memory.search_params  # calibrated on the same lists
    for nprobe in (1, 4, 32):
        for opponents in (False, True):
            expected = memory.search(queries, 10, opponents=opponents, nprobe=nprobe)
            found = disk.search(queries, 10, opponents=opponents, nprobe=nprobe)
            np.testing.assert_array_equal(found[1], expected[1])
            np.testing.assert_array_equal(found[0], expected[0])
    folder = tmp_path / "index"
    save_index(disk, folder, {"note": "on disk"})
    assert sorted(os.listdir(folder)) == ["index.faiss", ONDISK_FILENAME, "manifest.json"]
    moved = tmp_path / "moved"
    os.rename(folder, moved)  # the lists are found beside index.faiss, wherever the folder is
    loaded = load_index(moved)
    assert ondisk_file(loaded.index) == moved / ONDISK_FILENAME
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], memory.search(queries, 10)[1])


def test_on_disk_needs_an_ivf_index(data):
    rows, _ = data
    with pytest.raises(ConfigError, match="IVF"):
        build_index(blocks_of(rows), ROWS, DIM, "flat", on_disk=True)


def test_reranked_scores_equal_exact_ones(data):
    rows, queries = data
    approx = build_index(blocks_of(rows), ROWS, DIM, "IVF32,SQ8", seed=3)
    _, candidates = approx.search(queries, 100)
    scores, found = rerank(queries, candidates, lambda r: rows[r], 10)
    # every score is the exact inner product of its row, and the rows are the best candidates in order
    np.testing.assert_array_equal(scores, np.take_along_axis(exact_scores(rows, queries), found, axis=1))
    assert (np.diff(scores, axis=1) <= 0).all()
    for q in range(len(queries)):
        candidate_scores = exact_scores(rows[candidates[q]], queries[q : q + 1])[0]
        assert scores[q, -1] >= np.sort(candidate_scores)[-10]
    # every row a candidate: the re-ranked answer is the exact top-k
    everything = np.tile(np.arange(ROWS), (len(queries), 1))
    for opponents in (False, True):
        scores, found = rerank(queries, everything, lambda r: rows[r], 10, opponents=opponents)
        exact_scores_, exact_rows = exact_search([rows], queries, 10, opponents=opponents)
        np.testing.assert_array_equal(found, exact_rows)
        np.testing.assert_allclose(scores, exact_scores_, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="depth"):
        rerank(queries, candidates[:, :5], lambda r: rows[r], 10)


def test_auto_picks_hnsw_above_the_flat_limit_while_it_fits(monkeypatch):
    from retrac.query.index import kinds

    monkeypatch.setattr(kinds, "AUTO_FLAT_MAX_ROWS", 1000)
    vectors = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    built = build_index([vectors], 3000, 8, "auto", memory_budget_bytes=10**9)
    assert built.factory == "HNSW32,Flat" and isinstance(
        faiss.downcast_index(built.index), faiss.IndexHNSWFlat
    )
    assert built.recall["recall_at_10"] >= 0.95  # measured against exact search at build time
