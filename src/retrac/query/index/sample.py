"""The training sample of an index that needs training (IVF, PQ, SQ), drawn from streamed blocks.

Vectors arrive as blocks ``(n_i, D)`` and are added block by block; all of them are never held at
once. An index that needs training is trained on a sample of ``train_size`` rows: ``train_vectors``
when given; otherwise, when ``blocks`` can be iterated twice (a callable returning a fresh iterable,
or a list), a uniform random sample of all rows taken in a first pass (bottom-k sampling on seeded
random keys, memory = the sample); otherwise (a one-shot iterator) the first ``train_size`` rows,
which is biased when the rows are ordered (by class, say). The blocks read for that prefix are
handed on, already checked, so the add pass does not read them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from retrac.query.index.checks import Blocks, _as_block, _iterate, _reiterable

TRAIN_ROWS_PER_LIST = 50  # faiss warns below 39 training points per centroid
MIN_TRAIN_ROWS = 16_384  # PQ / SQ codebooks: 256 centroids per sub-quantizer need >= 39 * 256 rows


@dataclass
class TrainingSample:
    """A training sample and what the add pass must read after it.

    Attributes:
        rows: ``(m, D)`` float32 training rows.
        how: ``"given"``, ``"uniform"`` or ``"prefix"`` (recorded as ``build_params["train_sample"]``).
        pending: Blocks already read and checked while collecting a prefix (added first).
        stream: The rest of a one-shot stream after ``pending``, or ``None`` (read ``blocks`` afresh).
    """

    rows: np.ndarray
    how: str
    pending: list[np.ndarray] = field(default_factory=list)
    stream: Iterator[np.ndarray] | None = None


def default_train_size(nlist: int) -> int:
    """Rows to train on by default: ``max(TRAIN_ROWS_PER_LIST * nlist, MIN_TRAIN_ROWS)``."""
    return max(TRAIN_ROWS_PER_LIST * nlist, MIN_TRAIN_ROWS)


def draw_training_sample(
    blocks: Blocks,
    train_vectors: np.ndarray | Callable[[], np.ndarray] | None,
    dim: int,
    size: int,
    seed: int,
) -> TrainingSample:
    """The given ``train_vectors``, else a uniform sample of ``size`` rows, else the first ``size`` rows."""
    if train_vectors is not None:
        raw = train_vectors() if callable(train_vectors) else train_vectors
        return TrainingSample(_as_block(raw, dim, 0, 0), "given")
    if _reiterable(blocks):
        rows, _ = _bottom_k_sample(blocks, dim, size, seed)
        return TrainingSample(rows, "uniform")
    stream = _iterate(blocks)
    pending: list[np.ndarray] = []
    have = 0
    for number, block in enumerate(stream):
        array = _as_block(block, dim, number, have)
        pending.append(array)
        have += array.shape[0]
        if have >= size:
            break
    rows = np.concatenate(pending)[:size] if pending else np.zeros((0, dim), np.float32)
    return TrainingSample(rows, "prefix", pending, stream)


def _bottom_k_sample(blocks: Blocks, dim: int, size: int, seed: int) -> tuple[np.ndarray, int]:
    """A uniform random sample of ``size`` rows of the stream in one pass (seeded random keys).

    Returns:
        ``(sample (m, D) float32, rows seen)``, ``m = min(size, rows seen)``.
    """
    rng = np.random.default_rng(seed)
    keys: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    held = 0
    offset = 0

    def prune() -> tuple[np.ndarray, np.ndarray]:
        # the `size` smallest keys seen so far, in stream order
        all_keys, all_rows = np.concatenate(keys), np.concatenate(rows)
        if all_keys.shape[0] > size:
            keep = np.sort(np.argpartition(all_keys, size - 1)[:size])
            all_keys, all_rows = all_keys[keep], all_rows[keep]
        return all_keys, all_rows

    for number, block in enumerate(_iterate(blocks)):
        array = _as_block(block, dim, number, offset)
        offset += array.shape[0]
        keys.append(rng.random(array.shape[0]))
        rows.append(array)
        held += array.shape[0]
        if held > 2 * size:  # prune once the candidates double: linear in the stream, memory <= 2 samples
            kept_keys, kept_rows = prune()
            keys, rows, held = [kept_keys], [kept_rows], kept_keys.shape[0]
    if not keys:
        return np.zeros((0, dim), dtype=np.float32), 0
    sample = prune()[1]
    return sample, offset
