"""Exact top-k by brute force over streamed blocks, and recall@k of an index against it.

Every approximate index is measured against these: ``exact_search`` is the numpy reference (no
index), ``recall_at_k`` compares two answers, ``measure_recall`` searches an index and compares.
"""

from __future__ import annotations

import numpy as np

from retrac.errors import ConfigError, DataError
from retrac.query.index.checks import Blocks, _as_block, _as_queries, _check_positive_int, _iterate
from retrac.query.index.search_index import SearchIndex, search
from retrac.query.index.topk import _ExactTopK


def exact_search(
    blocks: Blocks, queries: np.ndarray, k: int, opponents: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over streamed blocks, by brute force in numpy (no index).

    Args:
        blocks: Train vectors as blocks ``(n_i, D)`` (or a callable returning them); row ids are
            positions in the concatenation.
        queries: ``(n_query, D)`` query vectors ``Q(z')``.
        k: Results per query.
        opponents: Return the ``k`` most negative inner products (most negative first).

    Returns:
        ``scores (n_query, k)`` float32 inner products ``<U(z), Q(z')>`` (positive = proponent) and
        ``indices (n_query, k)`` int64 rows, best first.

    Raises:
        DataError: Bad block or query shapes or non-finite values.
        ConfigError: ``k`` larger than the number of rows.
    """
    _check_positive_int("k", k)
    if np.ndim(queries) != 2:
        raise DataError(f"queries have shape {np.shape(queries)}; expected (n_query, D).")
    queries = _as_queries(queries, np.shape(queries)[1])
    sign = -1.0 if opponents else 1.0
    top = _ExactTopK(sign * queries, k)
    offset = 0
    for number, block in enumerate(_iterate(blocks)):
        array = _as_block(block, queries.shape[1], number, offset)
        top.update(array, offset)
        offset += array.shape[0]
    if k > offset:
        raise ConfigError(f"k={k} exceeds the {offset} vectors searched; use k <= {offset}.")
    return (sign * top.scores).astype(np.float32), top.ids.astype(np.int64)


def recall_at_k(approx_indices: np.ndarray, exact_indices: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (recall@k), in ``[0, 1]``.

    Args:
        approx_indices: ``(n_query, >= k)`` rows returned by an approximate index (``-1`` = none).
        exact_indices: ``(n_query, >= k)`` exact rows (from Flat or ``exact_search``).
        k: Cut-off.

    Returns:
        ``mean_q |approx_q[:k] & exact_q[:k]| / k``.

    Raises:
        ConfigError: Bad ``k`` or shapes that do not match.
    """
    _check_positive_int("k", k)
    approx = np.asarray(approx_indices)
    exact = np.asarray(exact_indices)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ConfigError(
            f"approx_indices {approx.shape} and exact_indices {exact.shape} must both be "
            "(n_query, k) with the same n_query."
        )
    if approx.shape[1] < k or exact.shape[1] < k:
        raise ConfigError(
            f"k={k} exceeds the columns of approx_indices {approx.shape} or exact_indices {exact.shape}."
        )
    if approx.shape[0] == 0:
        raise ConfigError("recall_at_k needs at least one query.")
    hits = sum(
        len(set(a[a >= 0].tolist()) & set(e.tolist()))
        for a, e in zip(approx[:, :k], exact[:, :k], strict=True)
    )
    return hits / (k * approx.shape[0])


def measure_recall(
    index: SearchIndex,
    queries: np.ndarray,
    reference: SearchIndex | Blocks | np.ndarray,
    k: int = 10,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> float:
    """Recall@k of ``index`` against exact search, on a sample of queries.

    Args:
        index: The (approximate) index to measure.
        queries: ``(n_query, D)`` query vectors; a few hundred give recall to about +-0.02.
        reference: The exact answer: a Flat ``SearchIndex`` over the same rows, the same rows as
            blocks (searched by brute force), or precomputed exact indices ``(n_query, >= k)``.
        k: Cut-off (recall@10 by default).
        nprobe: IVF lists probed (default: the index's calibrated default).
        ef_search: HNSW efSearch (default: the index's calibrated default).

    Returns:
        recall@k in ``[0, 1]``.
    """
    _, approx = search(index, queries, k, nprobe=nprobe, ef_search=ef_search)
    if isinstance(reference, SearchIndex):
        if not reference.exact:
            raise ConfigError(
                f"reference index is {reference.factory!r}, not exact; pass a 'flat' index or the vectors."
            )
        _, exact = reference.search(queries, k)
    elif isinstance(reference, np.ndarray) and reference.dtype.kind in "iu":
        exact = reference
    else:
        _, exact = exact_search(reference, queries, k)
    return recall_at_k(approx, exact, k)
