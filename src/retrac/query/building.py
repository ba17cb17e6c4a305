"""Building attribution indexes from a feature store (docs/design.md section 6).

``build_attribution_index`` streams the train vectors ``U(z) = concat_k(w_k u_k(z))`` of a method out
of a feature store into a FAISS inner-product index (and, with the kernel, accumulates
``Phi_k^T Phi_k`` in blocks over the whole store and saves the preconditioners beside the index). With
``part="I/N"`` it indexes only the I-th of N contiguous row ranges of the store
(``retrac.query.partition``); the manifest records the part, and searches of it return store rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrac.errors import DataError
from retrac.query.index import SearchIndex, build_index, save_index
from retrac.query.index.rerank import RERANK_VECTORS_FILENAME, RERANK_VECTORS_KEY
from retrac.query.partition import PART_KEY, IndexPart
from retrac.query.provenance import KERNEL_FILENAME, Kernel, kernel_arrays
from retrac.query.vectors import KernelAccumulator, Method, default_method
from retrac.relocate import relative_record

DEFAULT_BLOCK_ROWS = 4096
DEFAULT_INDEX_KIND = "auto"  # see retrac.query.index.auto_factory
DEFAULT_SEARCH_DEVICE = "auto"  # faiss: all GPUs when faiss-gpu sees one, else the CPU


def _store_vectors(store, method: Method, k: int, block_rows: int, rows: tuple[int, int] | None = None):
    """Yield ``(start, u_k)`` blocks of checkpoint ``k``: ``u_k`` is ``(n, d)`` float32, unweighted."""
    yield from store.vector_blocks(k, method.vectors, block_rows, rows=rows)  # full or compact store alike


def train_vector_blocks(
    store, method: Method, block_rows: int = DEFAULT_BLOCK_ROWS, rows: tuple[int, int] | None = None
):
    """Stream ``U(z) = concat_k(w_k u_k(z))`` of ``method`` in row blocks ``(n, K * d)`` float32.

    Only one block of every checkpoint is in memory at a time. ``rows = (start, stop)`` streams those
    store rows only (an index part); a row's vector is the same bits either way.
    """
    weights = np.asarray(store.weights, dtype=np.float32)
    streams = [_store_vectors(store, method, k, block_rows, rows) for k in range(store.num_checkpoints)]
    for parts in zip(*streams, strict=True):
        yield np.concatenate([w * u for w, (_, u) in zip(weights, parts, strict=True)], axis=1)


def open_complete_store(store):
    """A ``FeatureStore`` (opened from its path or URL when given one), refused unless complete."""
    from retrac.indexer.store import FeatureStore

    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    store.require_complete()
    return store


def build_attribution_index(
    store,
    out: str | Path,
    method: str | Method | None = None,
    kernel: float | None = None,
    index: str = DEFAULT_INDEX_KIND,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    device: str = DEFAULT_SEARCH_DEVICE,
    progress: bool = True,
    max_memory: int | None = None,
    part: str | tuple[int, int] | None = None,
    rerank_vectors: bool = False,
) -> SearchIndex:
    """Build the FAISS inner-product index of ``method`` over a complete feature store.

    The store is streamed (one block per checkpoint in memory); ``max_memory`` bounds what the index
    holds in RAM: ``auto`` picks what fits, and IVF lists beyond it are written to disk and
    memory-mapped at query (``retrac.query.index.ondisk``). Default: half the machine's RAM.

    Args:
        store: a ``FeatureStore`` or its path.
        out: the index directory (FAISS file, ``manifest.json`` and, with a kernel, ``kernel.npz``).
        method: ``tracin``, ``retrac``, ``retrac+kernel``, ``trak``, ``dtrak`` or a :class:`Method`;
            default the store's (``default_method``: ``dtrak`` on a ``sqnorm`` store, else
            ``retrac+kernel``), chosen by measured LDS.
        kernel: ``c`` of the kernel (turns it on for tracin / retrac; default 0.1 for trak / dtrak).
        index: ``auto``, ``flat``, ``ivf``, ``hnsw`` or a FAISS factory string.
        block_rows: rows of the store read at a time.
        part: ``"I/N"`` or ``(I, N)``: index only the I-th (from 0) of N contiguous row ranges of the
            store (:class:`~retrac.query.partition.IndexPart`); default every row. The kernel is still
            accumulated over every row, so that all parts fold the same kernel into a query.
        rerank_vectors: also write the index's exact train vectors (``vectors.npy``, ``4 N D`` bytes on
            disk, digested like the FAISS file); re-ranking then reads only its candidates' rows from
            it instead of whole store shards (one more pass over the store).

    Returns:
        The built ``SearchIndex``; its manifest records the method, the store fingerprint, the
        checkpoints' sha256 and weights, the kernel's ``lambda_k`` and the part (row range, N, I).
    """
    store = open_complete_store(store)
    if method is None:
        method = default_method(store.config.objective)
    method = method if isinstance(method, Method) else Method.named(method, kernel)
    method.check_objective(store.config.objective)
    store.check_ids()  # streamed: an index must name its rows with the ids the store was made with
    out = Path(out)
    rows = None if part is None else IndexPart.of(part, store.num_samples)
    kernel_record, files = None, {}
    if method.uses_kernel:
        # Kernel: (Phi_k^T Phi_k + lambda_k I)^-1, Phi_k the stacked u_k of every store row (a part's too),
        # accumulated block by block.
        inverses, lambdas = [], []
        for k in tqdm(range(store.num_checkpoints), desc="kernel", disable=not progress):
            acc = KernelAccumulator(store.dim)
            for _, u in _store_vectors(store, method, k, block_rows):
                acc.add(u)
            inverse, lam = acc.preconditioner(method.kernel_c)
            inverses.append(inverse)
            lambdas.append(lam)
        kernel = Kernel(method.kernel_c, np.asarray(lambdas), np.stack(inverses))
        files[KERNEL_FILENAME] = lambda path: _save_npz(path, kernel_arrays(kernel))
        kernel_record = {"c": method.kernel_c, "lambdas": lambdas, "file": KERNEL_FILENAME}
    dim = store.dim * store.num_checkpoints
    span = None if rows is None else (rows.start, rows.stop)
    num_rows = store.num_samples if rows is None else rows.num_rows
    built = build_index(
        lambda: tqdm(
            train_vector_blocks(store, method, block_rows, span),
            desc=f"index {method.name}" + ("" if rows is None else f" part {rows.number}/{rows.count}"),
            total=-(-num_rows // block_rows),
            disable=not progress,
        ),
        num_vectors=num_rows,
        dim=dim,
        kind=index,
        device=device,
        memory_budget_bytes=max_memory,
    )
    manifest = index_manifest(store, method, kernel_record)
    if rerank_vectors:
        files[RERANK_VECTORS_FILENAME] = lambda path: write_vectors(
            path, train_vector_blocks(store, method, block_rows, span), num_rows, dim
        )
        manifest[RERANK_VECTORS_KEY] = {"file": RERANK_VECTORS_FILENAME, "dtype": "float32"}
    if rows is not None:
        manifest[PART_KEY] = rows.to_dict()
    # where the store is relative to this index, when both lie under one root: the tree can move
    manifest["store"]["relative_path"] = relative_record(store.url, out)
    save_index(built, out, manifest, files=files)  # one folder, one rename
    return built


def write_vectors(path: str, blocks, num_rows: int, dim: int) -> None:
    """Write the streamed ``(n, dim)`` blocks as one ``(num_rows, dim)`` float32 ``.npy`` at ``path``.

    Written block by block through the file (not a memory map, whose dirty pages would count in the
    build's resident memory), so memory stays one block whatever ``num_rows``.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    written = 0
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (num_rows, dim)})
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if written + block.shape[0] > num_rows or block.shape[1:] != (dim,):
                raise DataError(
                    f"the store streamed a block {block.shape} past the index's ({num_rows}, {dim}); rebuild."
                )
            handle.write(block.tobytes())
            written += block.shape[0]
    if written != num_rows:
        raise DataError(f"the store streamed {written} rows for an index of {num_rows}; rebuild the index.")


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append .npz to a path
        np.savez(handle, **arrays)


def index_manifest(store, method: Method, kernel_record: dict | None) -> dict:
    """The caller's entries of an attribution index manifest (method, kernel, store, checkpoints)."""
    return {
        "method": method.to_dict(),
        "kernel": kernel_record,
        "store": {
            "path": store.url,  # an absolute local path, or the s3:// gs:// memory:// URL
            "fingerprint": store.fingerprint,
            "objective": store.config.objective,
            "num_samples": store.num_samples,
            "num_checkpoints": store.num_checkpoints,
            "dim_per_checkpoint": store.dim,
        },
        "checkpoints": [
            {"sha256": c.sha256, "weight": c.weight, "scheduler": c.scheduler} for c in store.checkpoints
        ],
    }
