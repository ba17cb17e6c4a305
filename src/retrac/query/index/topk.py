"""Running exact top-k by inner product over streamed blocks (brute force in numpy).

The reference every approximate answer is measured against (``retrac.query.index.exact``), the
exact top-k the calibration gathers while rows are added, and the exact fallback of a search that an
approximate index cannot fill (``retrac.query.index.search_index``).
"""

from __future__ import annotations

import numpy as np


def _merge_topk(
    best_scores: np.ndarray, best_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block's candidate scores ``(n_query, m)`` into the running top-k, best first."""
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_ids = np.concatenate([best_ids, ids], axis=1)
    if all_scores.shape[1] > k:
        part = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        all_scores = np.take_along_axis(all_scores, part, axis=1)
        all_ids = np.take_along_axis(all_ids, part, axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


class _ExactTopK:
    """Running exact top-k of fixed queries ``(n_query, D)`` over streamed blocks ``(n, D)``.

    Only real rows enter it: after blocks holding at least ``k`` rows, every query has ``k`` ids of
    rows that exist (never a padding ``-1``), best (largest inner product) first.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries
        self.k = k
        self.scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((queries.shape[0], 0), dtype=np.int64)

    def update(self, block: np.ndarray, offset: int) -> None:
        scores = self.queries @ block.T  # (n_query, n_block): <Q(z'), U(z)>
        ids = np.broadcast_to(np.arange(offset, offset + block.shape[0], dtype=np.int64), scores.shape)
        self.scores, self.ids = _merge_topk(self.scores, self.ids, scores, ids, self.k)
