"""Train vectors of chosen rows of a store, read shard by shard (what exact re-ranking reads)."""

from __future__ import annotations

import numpy as np


def train_vector_rows(store, kind: str, rows: np.ndarray) -> np.ndarray:
    """``U(z) = concat_k(w_k u_k(z))`` of ``kind`` for the given rows: ``(m, K * d)`` float32.

    Each shard holding one of the rows is read whole and digest-checked (``FeatureStore.read_shard``),
    once per checkpoint; the vectors are the ones the index was built from, bit for bit.

    Args:
        store: a :class:`~retrac.indexer.FeatureStore` (full or compact).
        kind: ``"tracin"`` or ``"retrac"``.
        rows: ``(m,)`` store rows (any order; repeats allowed).
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((rows.shape[0], store.num_checkpoints * store.dim), dtype=np.float32)
    ids = store.ids
    for shard in np.unique(rows // store.shard_rows):
        where = np.flatnonzero(rows // store.shard_rows == shard)
        start, stop = store.shard_range(int(shard))
        local = rows[where] - start
        for k, weight in enumerate(store.weights):
            block = store.read_shard(k, int(shard))
            u = block.train_vectors(kind, ids[start:stop])  # (n, d), as train_vector_blocks forms them
            out[where, k * store.dim : (k + 1) * store.dim] = np.float32(weight) * u[local]
    return out
