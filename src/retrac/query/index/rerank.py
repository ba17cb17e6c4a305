"""Exact re-ranking: re-score an approximate index's candidates against the exact vectors (docs/design.md
section 5).

An approximate index (IVF with SQ8 / PQ codes, HNSW) returns candidates ranked by approximate scores.
:func:`rerank` takes the top ``depth`` candidates of each query, reads their exact train vectors
``U(z)`` (from the store, the index's ``vectors.npy`` or any ``vectors_of(rows)``), scores them exactly
and keeps the best ``k``.
The scores returned are then exact inner products ``<U(z), Q(z')>`` (computed in float64, returned as
float32); recall is what the candidate list allows (``depth`` of 4 x ``k`` to 100 x ``k`` typically).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrac.errors import ConfigError, DataError, IndexDamagedError

# the exact train vectors U(z) of an index's rows, float32 (N, D), in the index folder (retrac build
# --rerank-vectors): re-ranking reads its candidates' rows (VectorRows) instead of whole store shards
RERANK_VECTORS_FILENAME = "vectors.npy"
RERANK_VECTORS_KEY = "rerank_vectors"


def exact_scores(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``<U(z), Q(z')>`` for rows ``(m, D)`` and queries ``(n, D)``: ``(n, m)`` float32 from float64 products.

    The one formula re-ranked scores come from, so that they do not depend on BLAS blocking.
    """
    return (np.asarray(queries, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T).astype(
        np.float32
    )


class VectorRows:
    """Rows of a ``(N, D)`` float32 ``.npy`` read on demand, each with one positioned read.

    Not a memory map: the kernel maps cached pages around every touched row into a map (fault-around),
    which made the resident memory of a 10^7-row re-ranking grow by 4 GB; positioned reads keep only
    the rows asked for.
    """

    def __init__(self, path: Path, shape: tuple[int, int], offset: int) -> None:
        self.path, self.shape, self.offset = path, shape, offset
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise DataError(f"rows outside [0, {self.shape[0]}) of {self.path}.")
        width = self.shape[1] * 4
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        view = out.view(np.uint8).reshape(rows.shape[0], width)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows.tolist()):
                if os.preadv(fd, [view[i]], self.offset + row * width) != width:
                    raise DataError(f"{self.path} ends before row {row}; rebuild the index (retrac build).")
        finally:
            os.close(fd)
        return out


def open_rerank_vectors(
    directory: str | Path, manifest: dict, num_vectors: int, dim: int
) -> VectorRows | None:
    """The index folder's exact train vectors ``(N, D)`` float32, read row by row; ``None`` if built without.

    The file's digest is checked with the folder's (``load_index``) before this opens it; here its header
    is checked against the index's rows.

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
    except (OSError, ValueError) as exc:
        raise IndexDamagedError(f"{path} cannot be read ({exc}); rebuild the index (retrac build).") from None
    if tuple(shape) != (num_vectors, dim) or fortran or np.dtype(dtype) != np.float32:
        raise IndexDamagedError(
            f"{path} holds {dtype} {tuple(shape)}, not the index's float32 {(num_vectors, dim)}; "
            "rebuild the index (retrac build)."
        )
    return VectorRows(path, (num_vectors, dim), offset)


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
