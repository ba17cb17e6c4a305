"""Exact re-ranking from the index's own vectors: ``retrac build --rerank-vectors``.

Relations, not numbers: ``vectors.npy`` holds the rows the index was built from, bit for bit; re-ranking
from it gives the same rows and scores as re-ranking from the store's shards (which it then never
reads); a changed file is refused by its digest; local parts built with it re-rank from theirs.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import weighted_store
from retrac.cli import main
from retrac.errors import ConfigError, IndexDamagedError
from retrac.query import attribution
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index, train_vector_blocks
from retrac.query.index import read_manifest
from retrac.query.index.rerank import RERANK_VECTORS_FILENAME
from retrac.query.vectors import Method

N_TRAIN, SHARD_ROWS = 23, 4
QUERY_EVENTS = QueryEvents(num_timesteps=2, num_noise=1, seed=3)
METHODS = {"tracin": None, "trak": 0.1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of 23 samples over 2 weighted checkpoints; per method an HNSW index with and without
    ``vectors.npy``, and 3 query images."""
    root = tmp_path_factory.mktemp("rerank-vectors")
    store, _, generator = weighted_store(root, N_TRAIN, SHARD_ROWS, model_seed=30, data_seed=6)
    plain, with_vectors = {}, {}
    for method, kernel in METHODS.items():
        plain[method], with_vectors[method] = root / f"plain-{method}", root / f"vectors-{method}"
        for out, keep in ((plain[method], False), (with_vectors[method], True)):
            build_attribution_index(
                store, out, method, kernel=kernel, index="hnsw", progress=False, rerank_vectors=keep
            )
    parts = [root / "parts" / f"part-{i}" for i in range(3)]
    for i, out in enumerate(parts):
        build_attribution_index(
            store, out, "tracin", index="hnsw", progress=False, part=f"{i}/3", rerank_vectors=True
        )
    queries = torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1
    return {
        "root": root,
        "store": store,
        "plain": plain,
        "vectors": with_vectors,
        "parts": parts,
        "queries": queries,
    }


def _attributor(indexes) -> Attributor:
    return Attributor(indexes, query_events=QUERY_EVENTS, progress=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_vectors_file_holds_the_rows_the_index_was_built_from(world, method):
    folder = world["vectors"][method]
    manifest = read_manifest(folder)
    assert RERANK_VECTORS_FILENAME in manifest["digests"]  # digested like index.faiss
    assert manifest["rerank_vectors"] == {"file": RERANK_VECTORS_FILENAME, "dtype": "float32"}
    stored = np.load(folder / RERANK_VECTORS_FILENAME)
    expected = np.concatenate(
        list(train_vector_blocks(world["store"], Method.named(method, METHODS[method])))
    )
    assert stored.dtype == np.float32 and np.array_equal(stored, expected)
    assert not (world["plain"][method] / RERANK_VECTORS_FILENAME).exists()


@pytest.mark.parametrize("opponents", [False, True])
def test_rerank_from_vectors_equals_rerank_from_the_store(world, monkeypatch, opponents):
    reference = _attributor(list(world["plain"].values()))
    expected = {
        m: reference.attribute(world["queries"], 5, m, opponents=opponents, rerank=12) for m in METHODS
    }

    def no_store_rows(*args, **kwargs):
        raise AssertionError("re-ranking read the store although the index keeps its vectors")

    monkeypatch.setattr(attribution, "train_vector_rows", no_store_rows)
    attributor = _attributor(list(world["vectors"].values()))
    for method in METHODS:
        got = attributor.attribute(world["queries"], 5, method, opponents=opponents, rerank=12)
        assert np.array_equal(got.indices, expected[method].indices)
        assert np.array_equal(got.scores, expected[method].scores)  # bit for bit
        assert got.ids == expected[method].ids
    with pytest.raises(AssertionError, match="read the store"):  # the check above can fail
        reference.attribute(world["queries"], 5, "tracin", rerank=12)


def test_a_changed_vectors_file_is_refused(world, tmp_path):
    folder = tmp_path / "changed"
    shutil.copytree(world["vectors"]["tracin"], folder)
    vectors = np.load(folder / RERANK_VECTORS_FILENAME)
    vectors[3, 0] += 1.0  # same size, other bytes
    np.save(folder / RERANK_VECTORS_FILENAME, vectors)
    with pytest.raises(IndexDamagedError, match=RERANK_VECTORS_FILENAME):
        _attributor([folder])


def test_cli_build_rerank_vectors(world, tmp_path, capsys):
    out = tmp_path / "index"
    argv = ["build", "--store", str(world["store"].url), "--out", str(out), "--method", "tracin"]
    assert main([*argv, "--kind", "hnsw", "--rerank-vectors", "--no-progress"]) == 0
    assert "exact vectors for re-ranking (vectors.npy)" in capsys.readouterr().out
    assert np.array_equal(
        np.load(out / RERANK_VECTORS_FILENAME), np.load(world["vectors"]["tracin"] / RERANK_VECTORS_FILENAME)
    )


def test_write_vectors_checks_the_row_count(tmp_path):
    from retrac.errors import DataError
    from retrac.query.building import write_vectors

    blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), dtype=np.float16)]
    write_vectors(str(tmp_path / "v.npy"), iter(blocks), 3, 3)
    assert np.array_equal(np.load(tmp_path / "v.npy"), np.concatenate(blocks).astype(np.float32))
    with pytest.raises(DataError, match="2 rows for an index of 3"):
        write_vectors(str(tmp_path / "w.npy"), iter(blocks[:1]), 3, 3)
    with pytest.raises(DataError, match="past the index"):
        write_vectors(str(tmp_path / "x.npy"), iter(blocks), 2, 3)


def test_parts_rerank_from_their_own_vectors(world, monkeypatch):
    """Parts of 7, 8 and 8 rows (boundaries inside shards), each with its vectors.npy: re-ranking every
    row as a candidate gives what the whole index re-ranked from the store gives, without the store."""
    expected = _attributor([world["plain"]["tracin"]]).attribute(
        world["queries"], 6, "tracin", rerank=N_TRAIN
    )
    monkeypatch.setattr(attribution, "train_vector_rows", lambda *a, **k: pytest.fail("read the store"))
    got = _attributor(world["parts"]).attribute(world["queries"], 6, "tracin", rerank=N_TRAIN)
    assert np.array_equal(got.indices, expected.indices)
    assert np.array_equal(got.scores, expected.scores)


def test_rerank_below_one_is_refused(world, capsys):
    with pytest.raises(ConfigError, match="rerank=-4 must be at least 1"):
        _attributor([world["vectors"]["tracin"]]).attribute(world["queries"], 3, "tracin", rerank=-4)
    np.save(world["root"] / "queries.npy", world["queries"].numpy())
    argv = [
        "query",
        "--index",
        str(world["vectors"]["tracin"]),
        "--images",
        str(world["root"] / "queries.npy"),
    ]
    assert main([*argv, "--rerank", "0", "--no-progress"]) == 2
    assert "rerank=0 must be at least 1" in capsys.readouterr().err
