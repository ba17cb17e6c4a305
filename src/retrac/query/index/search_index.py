"""The ``SearchIndex``: a FAISS inner-product index over train vectors, and its search.

A score is the inner product ``I(z, z') = <U(z), Q(z')>`` (docs/design.md section 1); positive =
proponent, negative = opponent (found by searching with ``-Q``). Results have shape
``(n_query, k)``, best first.

faiss-gpu: with ``device="auto"`` the index is copied to all GPUs (``index_cpu_to_all_gpus``) at the
first search when the installed faiss has GPU support and sees a GPU; ``device="gpu"`` requires it and
raises when it is unavailable or the index kind has no GPU version (HNSW); ``device="cpu"`` never
uses a GPU.

No padding is ever returned. An approximate index can find fewer than ``k`` rows for a query (FAISS
pads with ``-1``): an HNSW graph explores at most ``efSearch`` candidates, an IVF index only the rows
of its ``nprobe`` probed lists. Such queries are searched again with the setting doubled
(``efSearch`` up to ``N``, ``nprobe`` up to ``nlist``, which scans every row); queries still short
after that are answered by exact search over the index's own vectors (``reconstruct_n``: exact for
Flat codes, the decoded vectors for PQ / SQ codes, i.e. the vectors those indexes score with), or,
for an index that cannot reconstruct, over ``SearchIndex.vector_source``. :meth:`SearchIndex.find`
says which happened (``SearchResult.widened``, ``SearchResult.exact_fallback``, ``SearchResult.note``).
``k`` larger than the index is an error, never clipped.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from retrac.errors import ConfigError
from retrac.query.index.checks import (
    _as_queries,
    _check_device,
    _check_int_in_range,
    _check_positive_int,
    _gpu_available,
)
from retrac.query.index.kinds import _hnsw_of, _ivf_of
from retrac.query.index.mips import _pad_queries
from retrac.query.index.topk import _ExactTopK

INDEX_FORMAT = "retrac-index"
INDEX_FORMAT_VERSION = 2  # 2: sha256 digests of the files and a sealed manifest (docs/design.md section 6)
GPU_MAX_K = 2048  # faiss-gpu's limit on k and nprobe
_SCORE_MEANING = "inner product <U(z), Q(z')>; positive = proponent, negative = opponent"
EXACT_FALLBACK_BLOCK_ROWS = 16384  # rows reconstructed at a time by the exact fallback


@dataclass(frozen=True)
class SearchResult:
    """The answer of :meth:`SearchIndex.find`: ``k`` real rows per query, and how they were found.

    Attributes:
        scores: ``(n_query, k)`` float32 inner products ``<U(z), Q(z')>`` (positive = proponent),
            best first (descending; ascending for opponents). Always finite.
        indices: ``(n_query, k)`` int64 rows of the index (the order vectors were added), distinct
            within a query. Never ``-1``.
        k: Results per query.
        short: Queries for which the approximate search at the asked setting found fewer than ``k``
            rows (0 for an exact index).
        widened: ``{"nprobe": value}`` or ``{"efSearch": value}``: the largest setting the short
            queries were searched again with; ``None`` when none were.
        exact_fallback: Queries answered by exact search over the index's vectors, because even the
            widest setting could not fill ``k``.
    """

    scores: np.ndarray
    indices: np.ndarray
    k: int
    short: int = 0
    widened: dict[str, int] | None = None
    exact_fallback: int = 0

    @property
    def note(self) -> str | None:
        """One sentence saying how short queries were filled; ``None`` when none were short."""
        if not self.short:
            return None
        n = self.indices.shape[0]
        parts = [f"the approximate index found fewer than k={self.k} rows for {self.short} of {n} queries"]
        if self.widened:
            ((name, value),) = self.widened.items()
            filled = self.short - self.exact_fallback
            parts.append(f"searched again with {name} up to {value} ({filled} filled)")
        if self.exact_fallback:
            parts.append(f"{self.exact_fallback} answered by exact search over the index's vectors")
        return "; ".join(parts) + "."


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
        mips_max_norm: ``M`` of the norm augmentation (``retrac.query.index.mips``), or ``None``
            when the stored vectors are the train vectors themselves.
        vector_source: A callable returning the train vectors ``(n_i, D)`` in row order, for the
            exact fallback of an index that cannot reconstruct its vectors; ``None`` otherwise.
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
    vector_source: Callable[[], Iterable[np.ndarray]] | None = field(default=None, repr=False)
    _gpu_index: Any = field(default=None, init=False, repr=False)
    _gpu_tried: bool = field(default=False, init=False, repr=False)
    # FAISS search parameters (nprobe, efSearch) are set on the shared index before each search, and
    # the GPU copy is made lazily: one search at a time per index (retrac serve searches on a pool).
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

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
        """Top-k training rows by inner product with each query vector ``Q(z')``.

        Args:
            queries: ``(n_query, D)`` float32 query vectors.
            k: Results per query, ``1 <= k <= num_vectors`` (a larger ``k`` is an error, not clipped).
            opponents: ``False``: proponents, the largest inner products first. ``True``: opponents,
                searched with ``-Q``; the returned scores are the original (negative) inner products
                ``<U(z), Q(z')>``, most negative first.
            nprobe: IVF lists probed per query; default ``search_params["nprobe"]``, or
                ``search_params["opponents"]["nprobe"]`` for opponents (each calibrated to recall@10
                >= 0.95 at build time). More = slower and closer to exact.
            ef_search: HNSW candidate list size; default ``search_params["efSearch"]`` (or the
                opponents' value), calibrated like ``nprobe``.

        Returns:
            ``scores (n_query, k)`` float32: the inner products ``<U(z), Q(z')>`` (positive =
            proponent, negative = opponent, in the units of the vectors), and ``indices (n_query, k)``
            int64: the rows of the index (the order in which vectors were added). Every entry is a
            real row: queries the approximate index cannot fill are widened or answered exactly
            (:meth:`find` says which).

        Raises:
            DataError: Queries of the wrong shape, dtype or with non-finite values.
            ConfigError: ``k`` larger than the index, or a search parameter the index does not have.
        """
        result = self.find(queries, k, opponents=opponents, nprobe=nprobe, ef_search=ef_search)
        return result.scores, result.indices

    def find(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """:meth:`search`, with how short queries were filled (``SearchResult.note``).

        Args and raises: as for :meth:`search`.

        Returns:
            The :class:`SearchResult`: ``(n_query, k)`` scores and rows, all real, and whether the
            search was widened or fell back to exact search.
        """
        queries = _as_queries(queries, self.dim)
        stored = _pad_queries(queries) if self.mips_max_norm is not None else queries
        _check_int_in_range("k", k, self.num_vectors, "the number of vectors in the index; ask for fewer")
        k = int(k)
        params = self._search_params(opponents, nprobe, ef_search)
        with self._lock:
            return self._find(queries, stored, k, opponents, params)

    def _find(
        self, queries: np.ndarray, stored: np.ndarray, k: int, opponents: bool, params: dict[str, Any]
    ) -> SearchResult:
        scores, indices = self._search_approximate(stored, k, opponents, params)
        short = np.flatnonzero((indices < 0).any(axis=1))
        if short.size == 0:
            return SearchResult(scores, indices, k)
        widened = None
        still = short
        ladder = self._widening_ladder(params, k)
        try:
            for name, value in ladder:
                widened = {name: value}
                part_scores, part_ids = self._search_on(
                    self.index, False, stored[still], k, opponents, {**params, name: value}
                )
                scores[still], indices[still] = part_scores, part_ids
                still = still[(part_ids < 0).any(axis=1)]
                if still.size == 0:
                    break
        finally:
            _set_search_params(self.index, False, params)  # the defaults again
        if still.size:
            scores[still], indices[still] = self._exact_search(queries[still], stored[still], k, opponents)
        return SearchResult(scores, indices, k, int(short.size), widened, int(still.size))

    def search_as_built(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search at the given setting, neither widened nor filled: for measuring an index.

        Args and raises: as for :meth:`search`.

        Returns:
            ``scores (n_query, k)`` and ``indices (n_query, k)`` as FAISS answers: a query the
            index cannot fill holds index ``-1`` with score NaN in its last places. Never return
            these to a user (use :meth:`search`); recall measurements count the ``-1`` as misses.
        """
        queries = _as_queries(queries, self.dim)
        stored = _pad_queries(queries) if self.mips_max_norm is not None else queries
        _check_int_in_range("k", k, self.num_vectors, "the number of vectors in the index; ask for fewer")
        params = self._search_params(opponents, nprobe, ef_search)
        with self._lock:
            scores, indices = self._search_approximate(stored, int(k), opponents, params)
        scores[indices < 0] = np.nan
        return scores, indices

    def _search_approximate(
        self, stored_queries: np.ndarray, k: int, opponents: bool, params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search at ``params``, as FAISS answers it: short queries padded with ``-1``.

        ``stored_queries`` are already padded for the norm augmentation. Used by :meth:`find` and by
        the calibration, which measures the index as built (``retrac.query.index.calibrate``).
        """
        searcher, on_gpu = self._searcher(k)
        if on_gpu and params.get("nprobe", 0) > GPU_MAX_K:
            raise ConfigError(
                f"nprobe={params['nprobe']} exceeds faiss-gpu's limit {GPU_MAX_K}; use device='cpu'."
            )
        return self._search_on(searcher, on_gpu, stored_queries, k, opponents, params)

    @staticmethod
    def _search_on(
        searcher: faiss.Index,
        on_gpu: bool,
        stored_queries: np.ndarray,
        k: int,
        opponents: bool,
        params: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray]:
        _set_search_params(searcher, on_gpu, params)
        sign = -1.0 if opponents else 1.0
        queries = np.ascontiguousarray(sign * stored_queries) if opponents else stored_queries
        scores, indices = searcher.search(queries, k)  # <U(z), +-Q(z')>
        return (sign * scores).astype(np.float32), indices.astype(np.int64)  # back to <U(z), Q(z')>

    def _widening_ladder(self, params: dict[str, Any], k: int) -> list[tuple[str, int]]:
        """The settings a short query is searched again with: the current one doubled, up to full.

        IVF: ``nprobe`` doubled up to ``nlist`` (every list: every row is scored). HNSW: ``efSearch``
        (at least ``k``) doubled up to ``N``. Other kinds scan every row already: no ladder.
        """
        ivf = _ivf_of(self.index)
        if ivf is not None:
            name, value, top = "nprobe", int(params.get("nprobe", 1)), int(ivf.nlist)
        elif _hnsw_of(self.index) is not None:
            name, top = "efSearch", self.num_vectors
            value = max(int(params.get("efSearch", k)), k)
        else:
            return []
        ladder = []
        while value < top:
            value = min(2 * value, top)
            ladder.append((name, value))
        return ladder

    def _exact_search(
        self, queries: np.ndarray, stored_queries: np.ndarray, k: int, opponents: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by brute force over the index's vectors, streamed in blocks.

        The vectors come from ``reconstruct_n`` (as stored: with the norm-augmenting coordinate,
        matched by ``stored_queries``), or from ``vector_source`` for an index that cannot
        reconstruct (as built: matched by ``queries``).
        """
        sign = -1.0 if opponents else 1.0
        if _reconstructs(self.index):
            blocks, rows = self._reconstructed_blocks(), stored_queries
        else:
            if self.vector_source is None:
                raise ConfigError(
                    f"the {self.factory!r} index found fewer than k={k} rows for {queries.shape[0]} queries "
                    "even at its widest setting, and cannot reconstruct its vectors for an exact search; "
                    "ask for fewer results (smaller k) or build a 'flat', 'ivf' or 'hnsw' index."
                ) from None
            blocks, rows = self.vector_source(), queries
        top = _ExactTopK(np.ascontiguousarray(sign * rows, dtype=np.float32), k)
        offset = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            top.update(block, offset)  # <U(z), +-Q(z')>
            offset += block.shape[0]
        if offset != self.num_vectors:
            raise ConfigError(
                f"the exact fallback read {offset} vectors, the index holds {self.num_vectors}; "
                "vector_source must yield the index's rows in order."
            )
        return (sign * top.scores).astype(np.float32), top.ids.astype(np.int64)

    def _reconstructed_blocks(self):
        for start in range(0, self.num_vectors, EXACT_FALLBACK_BLOCK_ROWS):
            count = min(EXACT_FALLBACK_BLOCK_ROWS, self.num_vectors - start)
            yield self.index.reconstruct_n(start, count)

    # -- internals ------------------------------------------------------------------------------

    def _search_params(self, opponents: bool, nprobe: int | None, ef_search: int | None) -> dict[str, Any]:
        """The defaults for proponents or opponents, overridden by the caller's valid values."""
        params = dict(self.search_params)
        opponent_params = params.pop("opponents", None) or {}
        if opponents:
            params.update(opponent_params)
        if nprobe is not None:
            ivf = _ivf_of(self.index)
            if ivf is None:
                raise ConfigError(
                    f"nprobe={nprobe} given, but a {self.factory!r} index has no IVF lists; drop nprobe."
                )
            _check_int_in_range("nprobe", nprobe, ivf.nlist, "nlist")
            params["nprobe"] = int(nprobe)
        if ef_search is not None:
            if _hnsw_of(self.index) is None:
                raise ConfigError(
                    f"ef_search={ef_search} given, but a {self.factory!r} index has no HNSW graph; drop ef_search."
                )
            _check_positive_int("ef_search", ef_search)
            params["efSearch"] = int(ef_search)
        return params

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
                        stacklevel=4,
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


def _reconstructs(index: faiss.Index) -> bool:
    """Whether ``index.reconstruct_n`` returns its stored vectors (decoded, for PQ / SQ codes).

    An IVF index reconstructs by scanning its lists (no direct map needed); any other kind is asked
    for row 0 first, because FAISS aborts the process when ``reconstruct_n`` is not implemented.
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        return True
    try:
        index.reconstruct(0)
    except RuntimeError:
        return False
    return True


def _set_search_params(searcher: faiss.Index, on_gpu: bool, params: dict[str, Any]) -> None:
    params = dict(params)
    ivf = _ivf_of(searcher) if not on_gpu else None
    if ivf is not None and "nprobe" in params and _hnsw_of(ivf.quantizer) is not None:
        # an HNSW coarse quantizer must return nprobe lists: its efSearch has to be >= nprobe
        params.setdefault("quantizer_efSearch", max(2 * int(params["nprobe"]), 64))
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(searcher, name, value)


def search(
    index: SearchIndex,
    queries: np.ndarray,
    k: int,
    opponents: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k training rows by inner product with each query vector: ``index.search(...)``.

    Args:
        index: A ``SearchIndex`` from ``build_index`` or ``load_index``.
        queries, k, opponents, nprobe, ef_search: As for :meth:`SearchIndex.search`.

    Returns:
        ``scores (n_query, k)`` float32 inner products ``<U(z), Q(z')>`` (positive = proponent) and
        ``indices (n_query, k)`` int64 rows, best first (see :meth:`SearchIndex.search`).

    Raises:
        ConfigError: ``index`` is not a ``SearchIndex``, or as for :meth:`SearchIndex.search`.
        DataError: As for :meth:`SearchIndex.search`.
    """
    if not isinstance(index, SearchIndex):
        raise ConfigError(
            f"index is a {type(index).__name__}; pass the SearchIndex from build_index or load_index."
        )
    return index.search(queries, k, opponents=opponents, nprobe=nprobe, ef_search=ef_search)
