"""Input checks of the index: sizes, devices, train blocks and query vectors.

Every check raises (``ConfigError`` for settings, ``DataError`` for data) with the parameter and the
remedy; nothing here repairs its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import faiss
import numpy as np

from retrac.errors import ConfigError, DataError

DEVICES = ("auto", "cpu", "gpu")

Blocks = Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")


def _check_int_in_range(name: str, value: Any, high: int, meaning: str) -> None:
    """Require an integer ``1 <= value <= high``; ``meaning`` says what ``high`` is."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= high:
        raise ConfigError(f"{name}={value!r} must be an integer in [1, {high}] ({meaning}).")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is not one of {DEVICES}.")
    if device == "gpu" and not _gpu_available():
        raise ConfigError(
            "device='gpu' but the installed faiss has no GPU support or sees no GPU "
            f"(faiss {faiss.__version__}, get_num_gpus()="
            f"{faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}); install faiss-gpu "
            "(pip install 'retrac[gpu]') on a machine with a CUDA GPU, or use device='cpu' or 'auto'."
        )
    return device


def _nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Row numbers of ``(n, D)`` ``array`` that hold NaN or inf."""
    return np.flatnonzero(~np.isfinite(array).all(axis=1))


def _checked_rows(value: Any, dim: int, wrong_shape, wrong_dtype, not_finite) -> np.ndarray:
    """``value`` as C-contiguous float32 ``(n, dim)`` with finite rows; else a ``DataError`` worded by
    ``wrong_shape(shape)``, ``wrong_dtype(dtype)`` or ``not_finite(bad_rows)``."""
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[1] != dim:
        raise DataError(wrong_shape(array.shape))
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(wrong_dtype(array.dtype))
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = _nonfinite_rows(array)
    if bad.size:
        raise DataError(not_finite(bad))
    return array


def _as_block(block: Any, dim: int, block_number: int, offset: int) -> np.ndarray:
    """Validate one block of train vectors and return it as C-contiguous float32 ``(n, D)``."""
    return _checked_rows(
        block,
        dim,
        lambda shape: (
            f"block {block_number} (rows from {offset}) has shape {shape}; every block must be "
            f"(n_i, {dim}) to match dim={dim}. Check the projection dimension and the number of "
            "checkpoints (D = K * d)."
        ),
        lambda dtype: f"block {block_number} has dtype {dtype}; pass float32 (or float16) vectors.",
        lambda bad: (
            f"block {block_number} holds non-finite (NaN or inf) vectors at rows "
            f"{', '.join(str(offset + int(i)) for i in bad[:5])}"
            f"{' ...' if bad.size > 5 else ''} ({bad.size} in all); recompute those samples' "
            "features, the index never repairs them."
        ),
    )


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    """Validate query vectors and return them as C-contiguous float32 ``(n_query, D)``."""
    return _checked_rows(
        queries,
        dim,
        lambda shape: (
            f"queries have shape {shape}; expected (n_query, {dim}) to match the index "
            "dimension (reshape a single query to (1, D))."
        ),
        lambda dtype: f"queries have dtype {dtype}; pass float32 query vectors.",
        lambda bad: (
            f"query rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are not finite (NaN or "
            "inf); check the query images and their gradients."
        ),
    )


def _iterate(blocks: Blocks) -> Iterator[np.ndarray]:
    return iter(blocks() if callable(blocks) else blocks)


def _reiterable(blocks: Blocks) -> bool:
    """Whether ``blocks`` can be read twice (a callable or a collection, not a one-shot iterator)."""
    if callable(blocks):
        return True
    try:
        return iter(blocks) is not blocks
    except TypeError:
        raise ConfigError(
            f"blocks of type {type(blocks).__name__} is not iterable; pass an iterable of (n_i, D) "
            "arrays or a callable returning one."
        ) from None
