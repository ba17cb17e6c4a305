"""The ``SearchIndex``: a FAISS inner-product index over train vectors, and its search.

A score is the inner product ``I(z, z') = <U(z), Q(z')>`` (docs/design.md section 1); positive =
proponent, negative = opponent (found by searching with ``-Q``). Results have shape
``(n_query, k)``, best first.

faiss-gpu: with ``device="auto"`` the index is copied to all GPUs (``index_cpu_to_all_gpus``) at the
first search when the installed faiss has GPU support and sees a GPU; ``device="gpu"`` requires it and
raises when it is unavailable or the index kind has no GPU version (HNSW); ``device="cpu"`` never
uses a GPU.
"""

from __future__ import annotations

import warnings
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

INDEX_FORMAT = "retrac-index"
INDEX_FORMAT_VERSION = 1
GPU_MAX_K = 2048  # faiss-gpu's limit on k and nprobe
_SCORE_MEANING = "inner product <U(z), Q(z')>; positive = proponent, negative = opponent"


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
        """Top-k training rows by inner product with each query vector ``Q(z')``.

        Args:
            queries: ``(n_query, D)`` float32 query vectors.
            k: Results per query, ``1 <= k <= num_vectors``.
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
            int64: the rows of the index (the order in which vectors were added). An approximate
            index that finds fewer than ``k`` rows pads with index ``-1`` and score NaN.

        Raises:
            DataError: Queries of the wrong shape, dtype or with non-finite values.
            ConfigError: ``k`` larger than the index, or a search parameter the index does not have.
        """
        queries = _as_queries(queries, self.dim)
        if self.mips_max_norm is not None:
            queries = _pad_queries(queries)
        _check_int_in_range("k", k, self.num_vectors, "the number of vectors in the index")
        params = self._search_params(opponents, nprobe, ef_search)
        searcher, on_gpu = self._searcher(int(k))
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
