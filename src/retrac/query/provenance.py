"""What an attribution index was built from, re-derived from its files and its store.

docs/design.md section 6. The manifest names the method of an index, but a manifest is a text file:
the method an index is *used* with is re-derived from what was built, and a manifest that names
another one is refused (:func:`derive_method`):

* the vector kind (``tracin`` / ``retrac``): rows of ``index.faiss`` (``reconstruct_n``) are compared
  with the train vectors ``U(z) = concat_k(w_k u_k(z))`` recomputed from the store (whose shards are
  checked against their own digests) under each kind; the index holds the kind they equal. The rows
  are a window of up to ``PROVENANCE_ROWS`` rows of one shard drawn at random at every load, so no
  fixed row set can be forged around;
* the kernel: whether ``kernel.npz`` exists, and its ``c`` and ``lambda_k``, read from the file
  itself (whose sha256 the manifest records); a kernel file the manifest does not list is refused.

The cost is one shard read per checkpoint and a few reconstructed rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrac.errors import GradientError, IndexDamagedError
from retrac.query.index import SearchIndex, rebuild_command
from retrac.query.index.search_index import _reconstructs
from retrac.query.partition import IndexPart
from retrac.query.vectors import VECTOR_KINDS, Method

KERNEL_FILENAME = "kernel.npz"
PROVENANCE_ROWS = 32  # rows of index.faiss compared with the store at every load
EXACT_CODES_TOLERANCE = 1e-3  # relative error of a float32 row rebuilt by another block split


@dataclass
class Kernel:
    """The kernel of an index, as ``kernel.npz`` holds it.

    Attributes:
        c: ``c`` of ``lambda_k = c * mean ||u_k||^2``.
        lambdas: ``(K,)`` ``lambda_k``.
        preconditioners: ``(K, d, d)`` float64 ``(Phi_k^T Phi_k + lambda_k I)^-1``.
    """

    c: float
    lambdas: np.ndarray
    preconditioners: np.ndarray


def kernel_arrays(kernel: Kernel) -> dict[str, np.ndarray]:
    """The arrays ``kernel.npz`` stores (``c`` included, so the file says which kernel it is)."""
    return {
        "preconditioners": kernel.preconditioners,
        "lambdas": np.asarray(kernel.lambdas, dtype=np.float64),
        "c": np.asarray(kernel.c, dtype=np.float64),
    }


def kernel_from_arrays(arrays) -> Kernel:
    """The kernel of the arrays :func:`kernel_arrays` stores (an open ``np.load`` of ``kernel.npz``)."""
    return Kernel(float(arrays["c"]), arrays["lambdas"], arrays["preconditioners"])


def read_kernel(directory: str | os.PathLike, manifest: dict[str, Any]) -> Kernel | None:
    """The kernel of an index folder, from ``kernel.npz`` itself (``None`` when there is none).

    The file's sha256 is checked by ``load_index`` (it is in the manifest's ``digests``); a kernel
    file the digests do not list is refused rather than silently used or ignored.

    Raises:
        IndexDamagedError: an unlisted or unreadable kernel file.
    """
    path = Path(directory) / KERNEL_FILENAME
    if not path.is_file():
        return None
    if KERNEL_FILENAME not in (manifest.get("digests") or {}):
        raise IndexDamagedError(
            f"{path} is not part of this index's build record (its manifest lists no digest for it); "
            f"{rebuild_command(manifest, directory)}."
        )
    try:
        with np.load(path) as arrays:
            return kernel_from_arrays(arrays)
    except (OSError, KeyError, ValueError) as error:
        raise IndexDamagedError(
            f"{path} cannot be read ({type(error).__name__}: {error}); {rebuild_command(manifest, directory)}."
        ) from None


def _exact_codes(index: faiss.Index) -> bool:
    """Whether the index stores its vectors as float32 (``reconstruct_n`` returns them exactly)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return True
    storage = getattr(inner, "storage", None)
    return storage is not None and isinstance(faiss.downcast_index(storage), faiss.IndexFlat)


def _store_rows(store, start: int, stop: int, kind: str) -> np.ndarray:
    """``U(z)`` of ``kind`` for store rows ``[start, stop)``: ``(n, K * d)`` float32."""
    shard = start // store.shard_rows
    ids = store.ids[start:stop]
    parts = []
    for k, weight in enumerate(store.weights):
        block = store.read_shard(k, shard).rows(start, stop)  # the shard's digest is checked
        u = block.train_vectors(kind, ids)  # full or compact store alike
        parts.append(np.float32(weight) * u)
    return np.concatenate(parts, axis=1)


