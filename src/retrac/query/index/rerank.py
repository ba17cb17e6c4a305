"""Exact re-ranking: re-score an approximate index's candidates against the exact vectors (docs/design.md
section 5).

An approximate index (IVF with SQ8 / PQ codes, HNSW) returns candidates ranked by approximate scores.
:func:`rerank` takes the top ``depth`` candidates of each query, reads their exact train vectors
``U(z)`` (from the store, or any ``vectors_of(rows)``), scores them exactly and keeps the best ``k``.
The scores returned are then exact inner products ``<U(z), Q(z')>`` (computed in float64, returned as
float32); recall is what the candidate list allows (``depth`` of 4 x ``k`` to 100 x ``k`` typically).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrac.errors import ConfigError, DataError, IndexDamagedError

# the exact train vectors U(z) of an index's rows, float32 (N, D), in the index folder (retrac build
# --rerank-vectors): re-ranking reads its candidates' rows memory-mapped instead of whole store shards
RERANK_VECTORS_FILENAME = "vectors.npy"
RERANK_VECTORS_KEY = "rerank_vectors"


def exact_scores(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``<U(z), Q(z')>`` for rows ``(m, D)`` and queries ``(n, D)``: ``(n, m)`` float32 from float64 products.

    The one formula re-ranked scores come from, so that they do not depend on BLAS blocking.
    """
    return (np.asarray(queries, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T).astype(
        np.float32
    )


def open_rerank_vectors(
    directory: str | Path, manifest: dict, num_vectors: int, dim: int
) -> np.ndarray | None:
    """The index folder's exact train vectors ``(N, D)`` float32, memory-mapped; ``None`` if built without.

    The file's digest is checked with the folder's (``load_index``) before this opens it; here its shape
    and dtype are checked against the index's rows.

    Raises:
        IndexDamagedError: a file of another shape or dtype than the index's rows.
    """
    if not manifest.get(RERANK_VECTORS_KEY):
        return None
    path = Path(directory) / RERANK_VECTORS_FILENAME
    try:
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            offset = handle.tell()
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        # candidates are scattered rows: no read-ahead, so only their pages are read (and resident)
        mapped.madvise(mmap.MADV_RANDOM)
        if len(shape) != 2 or fortran:
            raise ValueError(f"an array of shape {shape} (fortran order {fortran}), not rows x dims")
        count = int(shape[0]) * int(shape[1])
        vectors = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
    except (OSError, ValueError) as exc:
        raise IndexDamagedError(f"{path} cannot be read ({exc}); rebuild the index (retrac build).") from None
    if vectors.shape != (num_vectors, dim) or vectors.dtype != np.float32:
        raise IndexDamagedError(
            f"{path} holds {vectors.dtype} {vectors.shape}, not the index's float32 {(num_vectors, dim)}; "
            "rebuild the index (retrac build)."
        )
    return vectors


def rerank(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    k: int,
    opponents: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidates by exact score.

    Args:
        queries: ``(n_query, D)`` query vectors ``Q(z')``.
        candidates: ``(n_query, depth)`` int64 rows from an approximate search (``-1``: none).
        vectors_of: ``rows (m,) sorted int64 -> (m, D)`` float32 exact train vectors of those rows.
        k: Results per query (``<= depth``).
        opponents: Keep the most negative scores instead of the most positive.

    Returns:
        ``scores (n_query, k)`` float32 exact inner products, best first, and ``rows (n_query, k)``
        int64 (``-1`` / NaN where a query had fewer than ``k`` candidates).

    Raises:
        ConfigError: ``k`` larger than the candidate depth.
        DataError: ``vectors_of`` returned the wrong shape.
    """
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0]:
        raise ConfigError(
            f"candidates {candidates.shape} must be (n_query, depth) for {queries.shape[0]} queries."
        )
    if not 1 <= k <= candidates.shape[1]:
        raise ConfigError(f"k={k} must lie in [1, {candidates.shape[1]}] (the re-ranking depth).")
    rows = np.unique(candidates[candidates >= 0])
    vectors = np.asarray(vectors_of(rows), dtype=np.float32)
    if vectors.shape != (rows.shape[0], queries.shape[1]):
        raise DataError(f"vectors_of returned {vectors.shape}, expected {(rows.shape[0], queries.shape[1])}.")
    sign = -1.0 if opponents else 1.0
    out_scores = np.full((queries.shape[0], k), np.nan, dtype=np.float32)
    out_rows = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for q, row_ids in enumerate(candidates):
        row_ids = np.unique(row_ids[row_ids >= 0])
        if not row_ids.size:
            continue
        scores = exact_scores(vectors[np.searchsorted(rows, row_ids)], queries[q : q + 1])[0]
        order = np.lexsort((row_ids, -sign * scores))[:k]  # best first; ties by row
        out_scores[q, : order.size], out_rows[q, : order.size] = scores[order], row_ids[order]
    return out_scores, out_rows
