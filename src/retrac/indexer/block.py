"""``FeatureBlock``: rows of one checkpoint of a store, as numpy arrays (what the index build streams)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrac.indexer.layout import COMPACT_VECTOR_KINDS
from retrac.query.vectors import train_vectors

BLOCK_ARRAYS = ("features", "norms", "timesteps", "valid", "vectors")


@dataclass
class FeatureBlock:
    """Rows ``[start, stop)`` of one checkpoint, as float32 / int32 / bool numpy arrays.

    A full store's blocks hold ``features``; a compact store's hold ``vectors`` ``(n, 2, d)`` (the
    TracIn and ReTrac train vectors) and ``features=None``.
    """

    start: int
    stop: int
    features: np.ndarray | None  # (n, S, d) float32
    norms: np.ndarray  # (n, S) float32
    timesteps: np.ndarray  # (n, S) int32
    valid: np.ndarray  # (n, S) bool
    vectors: np.ndarray | None = None  # (n, 2, d) float32, compact stores

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {name: getattr(self, name) for name in BLOCK_ARRAYS}

    def rows(self, start: int, stop: int) -> FeatureBlock:
        """Rows ``[start, stop)`` (store row numbers) of this block."""
        local = slice(start - self.start, stop - self.start)
        arrays = {n: None if a is None else a[local] for n, a in self._arrays().items()}
        return FeatureBlock(start, stop, **arrays)

    def join(self, after: FeatureBlock) -> FeatureBlock:
        """This block followed by the next rows ``after``."""
        arrays = {
            n: None if a is None else np.concatenate([a, getattr(after, n)])
            for n, a in self._arrays().items()
        }
        return FeatureBlock(self.start, after.stop, **arrays)

    def train_vectors(self, kind: str, ids=None) -> np.ndarray:
        """``(n, d)`` float32 ``u_k(z)`` of ``kind`` (``tracin`` / ``retrac``) for these rows."""
        if self.vectors is not None:
            if kind not in COMPACT_VECTOR_KINDS:
                return train_vectors(self.vectors[:, :1], self.norms[:, :1], kind)  # the kind's own error
            return np.ascontiguousarray(self.vectors[:, COMPACT_VECTOR_KINDS.index(kind)])
        return train_vectors(self.features, self.norms, kind, self.valid, ids)