def vector_kind_errors(
    index: SearchIndex,
    store,
    rows: tuple[int, int] | None = None,
    seed: int | None = None,
    part: tuple[int, int] | None = None,
) -> dict[str, float] | None:
    """The relative error of a window of index rows against each kind's train vectors from the store.

    Args:
        index: The loaded index (rows in store order, from the first row it holds).
        store: The ``FeatureStore`` it was built from.
        rows: The window ``(start, stop)`` of store rows (within one shard and the index's rows);
            default: up to ``PROVENANCE_ROWS`` of the index's rows at the start of a shard drawn at
            random among those it covers (``seed``).
        seed: Seed of that draw (``None``: fresh entropy).
        part: The store rows ``(start, stop)`` the index holds (an index part); default every row.

    Returns:
        ``{kind: max over rows of ||row - U_kind|| / ||U_kind||}``, or ``None`` when the index cannot
        reconstruct its rows.
    """
    first, last = (0, store.num_samples) if part is None else part
    if rows is None:
        low, high = first // store.shard_rows, (last - 1) // store.shard_rows
        start, stop = store.shard_range(int(np.random.default_rng(seed).integers(low, high + 1)))
        start, stop = max(start, first), min(stop, last)
        rows = (start, min(stop, start + PROVENANCE_ROWS))
    start, stop = rows
    if not _reconstructs(index.index):
        return None
    stored = index.index.reconstruct_n(start - first, stop - start)[:, : index.dim]  # no augmenting column
    errors = {}
    for kind in VECTOR_KINDS:
        try:
            expected = _store_rows(store, start, stop, kind)
        except GradientError:  # ReTrac of a zero gradient norm: not this kind
            errors[kind] = float("inf")
            continue
        scale = np.maximum(np.linalg.norm(expected, axis=1), 1e-30)
        errors[kind] = float((np.linalg.norm(stored - expected, axis=1) / scale).max())
    return errors


def derive_method(
    directory: str | os.PathLike, manifest: dict[str, Any], index: SearchIndex, store
) -> tuple[Method, Kernel | None]:
    """The method an index was built with, re-derived from its files and the store.

    The manifest's ``method`` entry is accepted only where it agrees with what was built: the
    vector kind of the rows of ``index.faiss`` (compared with the store), and the kernel of
    ``kernel.npz`` (present or not, and its ``c``).

    Args:
        directory: The index folder (already loaded by ``load_index``: seal and digests checked).
        manifest: Its manifest.
        index: The loaded ``SearchIndex``.
        store: The ``FeatureStore`` it was built from (fingerprint already compared).

    Returns:
        ``(method, kernel)``: the :class:`Method` (name as in the manifest) and the :class:`Kernel`
        (``None`` without one).

    Raises:
        IndexDamagedError: the manifest names another vector kind or kernel than the files hold, or an
            inconsistent method entry (names the rebuild command).
    """
    directory = Path(directory)
    entry = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    hint = rebuild_command(manifest, directory)
    try:
        claimed = Method(**entry)
    except (TypeError, ValueError):
        raise IndexDamagedError(
            f"{directory}: the manifest's method entry {entry!r} is not a method; {hint}."
        ) from None
    kernel = read_kernel(directory, manifest)
    if (kernel is None) != (claimed.kernel_c is None) or (
        kernel is not None and not np.isclose(kernel.c, claimed.kernel_c, rtol=1e-12, atol=0.0)
    ):
        held = "no kernel.npz" if kernel is None else f"a kernel.npz with c={kernel.c:g}"
        raise IndexDamagedError(
            f"{directory}: the manifest names method {claimed.name!r} (kernel c={claimed.kernel_c}), but the "
            f"folder holds {held}; the manifest does not describe this index: {hint}."
        )
    part = IndexPart.from_manifest(manifest)  # an index part holds rows [start, stop) of the store
    errors = vector_kind_errors(index, store, part=(part.start, part.stop))
    if errors is not None:
        best = min(errors, key=errors.get)
        if _exact_codes(index.index):
            found = best if errors[best] <= EXACT_CODES_TOLERANCE else None
            agrees = errors[claimed.vectors] <= EXACT_CODES_TOLERANCE
        else:  # PQ / SQ codes: the claimed kind must fit the decoded rows as well as any other
            found = best
            agrees = errors[claimed.vectors] <= 1.5 * errors[best] + 1e-6
        if not agrees:
            held = f"{found} vectors" if found else "vectors of neither tracin nor retrac of this store"
            raise IndexDamagedError(
                f"{directory}: {index.factory} rows hold {held} (relative errors "
                + ", ".join(f"{kind} {error:.3g}" for kind, error in errors.items())
                + f"), but the manifest names method {claimed.name!r} ({claimed.vectors} vectors); the "
                f"manifest was edited or belongs to another build: {hint}."
            )
    return claimed, kernel
