"""The FAISS inner-product index over the train vectors ``U(z)``: build, search, save, load, recall.

A score returned here is the inner product ``I(z, z') = <U(z), Q(z')>`` of DESIGN section 1, with
``U(z) = concat_k(w_k u_k(z))`` the train vector of a training sample and ``Q(z')`` the query
vector of a test sample. Its scale is that of the vectors (no normalisation is applied here).
Positive score = proponent (a gradient step on ``z`` lowers the loss on ``z'``); negative score =
opponent, found by searching with ``-Q`` (``opponents=True``). Results have shape
``(n_query, k)``, best first.

Index kinds (``build_index(kind=...)``), all with ``METRIC_INNER_PRODUCT``:

* ``"flat"``: ``IndexFlatIP``, exact; the reference every other kind is measured against.
* ``"ivf"``: IVF-Flat (``"IVF{nlist},Flat"``), spherical k-means coarse quantizer. ``nlist`` is the
  power of two nearest ``sqrt(N)`` (1024 at one million rows, at least 16 and at most ``N / 39``):
  adding costs ``N * nlist * D`` flops for the assignment, so on CPUs a larger ``nlist`` (faiss'
  ``4..16 sqrt(N)`` guideline) pays off only with an HNSW coarse quantizer, which ``auto`` uses past
  ``HNSW_QUANTIZER_MIN_ROWS`` rows.
* ``"hnsw"``: ``IndexHNSWFlat`` with ``M = 32`` links per node and ``efConstruction = 40``.
* any FAISS factory string, e.g. ``"IVF1024,PQ64"``, ``"IVF256,SQ8"``, ``"OPQ64,IVF1024,PQ64"``,
  ``"IVF4096_HNSW32,Flat"``, built with ``faiss.index_factory(D, string, METRIC_INNER_PRODUCT)``.
* ``"auto"``: the rule of ``auto_factory``: ``Flat`` up to ``AUTO_FLAT_MAX_ROWS`` (50,000) rows,
  ``IVF{nlist},Flat`` above; ``SQ8`` codes instead of ``Flat`` when the float32 vectors would not fit
  the memory budget (default: half the machine's RAM), ``PQ{m}`` when even one byte per dimension
  would not fit.

Streaming: vectors arrive as blocks ``(n_i, D)`` and are added block by block; all of them are
never held at once. An index that needs training (IVF, PQ, SQ) is trained on a sample of
``train_size`` rows: ``train_vectors`` when given; otherwise, when ``blocks`` can be iterated twice (a
callable returning a fresh iterable, or a list), a uniform random sample of all rows taken in a first
pass (bottom-k sampling on seeded random keys, memory = the sample); otherwise (a one-shot
iterator) the first ``train_size`` rows, which is biased when the rows are ordered (by class, say).

Norm augmentation (IVF indexes): inner-product search over vectors of unequal norms is hard for
a partition, because the top inner products of a query are large-norm vectors from many directions.
IVF indexes therefore store each vector ``x`` with one extra coordinate ``sqrt(M^2 - ||x||^2)``
(``M`` = the largest norm in the training sample; 0 for rows above it) and pad every query with a 0
(the MIPS-to-nearest-neighbour reduction of Bachrach et al., RecSys 2014). Scores are unchanged
(exact inner products ``<U(z), Q(z')>`` over the first ``D`` coordinates, which IVF-Flat returns
exactly), but the stored vectors now lie on one sphere, so the spherical k-means partitions them by
direction *and* norm and a query probes only the cells of large-norm vectors in its direction. On
clustered data with a log-normal norm spread it reaches a given recall scanning several times fewer
vectors than plain IP IVF. It is on for IVF factories without PQ codes (``mips_augment=None``); PQ
needs ``D`` divisible by its sub-quantizer count, so it is off there unless asked for.

Default search parameters: after adding, ``build_index`` searches calibration queries
(``calibration_queries``, else ``NUM_CALIBRATION_QUERIES / 2`` = 128 sample rows plus isotropic noise
of the same norm), each both as ``Q`` and as ``-Q`` (proponents and opponents), and takes the
smallest ``nprobe`` (IVF: 1, 2, 4, ..., nlist) or ``efSearch`` (HNSW: 16, 32, ..., 4096) whose
recall@10 against the exact top 10 (computed by brute force during the same add pass) reaches
``target_recall + CALIBRATION_MARGIN`` (0.95 + 0.02). Proponents (``Q``) and opponents
(``-Q``) get their own values. The values and the measured recalls are stored
in ``SearchIndex.search_params`` / ``SearchIndex.recall`` and in the manifest; every approximate
index thus reports its recall against Flat.

faiss-gpu: with ``device="auto"`` the index is copied to all GPUs (``index_cpu_to_all_gpus``) at the
first search when the installed faiss has GPU support and sees a GPU; ``device="gpu"`` requires it and
raises when it is unavailable or the index kind has no GPU version (HNSW); ``device="cpu"`` never
uses a GPU.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrac.errors import ConfigError, DataError, StoreMismatchError

__all__ = [
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "SearchIndex",
    "auto_factory",
    "build_index",
    "exact_search",
    "load_index",
    "measure_recall",
    "recall_at_k",
    "save_index",
    "search",
]

INDEX_FORMAT = "retrac-index"
INDEX_FORMAT_VERSION = 1
INDEX_FILENAME = "index.faiss"
MANIFEST_FILENAME = "manifest.json"

KINDS = ("auto", "flat", "ivf", "hnsw")
DEVICES = ("auto", "cpu", "gpu")
AUTO_FLAT_MAX_ROWS = 50_000
HNSW_QUANTIZER_MIN_ROWS = 4_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # faiss' default; 80 doubles the build time for little recall here
TRAIN_ROWS_PER_LIST = 50  # faiss warns below 39 training points per centroid
MIN_TRAIN_ROWS = 16_384  # PQ / SQ codebooks: 256 centroids per sub-quantizer need >= 39 * 256 rows
DEFAULT_TARGET_RECALL = 0.95
CALIBRATION_MARGIN = 0.02
NUM_CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_EF_SEARCH = 128  # used when target_recall=None
GPU_MAX_K = 2048  # faiss-gpu's limit on k and nprobe

_RESERVED_MANIFEST_KEYS = (
    "format",
    "format_version",
    "kind",
    "factory",
    "metric",
    "dim",
    "num_vectors",
    "build_params",
    "search_params",
    "recall",
    "index_file",
    "index_file_bytes",
    "faiss_version",
    "score",
)
_SCORE_MEANING = "inner product <U(z), Q(z')>; positive = proponent, negative = opponent"

Blocks = Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


# --------------------------------------------------------------------------------------------------
# choosing the index


def default_memory_budget() -> int:
    """Half of the machine's physical memory, in bytes (the ``auto`` rule's default budget)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def default_nlist(num_vectors: int) -> int:
    """Number of IVF lists for ``num_vectors`` rows: the power of two nearest ``sqrt(N)``.

    Clipped to ``[16, N // 39]`` (faiss wants at least 39 training rows per list) and at least 1.
    """
    nlist = 2 ** round(math.log2(max(num_vectors, 1) ** 0.5)) if num_vectors > 1 else 1
    return int(max(1, min(max(nlist, 16), num_vectors // 39)))


def auto_factory(num_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """The FAISS factory string ``kind="auto"`` builds for ``num_vectors`` rows of dimension ``dim``.

    Rule:

    1. ``N <= AUTO_FLAT_MAX_ROWS`` (50,000) and the float32 vectors (``4 N D`` bytes) fit the budget:
       ``"Flat"`` (exact; at this size a query costs milliseconds).
    2. Otherwise an IVF index with ``nlist = default_nlist(N)`` lists (the power of two nearest
       ``sqrt(N)``); past ``HNSW_QUANTIZER_MIN_ROWS`` (4 million) rows with ``4 sqrt(N)`` lists and an
       HNSW coarse quantizer (``IVF{nlist}_HNSW32``). Codes:
       ``Flat`` when ``4 N D`` bytes fit the budget; else ``SQ8`` (``N D`` bytes) when that fits; else
       ``PQ{m}`` with ``m`` the largest divisor of ``D`` (at most ``D / 2``) whose ``N m`` bytes fit.

    Args:
        num_vectors: Rows ``N`` of the index.
        dim: Vector dimension ``D``.
        memory_budget_bytes: Bytes the index may take; default ``default_memory_budget()``.

    Returns:
        A factory string for ``faiss.index_factory``.

    Raises:
        ConfigError: When even the smallest PQ code does not fit the budget.
    """
    _check_positive_int("num_vectors", num_vectors)
    _check_positive_int("dim", dim)
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    flat_bytes = 4 * num_vectors * dim
    if num_vectors <= AUTO_FLAT_MAX_ROWS and flat_bytes <= budget:
        return "Flat"
    if num_vectors >= HNSW_QUANTIZER_MIN_ROWS:
        coarse = f"IVF{2 ** round(math.log2(4 * num_vectors**0.5))}_HNSW32"
    else:
        coarse = f"IVF{default_nlist(num_vectors)}"
    if flat_bytes <= budget:
        return f"{coarse},Flat"
    if num_vectors * dim <= budget:
        return f"{coarse},SQ8"
    fitting = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and num_vectors * m <= budget]
    if not fitting:
        raise ConfigError(
            f"kind='auto': {num_vectors} vectors of dimension {dim} do not fit memory_budget_bytes="
            f"{budget} even as 1-byte PQ codes; raise memory_budget_bytes or lower the projection "
            "dimension."
        )
    return f"{coarse},PQ{max(fitting)}"


def _resolve_kind(kind: str, num_vectors: int, dim: int, nlist: int | None, hnsw_m: int, budget: int | None):
    """Map ``kind`` to ``(kind, factory string)``; validates the name."""
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(
            f"index kind {kind!r} is not a string; use one of {KINDS} or a FAISS factory string "
            "such as 'IVF1024,Flat', 'IVF256,SQ8' or 'IVF1024,PQ64'."
        )
    kind = kind.strip()
    if kind == "auto":
        return "auto", auto_factory(num_vectors, dim, budget)
    if kind == "flat":
        return "flat", "Flat"
    if kind == "ivf":
        n = default_nlist(num_vectors) if nlist is None else nlist
        _check_positive_int("nlist", n)
        if n > num_vectors:
            raise ConfigError(f"nlist={n} exceeds num_vectors={num_vectors}; use nlist <= {num_vectors}.")
        return "ivf", f"IVF{n},Flat"
    if kind == "hnsw":
        _check_positive_int("hnsw_m", hnsw_m)
        return "hnsw", f"HNSW{hnsw_m},Flat"
    return "factory", kind


def _make_index(factory: str, dim: int, kind: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise ConfigError(
            f"index kind {kind!r}: FAISS cannot build factory string {factory!r} for dimension {dim} "
            f"({first_line}); use one of {KINDS} or a valid factory string such as 'IVF1024,Flat', "
            "'IVF256,SQ8', 'IVF1024,PQ64' (PQ m must divide the dimension), 'HNSW32'."
        ) from None


# --------------------------------------------------------------------------------------------------
# the index object


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index):
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if hasattr(inner, "hnsw") else None


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


@dataclass
class SearchIndex:
    """A FAISS inner-product index over train vectors ``U(z)``, with how it was built and is searched.

    Row ``i`` of the index is the ``i``-th vector added (the order of the blocks). A score is the
    inner product ``<U(z_i), Q(z')>``: positive = proponent, negative = opponent.

    Attributes:
        index: The CPU FAISS index (``METRIC_INNER_PRODUCT``); a GPU copy is made lazily for search.
        kind: ``"flat"``, ``"ivf"``, ``"hnsw"``, ``"auto"`` or ``"factory"`` (a user factory string).
        factory: The FAISS factory string that built ``index``.
        dim: Vector dimension ``D``.
        build_params: How it was built (nlist, M, efConstruction, training sample, budget, ...).
        search_params: Default search parameters (``nprobe`` for IVF, ``efSearch`` for HNSW), with
            the opponents' own defaults under ``"opponents"`` (``-Q`` is often harder: its top
            inner products are spread over more of the index).
        recall: The calibration result (``recall_at_10`` and ``recall_at_10_opponents`` of the
            defaults against exact search, number of queries, target), or ``None`` for an exact
            index.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` (see the module docstring).
        mips_max_norm: ``M`` of the norm augmentation (module docstring), or ``None`` when the
            stored vectors are the train vectors themselves.
    """

    index: faiss.Index
    kind: str
    factory: str
    dim: int
    build_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    recall: dict[str, Any] | None = None
    device: str = "auto"
    mips_max_norm: float | None = None
    _gpu_index: Any = field(default=None, init=False, repr=False)
    _gpu_tried: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_device(self.device)

    @property
    def num_vectors(self) -> int:
        """Rows ``N`` in the index."""
        return int(self.index.ntotal)

    @property
    def exact(self) -> bool:
        """Whether a search returns the exact top-k (a Flat index)."""
        return isinstance(faiss.downcast_index(self.index), faiss.IndexFlat)

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU copy of the index."""
        return self._gpu_index is not None

    def describe(self) -> dict[str, Any]:
        """The manifest entries describing this index (without the caller's own entries)."""
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "factory": self.factory,
            "metric": "inner_product",
            "score": _SCORE_MEANING,
            "dim": self.dim,
            "num_vectors": self.num_vectors,
            "build_params": dict(self.build_params),
            "search_params": dict(self.search_params),
            "recall": None if self.recall is None else dict(self.recall),
            "faiss_version": faiss.__version__,
        }

    def search(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k train rows by inner product with each query; see ``search``."""
        return search(self, queries, k, opponents=opponents, nprobe=nprobe, ef_search=ef_search)

    # -- internals ------------------------------------------------------------------------------

    def _searcher(self, k: int) -> tuple[faiss.Index, bool]:
        """The index to search (GPU copy when allowed) and whether it is on a GPU."""
        if self.device == "cpu":
            return self.index, False
        if not self._gpu_tried:
            self._gpu_tried = True
            if self.device == "gpu" or _gpu_available():
                try:
                    self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
                except (RuntimeError, AttributeError) as error:
                    if self.device == "gpu":
                        raise ConfigError(
                            f"device='gpu': faiss cannot copy a {self.factory!r} index to the GPU "
                            f"({str(error).strip().splitlines()[-1]}); use device='cpu' or a kind with "
                            "a GPU version (flat, ivf, IVF..,PQ.., IVF..,SQ8)."
                        ) from None
                    warnings.warn(
                        f"device='auto': a {self.factory!r} index has no faiss GPU version; "
                        "searching on the CPU.",
                        stacklevel=3,
                    )
        if self._gpu_index is not None:
            if k > GPU_MAX_K:
                if self.device == "gpu":
                    raise ConfigError(
                        f"k={k} exceeds faiss-gpu's limit of {GPU_MAX_K}; use k <= {GPU_MAX_K} or "
                        "device='cpu'."
                    )
                return self.index, False
            return self._gpu_index, True
        return self.index, False


def _set_search_params(searcher: faiss.Index, on_gpu: bool, params: dict[str, Any]) -> None:
    params = dict(params)
    ivf = _ivf_of(searcher) if not on_gpu else None
    if ivf is not None and "nprobe" in params and _hnsw_of(ivf.quantizer) is not None:
        # an HNSW coarse quantizer must return nprobe lists: its efSearch has to be >= nprobe
        params.setdefault("quantizer_efSearch", max(2 * int(params["nprobe"]), 64))
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(searcher, name, value)


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")


def _nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Row numbers of ``(n, D)`` ``array`` that hold NaN or inf."""
    return np.flatnonzero(~np.isfinite(array).all(axis=1))


def _as_block(block: Any, dim: int, block_number: int, offset: int) -> np.ndarray:
    """Validate one block of train vectors and return it as C-contiguous float32 ``(n, D)``."""
    array = np.asarray(block)
    if array.ndim != 2 or array.shape[1] != dim:
        raise DataError(
            f"block {block_number} (rows from {offset}) has shape {array.shape}; every block must be "
            f"(n_i, {dim}) to match dim={dim}. Check the projection dimension and the number of "
            "checkpoints (D = K * d)."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"block {block_number} has dtype {array.dtype}; pass float32 (or float16) vectors.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = _nonfinite_rows(array)
    if bad.size:
        rows = ", ".join(str(offset + int(i)) for i in bad[:5])
        raise DataError(
            f"block {block_number} holds non-finite (NaN or inf) vectors at rows {rows}"
            f"{' ...' if bad.size > 5 else ''} ({bad.size} in all); recompute those samples' "
            "features, the index never repairs them."
        )
    return array


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    array = np.asarray(queries)
    if array.ndim != 2 or array.shape[1] != dim:
        raise DataError(
            f"queries have shape {array.shape}; expected (n_query, {dim}) to match the index "
            "dimension (reshape a single query to (1, D))."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"queries have dtype {array.dtype}; pass float32 query vectors.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = _nonfinite_rows(array)
    if bad.size:
        raise DataError(
            f"query rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} are not finite (NaN or "
            "inf); check the query images and their gradients."
        )
    return array


def _iterate(blocks: Blocks) -> Iterator[np.ndarray]:
    return iter(blocks() if callable(blocks) else blocks)


def _reiterable(blocks: Blocks) -> bool:
    if callable(blocks):
        return True
    try:
        return iter(blocks) is not blocks
    except TypeError:
        raise ConfigError(
            f"blocks of type {type(blocks).__name__} is not iterable; pass an iterable of (n_i, D) "
            "arrays or a callable returning one."
        ) from None


# --------------------------------------------------------------------------------------------------
# exact search and recall


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
    """Running exact top-k of fixed queries over streamed blocks (brute-force inner products)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries
        self.k = k
        self.scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((queries.shape[0], 0), dtype=np.int64)

    def update(self, block: np.ndarray, offset: int) -> None:
        scores = self.queries @ block.T  # (n_query, n_block): <Q(z'), U(z)>
        ids = np.broadcast_to(np.arange(offset, offset + block.shape[0], dtype=np.int64), scores.shape)
        self.scores, self.ids = _merge_topk(self.scores, self.ids, scores, ids, self.k)


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
        _, exact = search(reference, queries, k)
    elif isinstance(reference, np.ndarray) and reference.dtype.kind in "iu":
        exact = reference
    else:
        _, exact = exact_search(reference, queries, k)
    return recall_at_k(approx, exact, k)


# --------------------------------------------------------------------------------------------------
# search


def search(
    index: SearchIndex,
    queries: np.ndarray,
    k: int,
    opponents: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k training rows by inner product with each query vector ``Q(z')``.

    Args:
        index: A ``SearchIndex`` from ``build_index`` or ``load_index``.
        queries: ``(n_query, D)`` float32 query vectors.
        k: Results per query, ``1 <= k <= index.num_vectors``.
        opponents: ``False``: proponents, the largest inner products first. ``True``: opponents,
            searched with ``-Q``; the returned scores are the original (negative) inner products
            ``<U(z), Q(z')>``, most negative first.
        nprobe: IVF lists probed per query; default ``index.search_params["nprobe"]``, or
            ``index.search_params["opponents"]["nprobe"]`` for opponents (each calibrated to recall@10
            >= 0.95 at build time). More = slower and closer to exact.
        ef_search: HNSW candidate list size; default ``index.search_params["efSearch"]`` (or the
            opponents' value), calibrated like ``nprobe``.

    Returns:
        ``scores (n_query, k)`` float32: the inner products ``<U(z), Q(z')>`` (positive = proponent,
        negative = opponent, in the units of the vectors), and ``indices (n_query, k)`` int64: the
        rows of the index (the order in which vectors were added). An approximate index that finds
        fewer than ``k`` rows pads with index ``-1`` and score NaN.

    Raises:
        DataError: Queries of the wrong shape, dtype or with non-finite values.
        ConfigError: ``k`` larger than the index, or a search parameter the index does not have.
    """
    if not isinstance(index, SearchIndex):
        raise ConfigError(
            f"index is a {type(index).__name__}; pass the SearchIndex from build_index or load_index."
        )
    queries = _as_queries(queries, index.dim)
    if index.mips_max_norm is not None:
        queries = _pad_queries(queries)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > index.num_vectors:
        raise ConfigError(
            f"k={k!r} must be an integer in [1, {index.num_vectors}] (the number of vectors in the index)."
        )
    params = dict(index.search_params)
    opponent_params = params.pop("opponents", None) or {}
    if opponents:
        params.update(opponent_params)
    ivf = _ivf_of(index.index)
    if nprobe is not None:
        if ivf is None:
            raise ConfigError(
                f"nprobe={nprobe} given, but a {index.factory!r} index has no IVF lists; drop nprobe."
            )
        if (
            isinstance(nprobe, bool)
            or not isinstance(nprobe, (int, np.integer))
            or not 1 <= nprobe <= ivf.nlist
        ):
            raise ConfigError(f"nprobe={nprobe!r} must be an integer in [1, {ivf.nlist}] (nlist).")
        params["nprobe"] = int(nprobe)
    if ef_search is not None:
        if _hnsw_of(index.index) is None:
            raise ConfigError(
                f"ef_search={ef_search} given, but a {index.factory!r} index has no HNSW graph; drop ef_search."
            )
        _check_positive_int("ef_search", ef_search)
        params["efSearch"] = int(ef_search)
    searcher, on_gpu = index._searcher(int(k))
    if on_gpu and params.get("nprobe", 0) > GPU_MAX_K:
        raise ConfigError(
            f"nprobe={params['nprobe']} exceeds faiss-gpu's limit {GPU_MAX_K}; use device='cpu'."
        )
    _set_search_params(searcher, on_gpu, params)
    sign = -1.0 if opponents else 1.0
    scores, indices = searcher.search(sign * queries if opponents else queries, int(k))  # <U(z), +-Q(z')>
    scores = (sign * scores).astype(np.float32)  # back to <U(z), Q(z')>
    indices = indices.astype(np.int64)
    scores[indices < 0] = np.nan
    return scores, indices


# --------------------------------------------------------------------------------------------------
# building


def _bottom_k_sample(blocks: Blocks, dim: int, size: int, seed: int) -> tuple[np.ndarray, int]:
    """A uniform random sample of ``size`` rows of the stream in one pass (seeded random keys).

    Returns:
        ``(sample (m, D) float32, rows seen)``, ``m = min(size, rows seen)``.
    """
    rng = np.random.default_rng(seed)
    keys = np.zeros(0)
    sample = np.zeros((0, dim), dtype=np.float32)
    offset = 0
    for number, block in enumerate(_iterate(blocks)):
        array = _as_block(block, dim, number, offset)
        offset += array.shape[0]
        block_keys = rng.random(array.shape[0])
        keys = np.concatenate([keys, block_keys])
        sample = np.concatenate([sample, array])
        if keys.shape[0] > size:
            keep = np.argpartition(keys, size - 1)[:size]
            keep.sort()
            keys, sample = keys[keep], sample[keep]
    return sample, offset


def _augment(block: np.ndarray, max_norm: float) -> np.ndarray:
    """Append ``sqrt(M^2 - ||x||^2)`` (0 above ``M``) to each row ``(n, D) -> (n, D + 1)``."""
    squared = np.einsum("ij,ij->i", block, block, dtype=np.float64)
    extra = np.sqrt(np.maximum(max_norm * max_norm - squared, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([block, extra[:, None]]), dtype=np.float32)


def _pad_queries(queries: np.ndarray) -> np.ndarray:
    """Append a 0 to each query ``(n, D) -> (n, D + 1)``: inner products with augmented rows are unchanged."""
    return np.ascontiguousarray(np.hstack([queries, np.zeros((queries.shape[0], 1), np.float32)]))


def _calibration_queries(sample: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sample rows plus isotropic Gaussian noise of the same norm (not identical to any row)."""
    rng = np.random.default_rng(seed + 1)
    rows = sample[rng.choice(sample.shape[0], size=min(count, sample.shape[0]), replace=False)]
    noise = rng.standard_normal(rows.shape).astype(np.float32)
    noise *= np.linalg.norm(rows, axis=1, keepdims=True) / np.maximum(
        np.linalg.norm(noise, axis=1, keepdims=True), 1e-30
    )
    return np.ascontiguousarray(rows + noise, dtype=np.float32)


def _tune(
    index: SearchIndex, queries: np.ndarray, exact_ids: np.ndarray, target: float, opponents: bool
) -> tuple[dict[str, Any], float]:
    """Smallest nprobe / efSearch on a doubling ladder reaching recall@10 >= ``target``.

    ``exact_ids`` are the exact top-k of ``queries`` (``opponents=False``) or of ``-queries``.
    """
    ivf = _ivf_of(index.index)
    if ivf is not None:
        ladder = [2**i for i in range(int(math.log2(ivf.nlist)) + 1)]
        if ladder[-1] != ivf.nlist:
            ladder.append(int(ivf.nlist))
        name = "nprobe"
    else:
        ladder = list(EF_SEARCH_LADDER)
        name = "efSearch"
    k = exact_ids.shape[1]
    recall = 0.0
    for value in ladder:
        if name == "nprobe":
            _, found = search(index, queries, k, opponents=opponents, nprobe=value)
        else:
            _, found = search(index, queries, k, opponents=opponents, ef_search=value)
        recall = recall_at_k(found, exact_ids, k)
        if recall >= target:
            break
    return {name: value}, recall


def build_index(
    blocks: Blocks,
    num_vectors: int,
    dim: int,
    kind: str = "auto",
    *,
    nlist: int | None = None,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    train_vectors: np.ndarray | Callable[[], np.ndarray] | None = None,
    train_size: int | None = None,
    memory_budget_bytes: int | None = None,
    target_recall: float | None = DEFAULT_TARGET_RECALL,
    calibration_queries: np.ndarray | None = None,
    mips_augment: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> SearchIndex:
    """Build an inner-product index over train vectors ``U(z)`` streamed in blocks.

    Args:
        blocks: The train vectors as float32 blocks ``(n_i, D)`` (float16 is converted), in row
            order; or a callable returning a fresh iterable of them (lets IVF training sample all
            rows uniformly in a first pass). Row ``i`` of the index is the ``i``-th row streamed.
        num_vectors: Total rows ``N`` the blocks hold (checked); sets ``nlist`` and the auto rule.
        dim: Vector dimension ``D`` (``K`` checkpoints times the projection dimension ``d``).
        kind: ``"auto"``, ``"flat"``, ``"ivf"``, ``"hnsw"`` or a FAISS factory string (module docstring).
        nlist: IVF lists for ``kind="ivf"``; default ``default_nlist(N)`` (power of two near sqrt(N)).
        hnsw_m: HNSW links per node for ``kind="hnsw"`` (32).
        ef_construction: HNSW build-time candidate list size (40).
        train_vectors: Training sample ``(m, D)`` (or a callable returning it) for indexes that
            need training; default: sampled from ``blocks`` (module docstring).
        train_size: Rows to train on; default ``max(50 * nlist, 16384)``, at most ``N``.
        memory_budget_bytes: Budget of the ``auto`` rule; default half the machine's RAM.
        target_recall: recall@10 the default ``nprobe`` / ``efSearch`` must reach on the calibration
            queries (plus ``CALIBRATION_MARGIN``); ``None`` skips calibration and uses fixed
            defaults (``nprobe = nlist / 16``, ``efSearch = 128``).
        calibration_queries: ``(n, D)`` query vectors for the calibration; default
            ``NUM_CALIBRATION_QUERIES`` sample rows plus noise.
        mips_augment: Store vectors with the norm-augmenting coordinate (module docstring); default
            on for IVF indexes without PQ codes, off otherwise. Needs a trained (IVF) index.
        seed: Seed of the training sample and calibration queries.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` for searches (module docstring).
        progress: Show a tqdm progress bar over the rows added.

    Returns:
        The ``SearchIndex``; scores it returns are inner products (positive = proponent).

    Raises:
        ConfigError: Unknown kind or bad factory string, bad sizes, bad ``target_recall``.
        DataError: A block of the wrong dimension, non-finite vectors, or a row count that
            differs from ``num_vectors``.
    """
    _check_positive_int("num_vectors", num_vectors)
    _check_positive_int("dim", dim)
    _check_device(device)
    if target_recall is not None and not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target_recall={target_recall!r} must be in (0, 1], or None to skip calibration.")
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    kind, factory = _resolve_kind(kind, num_vectors, dim, nlist, hnsw_m, budget)
    faiss_index = _make_index(factory, dim, kind)
    if mips_augment is None:
        mips_augment = _ivf_of(faiss_index) is not None and "PQ" not in factory.upper()
    if mips_augment:
        if faiss_index.is_trained:
            raise ConfigError(
                f"mips_augment=True needs an index that is trained (IVF...), not {factory!r}; drop it."
            )
        faiss_index = _make_index(factory, dim + 1, kind)
    build_params: dict[str, Any] = {"seed": int(seed)}
    if kind == "auto":
        build_params["memory_budget_bytes"] = budget
    hnsw = _hnsw_of(faiss_index)
    if hnsw is not None:
        _check_positive_int("ef_construction", ef_construction)
        hnsw.hnsw.efConstruction = int(ef_construction)
        build_params.update({"M": int(hnsw.hnsw.nb_neighbors(1)), "efConstruction": int(ef_construction)})
    ivf = _ivf_of(faiss_index)
    if ivf is not None:
        build_params["nlist"] = int(ivf.nlist)
        if ivf.nlist > num_vectors:
            raise ConfigError(
                f"factory {factory!r} has nlist={ivf.nlist} lists for only {num_vectors} vectors; "
                "use fewer lists (kind='ivf' picks sqrt(N))."
            )

    pending: list[np.ndarray] = []  # blocks read while collecting a prefix training sample
    stream = None
    sample: np.ndarray | None = None
    if not faiss_index.is_trained:
        size = (
            train_size
            if train_size is not None
            else max(TRAIN_ROWS_PER_LIST * build_params.get("nlist", 1), MIN_TRAIN_ROWS)
        )
        _check_positive_int("train_size", size)
        size = min(int(size), num_vectors)
        if train_vectors is not None:
            raw = train_vectors() if callable(train_vectors) else train_vectors
            sample = _as_block(raw, dim, 0, 0)
            build_params["train_sample"] = "given"
        elif _reiterable(blocks):
            sample, _ = _bottom_k_sample(blocks, dim, size, seed)
            build_params["train_sample"] = "uniform"
        else:
            stream = _iterate(blocks)
            have = 0
            for number, block in enumerate(stream):
                array = _as_block(block, dim, number, have)
                pending.append(array)
                have += array.shape[0]
                if have >= size:
                    break
            sample = np.concatenate(pending)[:size] if pending else np.zeros((0, dim), np.float32)
            build_params["train_sample"] = "prefix"
        build_params["train_rows"] = int(sample.shape[0])
        if mips_augment:
            max_norm = float(
                np.sqrt(np.einsum("ij,ij->i", sample, sample, dtype=np.float64).max(initial=0.0))
            )
            build_params["mips_max_norm"] = max_norm
        if sample.shape[0] < build_params.get("nlist", 1):
            raise DataError(
                f"{sample.shape[0]} training rows for {build_params.get('nlist')} IVF lists; give more "
                "vectors or fewer lists."
            )
        faiss_index.train(_augment(sample, max_norm) if mips_augment else sample)

    calibrate = target_recall is not None and not isinstance(
        faiss.downcast_index(faiss_index), faiss.IndexFlat
    )
    top: _ExactTopK | None = None
    if calibrate and calibration_queries is not None:
        given = _as_queries(calibration_queries, dim)
        top = _ExactTopK(np.vstack([given, -given]), CALIBRATION_K)  # proponents and opponents

    if stream is None:
        stream = _iterate(blocks)
    source = _chain(pending, stream)
    added = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_vectors, desc=f"index {factory}", unit="vec")
    for number, block in enumerate(source):
        array = block if number < len(pending) else _as_block(block, dim, number, added)
        if added + array.shape[0] > num_vectors:
            raise DataError(
                f"the blocks hold more than num_vectors={num_vectors} rows; pass the true row count."
            )
        if calibrate and top is None:
            pool = sample if sample is not None and sample.shape[0] else array
            drawn = _calibration_queries(pool, NUM_CALIBRATION_QUERIES // 2, seed)
            top = _ExactTopK(np.vstack([drawn, -drawn]), CALIBRATION_K)  # proponents and opponents
        faiss_index.add(_augment(array, max_norm) if mips_augment else array)
        if top is not None:
            top.update(array, added)
        added += array.shape[0]
        if bar is not None:
            bar.update(array.shape[0])
    if bar is not None:
        bar.close()
    if added != num_vectors:
        raise DataError(
            f"the blocks hold {added} rows but num_vectors={num_vectors}; pass the true row count."
        )

    result = SearchIndex(
        faiss_index, kind, factory, dim, build_params, {}, None, device, build_params.get("mips_max_norm")
    )
    if not calibrate:
        if ivf is not None:
            result.search_params = {"nprobe": max(1, int(ivf.nlist) // 16)}
        elif hnsw is not None:
            result.search_params = {"efSearch": DEFAULT_EF_SEARCH}
        return result
    k = min(CALIBRATION_K, num_vectors)
    goal = min(1.0, float(target_recall) + CALIBRATION_MARGIN)
    half = top.queries.shape[0] // 2  # rows [Q; -Q]
    queries, exact_ids = top.queries[:half], top.ids[:, :k]
    params, recall = _tune(result, queries, exact_ids[:half], goal, opponents=False)
    opponent_params, opponent_recall = _tune(result, queries, exact_ids[half:], goal, opponents=True)
    result.search_params = {**params, "opponents": opponent_params}
    result.recall = {
        f"recall_at_{k}": round(float(recall), 4),
        f"recall_at_{k}_opponents": round(float(opponent_recall), 4),
        "target": float(target_recall),
        "calibration_target": goal,
        "n_queries": int(half),
        "queries": "given" if calibration_queries is not None else "sample rows + noise",
    }
    probes = max(params.get("nprobe", 0), opponent_params.get("nprobe", 0))
    if ivf is not None and probes > ivf.nlist // 4:
        warnings.warn(
            f"index {factory!r} needs nprobe={probes} of {ivf.nlist} lists for recall@{k} >= {goal:.2f}: "
            "it scans over a quarter of the vectors per query, barely faster than exact search. Such "
            "data (wide norm spread, high intrinsic dimension) suits kind='hnsw' better, or 'flat'.",
            stacklevel=2,
        )
    if min(recall, opponent_recall) < float(target_recall):
        warnings.warn(
            f"index {factory!r} reaches recall@{k} = {min(recall, opponent_recall):.3f} < target {target_recall} against exact "
            "search even at its largest search setting; use kind='ivf' or 'hnsw' (Flat codes) or "
            "re-rank exactly.",
            stacklevel=2,
        )
    return result


def _chain(pending: list[np.ndarray], stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield from pending
    yield from stream


# --------------------------------------------------------------------------------------------------
# save and load


def _atomic_write_bytes_via(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_index(
    index: SearchIndex, directory: str | os.PathLike, manifest: dict[str, Any] | None = None
) -> Path:
    """Write the FAISS file and ``manifest.json`` into ``directory``, each atomically.

    The old manifest is removed first and the new one written last, so a directory whose write was
    interrupted has no manifest and ``load_index`` refuses it.

    Args:
        index: The index to save (its CPU copy is written).
        directory: Target directory (created).
        manifest: The caller's entries (method, store fingerprint, checkpoints, ...), JSON-serialisable,
            merged with the index's own (format, kind, factory, dim, num_vectors, build and search
            parameters, recall), whose names they may not reuse.

    Returns:
        The directory.

    Raises:
        ConfigError: A caller key collides with an index key, or is not JSON-serialisable.
    """
    extra = dict(manifest or {})
    clash = sorted(set(extra) & set(_RESERVED_MANIFEST_KEYS))
    if clash:
        raise ConfigError(f"manifest keys {clash} are written by save_index itself; rename them.")
    content = {**index.describe(), **extra, "index_file": INDEX_FILENAME}
    try:
        json.dumps(content)
    except TypeError as error:
        raise ConfigError(
            f"manifest is not JSON-serialisable ({error}); pass str/int/float/list/dict values."
        ) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST_FILENAME
    if manifest_path.exists():
        manifest_path.unlink()
    index_path = directory / INDEX_FILENAME
    _atomic_write_bytes_via(index_path, lambda p: faiss.write_index(index.index, p))
    content["index_file_bytes"] = index_path.stat().st_size
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes_via(manifest_path, lambda p: Path(p).write_text(text))
    return directory


def _differences(expected: Any, actual: Any, prefix: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in expected:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in actual:
                out.append(f"{name}: expected {expected[key]!r}, index has none")
            else:
                out.extend(_differences(expected[key], actual[key], name))
        return out
    if expected != actual:
        return [f"{prefix}: expected {expected!r}, index has {actual!r}"]
    return []


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved index directory.

    Raises:
        DataError: No manifest (not an index, or an interrupted write) or an unreadable one.
    """
    path = Path(directory) / MANIFEST_FILENAME
    if not path.is_file():
        raise DataError(
            f"{directory} has no {MANIFEST_FILENAME}: not a retrac index, or its write was interrupted; "
            "build it again (retrac build / save_index)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error}); build the index again.") from None


def load_index(
    directory: str | os.PathLike,
    expect: dict[str, Any] | None = None,
    device: str = "auto",
    mmap: bool = False,
) -> SearchIndex:
    """Load an index saved by ``save_index``, refusing one that does not match ``expect``.

    Args:
        directory: The index directory.
        expect: Manifest entries the caller requires (method, store fingerprint, dim, ...); nested
            dicts are compared key by key.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` for searches.
        mmap: Memory-map the FAISS file instead of reading it (indexes larger than RAM).

    Returns:
        The ``SearchIndex`` with its saved search parameters and recall.

    Raises:
        StoreMismatchError: Another format version, or entries that differ from ``expect`` (all
            differing keys are named).
        DataError: Missing or damaged files.
    """
    _check_device(device)
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreMismatchError(
            f"{directory} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this retrac reads {INDEX_FORMAT!r} version {INDEX_FORMAT_VERSION}. Rebuild the index."
        )
    if expect:
        normalized = json.loads(json.dumps(expect, default=str))
        diffs = _differences(normalized, manifest, "")
        if diffs:
            raise StoreMismatchError(
                f"index {directory} was built with other settings: "
                + "; ".join(diffs)
                + ". Rebuild the index for these settings (retrac build) or load the matching one."
            )
    path = directory / manifest.get("index_file", INDEX_FILENAME)
    if not path.is_file():
        raise DataError(f"{path} is missing; build the index again.")
    if "index_file_bytes" in manifest and path.stat().st_size != manifest["index_file_bytes"]:
        raise DataError(
            f"{path} has {path.stat().st_size} bytes, its manifest says {manifest['index_file_bytes']}; "
            "the file was changed or torn. Build the index again."
        )
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    faiss_index = faiss.read_index(str(path), flags)
    build_params = dict(manifest.get("build_params") or {})
    max_norm = build_params.get("mips_max_norm")
    stored_dim = manifest.get("dim", -1) + (0 if max_norm is None else 1)
    if faiss_index.d != stored_dim or faiss_index.ntotal != manifest.get("num_vectors"):
        raise DataError(
            f"{path} holds {faiss_index.ntotal} vectors of dimension {faiss_index.d}, its manifest says "
            f"{manifest.get('num_vectors')} of {stored_dim}; build the index again."
        )
    return SearchIndex(
        faiss_index,
        manifest["kind"],
        manifest["factory"],
        int(manifest["dim"]),
        build_params,
        dict(manifest.get("search_params") or {}),
        manifest.get("recall"),
        device,
        None if max_norm is None else float(max_norm),
    )
