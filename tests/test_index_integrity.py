"""Index answers are whole and index files are what was built.

* No padding: an approximate index that cannot fill ``k`` (HNSW, IVF at ``k = N``) is widened or
  answered exactly; every returned row is real and the scores equal Flat's.
* Tampering: the manifest records sha256 digests of ``index.faiss`` and ``kernel.npz``, checked at
  load; the method is re-derived from the vectors, not trusted from the manifest.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrac.errors import ConfigError
from retrac.query.index import SearchIndex, build_index

N, DIM = 300, 24


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, DIM)) * np.exp(0.8 * rng.standard_normal((N, 1)))  # unequal norms
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((6, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def flat(vectors):
    return build_index([vectors], N, DIM, "flat")


def _approximate(vectors, kind: str) -> SearchIndex:
    # hnsw_m=8: a sparse graph, from which an HNSW search at k = N reaches fewer than N rows
    return build_index([vectors[:100], vectors[100:]], N, DIM, kind, hnsw_m=8, target_recall=None, seed=2)


def _assert_real_and_exact(found, reference, k: int) -> None:
    """``k`` distinct real rows per query whose scores are the exact scores of those rows."""
    scores, indices = found
    assert indices.shape == scores.shape == reference[0].shape
    assert (indices >= 0).all() and (indices < N).all()
    assert all(len(set(row)) == k for row in indices.tolist())
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, reference[0], rtol=1e-5, atol=1e-4)  # same scores, same order


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "IVF8,SQ8"])
@pytest.mark.parametrize("opponents", [False, True])
def test_k_equal_n_returns_every_row_with_flats_scores(vectors, queries, flat, kind, opponents):
    index = _approximate(vectors, kind)
    raw_scores, raw_ids = index.search_as_built(queries, N, opponents=opponents)
    assert (raw_ids < 0).any(), "the index must be short at k = N for this test to mean anything"
    assert np.isnan(raw_scores[raw_ids < 0]).all()
    result = index.find(queries, N, opponents=opponents)
    reference = flat.search(queries, N, opponents=opponents)
    if kind == "IVF8,SQ8":  # SQ8 codes: the scores of decoded vectors, close to but not Flat's
        assert (result.indices >= 0).all()
        assert all(sorted(row) == list(range(N)) for row in result.indices.tolist())
        np.testing.assert_allclose(
            result.scores, reference[0], rtol=0.05, atol=0.05 * np.abs(reference[0]).max()
        )
    else:
        _assert_real_and_exact((result.scores, result.indices), reference, N)
        assert all(sorted(row) == list(range(N)) for row in result.indices.tolist())
    assert result.short == int((raw_ids < 0).any(axis=1).sum())
    assert result.note and f"k={N}" in result.note
    scores, indices = index.search(queries, N, opponents=opponents)  # the plain API returns the same
    np.testing.assert_array_equal(indices, result.indices)
    np.testing.assert_array_equal(scores, result.scores)


def test_ivf_is_filled_by_widening_nprobe_hnsw_by_the_exact_fallback(vectors, queries):
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    result = ivf.find(queries, N)
    assert result.widened == {"nprobe": nlist} and result.exact_fallback == 0  # every list scanned
    assert "nprobe" in result.note and "exact" not in result.note
    hnsw = _approximate(vectors, "hnsw")
    result = hnsw.find(queries, N)
    assert result.exact_fallback == result.short > 0  # efSearch >= k = N already: nothing to widen
    assert result.widened is None
    assert "exact search" in result.note


def test_widening_stops_as_soon_as_the_queries_are_full(vectors, queries, flat):
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    k = 40
    raw_scores, raw_ids = ivf.search_as_built(queries, k, nprobe=1)
    short = (raw_ids < 0).any(axis=1)
    assert short.any()
    result = ivf.find(queries, k, nprobe=1)
    assert result.short == int(short.sum())
    assert result.widened is not None and result.widened["nprobe"] <= nlist
    assert (result.indices >= 0).all()
    full = ~short  # queries that were full keep the answer of the asked setting
    np.testing.assert_array_equal(result.indices[full], raw_ids[full])
    scores, rows = result.scores, result.indices
    exact = (vectors[rows] * queries[:, None, :]).sum(axis=2)  # each returned score is its row's score
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-4)


def test_a_full_answer_carries_no_note(vectors, queries, flat):
    result = flat.find(queries, N)
    assert result.short == 0 and result.note is None and result.widened is None
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    assert ivf.find(queries, 5, nprobe=nlist).note is None


def test_k_above_n_is_an_error_not_clipped(vectors, queries, flat):
    for index in (flat, _approximate(vectors, "hnsw")):
        with pytest.raises(ConfigError, match=rf"k={N + 1} must be an integer in \[1, {N}\].*ask for fewer"):
            index.search(queries, N + 1)
        with pytest.raises(ConfigError, match="k=0"):
            index.find(queries, 0)


def _idmap_hnsw(vectors) -> faiss.Index:
    """An index FAISS cannot reconstruct (``IDMap`` over HNSW), short at large ``k``."""
    index = faiss.index_factory(DIM, "IDMap,HNSW16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vectors, np.arange(N, dtype=np.int64))
    return index


def test_an_index_that_cannot_reconstruct_falls_back_to_its_vector_source(vectors, queries, flat):
    built = SearchIndex(
        _idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM, vector_source=lambda: iter([vectors])
    )
    result = built.find(queries, N, opponents=True)
    _assert_real_and_exact((result.scores, result.indices), flat.search(queries, N, opponents=True), N)
    assert result.exact_fallback > 0
    without = SearchIndex(_idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM)
    with pytest.raises(ConfigError, match="cannot reconstruct its vectors.*smaller k"):
        without.search(queries, N)
    wrong = SearchIndex(
        _idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM, vector_source=lambda: iter([vectors[:10]])
    )
    with pytest.raises(ConfigError, match="read 10 vectors, the index holds 300"):
        wrong.search(queries, N)
