"""What a store holds per checkpoint: the ``full`` layout (every event's features) or ``compact`` (docs/design.md
section 5).

* ``full`` (default): ``features (N, S, d)`` = ``phi_k(z, e)`` of every event, plus ``norms``,
  ``timesteps`` and ``valid`` ``(N, S)``. Any train vector can be formed later (TracIn, ReTrac, other
  event weightings or subsets).
* ``compact``: ``vectors (N, 2, d)`` = the two train vectors ``u_k(z)`` each method needs, TracIn
  (``mean_e phi``) and ReTrac (``mean_e phi / n``), computed at featurization from the float32
  features by the same :func:`~retrac.query.vectors.train_vectors` the query side uses, plus the
  per-event ``norms``, ``timesteps`` and ``valid`` the bias report reads. ``S / 2`` times less disk
  for the features. What it can no longer do: anything that needs one event's features
  (re-weighting or sub-setting events, per-event feature access through ``FeatureStore.features``);
  those uses raise :class:`~retrac.errors.CompactStoreError`. Scores of every method equal the full
  store's bit for bit in float32 (float16 stores round the vectors instead of the features).
"""

from __future__ import annotations

import numpy as np

from retrac.indexer.config import LAYOUTS
from retrac.query.vectors import VECTOR_KINDS, train_vectors

DEFAULT_LAYOUT = LAYOUTS[0]
PER_EVENT_ARRAYS = ("norms", "timesteps", "valid")
COMPACT_VECTOR_KINDS = VECTOR_KINDS  # the order of axis 1 of ``vectors``: tracin, retrac
MIN_CHUNK_BYTES = 1 << 20


def chunk_rows_for(shard_rows: int, row_bytes: int) -> int:
    """The smallest divisor of ``shard_rows`` whose chunk holds at least ``MIN_CHUNK_BYTES``."""
    for rows in range(1, shard_rows + 1):
        if shard_rows % rows == 0 and rows * row_bytes >= MIN_CHUNK_BYTES:
            return rows
    return shard_rows


def checkpoint_group(k: int) -> str:
    """The Zarr group of checkpoint ``k``: ``checkpoint-KK``."""
    return f"checkpoint-{k:02d}"


def shard_arrays(layout: str) -> tuple[str, ...]:
    """The arrays of one checkpoint, in the order the shard digest covers them."""
    return ("features" if layout == "full" else "vectors", *PER_EVENT_ARRAYS)


def compact_vectors(features: np.ndarray, norms: np.ndarray, valid: np.ndarray, ids) -> np.ndarray:
    """``(n, 2, d)`` float32: the TracIn and ReTrac train vectors ``u_k(z)`` of one shard.

    Args:
        features: ``(n, S, d)`` float32 ``phi_k(z, e)``.
        norms: ``(n, S)`` float32 ``n_k(z, e)``.
        valid: ``(n, S)`` bool.
        ids: the ``n`` sample ids (for error messages).
    """
    return np.stack(
        [train_vectors(features, norms, kind, valid, ids) for kind in COMPACT_VECTOR_KINDS], axis=1
    )


def create_arrays(group, layout: dict, num_checkpoints: int, ids: list[str]) -> None:
    """Create the ids and every checkpoint's arrays in a new Zarr group (metadata and the ids chunk).

    A shard of rows is exactly one Zarr shard of the big array (inner chunks of ``chunk_rows`` rows)
    and one chunk of each small array, so two writers never share an object.
    """
    n, s, d = layout["num_samples"], layout["num_events"], layout["dim"]
    shard, chunk = layout["shard_rows"], layout["chunk_rows"]
    kind = layout.get("kind", DEFAULT_LAYOUT)
    id_array = group.create_array("ids", shape=(n,), dtype=str, chunks=(n,))
    id_array[:] = np.asarray(ids, dtype=str)
    width = s if kind == "full" else len(COMPACT_VECTOR_KINDS)
    for k in range(num_checkpoints):
        sub = group.create_group(checkpoint_group(k))
        sub.create_array(
            shard_arrays(kind)[0],
            shape=(n, width, d),
            dtype=layout["dtype"],
            chunks=(chunk, width, d),
            shards=None if chunk == shard else (shard, width, d),
            compressors=None,  # projected gradients do not compress
            fill_value=0,
        )
        sub.create_array("norms", shape=(n, s), dtype="float32", chunks=(shard, s), fill_value=0)
        sub.create_array("timesteps", shape=(n, s), dtype="int32", chunks=(shard, s), fill_value=-1)
        sub.create_array("valid", shape=(n, s), dtype="bool", chunks=(shard, s), fill_value=False)
