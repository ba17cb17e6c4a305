"""Train vectors of chosen rows of a store, read shard by shard (what exact re-ranking reads, and what an
index part is built from)."""

from __future__ import annotations

import numpy as np

from retrac.errors import ConfigError, GradientError


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


def row_range_vector_blocks(store, k: int, kind: str, start: int, stop: int, block_rows: int):
    """Stream ``(start, u_k)`` blocks of checkpoint ``k`` for store rows ``[start, stop)`` only.

    ``u_k`` is ``(n, d)`` float32, unweighted, equal bit for bit to the rows of
    ``FeatureStore.vector_blocks`` (what an index part is built from: only the shards holding its rows
    are read, each whole and digest-checked).
    """
    if block_rows < 1:
        raise ConfigError(f"block_rows={block_rows} must be at least 1.")
    buffer = None
    first, last = start // store.shard_rows, (stop - 1) // store.shard_rows
    for shard in range(first, last + 1) if stop > start else ():
        block = store.read_shard(k, shard)
        block = block.rows(max(block.start, start), min(block.stop, stop))
        buffer = block if buffer is None else buffer.join(block)
        while buffer.stop - buffer.start >= block_rows or (shard == last and buffer.stop > buffer.start):
            piece = buffer.rows(buffer.start, min(buffer.stop, buffer.start + block_rows))
            buffer = buffer.rows(piece.stop, buffer.stop)
            try:
                vectors = piece.train_vectors(kind)
            except GradientError:  # again, naming the sample
                vectors = piece.train_vectors(kind, store.ids[piece.start : piece.stop])
            yield piece.start, vectors
