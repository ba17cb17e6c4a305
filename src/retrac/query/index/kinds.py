"""Which FAISS index to build: the kind names, the ``auto`` rule and the factory strings.

All kinds use ``METRIC_INNER_PRODUCT``:

* ``"flat"``: ``IndexFlatIP``, exact; the reference every other kind is measured against.
* ``"ivf"``: IVF-Flat (``"IVF{nlist},Flat"``), spherical k-means coarse quantizer. ``nlist`` is the
  power of two nearest ``sqrt(N)`` (1024 at one million rows, at least 16 and at most ``N / 39``):
  adding costs ``N * nlist * D`` flops for the assignment, so on CPUs a larger ``nlist`` (faiss'
  ``4..16 sqrt(N)`` guideline) pays off only with an HNSW coarse quantizer, which ``auto`` uses past
  ``HNSW_QUANTIZER_MIN_ROWS`` rows.
* ``"hnsw"``: ``IndexHNSWFlat`` with ``M = 32`` links per node and ``efConstruction = 40``.
* any FAISS factory string, e.g. ``"IVF1024,PQ64"``, ``"IVF256,SQ8"``, ``"OPQ64,IVF1024,PQ64"``,
  ``"IVF4096_HNSW32,Flat"``, built with ``faiss.index_factory(D, string, METRIC_INNER_PRODUCT)``.
* ``"auto"``: the rule of :func:`auto_factory`, which follows the search benchmark: ``Flat`` up to
  ``AUTO_FLAT_MAX_ROWS`` (50,000) rows, ``HNSW32,Flat`` above while it fits the memory budget
  (default: half the machine's RAM), else IVF (HNSW coarse quantizer past 4 million rows) with
  ``Flat`` or ``SQ8`` codes, its lists on disk when they exceed the budget.
"""

from __future__ import annotations

import math
import os

import faiss

from retrac.errors import ConfigError
from retrac.query.index.checks import _check_positive_int

KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_FLAT_MAX_ROWS = 50_000
HNSW_QUANTIZER_MIN_ROWS = 4_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # faiss' default; 80 doubles the build time for little recall here


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


def hnsw_bytes(num_vectors: int, dim: int, m: int = HNSW_M) -> int:
    """Bytes of an ``HNSW{m},Flat`` index: float32 vectors plus about ``2 m`` int32 links per row."""
    return int(num_vectors) * (4 * int(dim) + 2 * int(m) * 4)


def auto_factory(num_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """The FAISS factory string ``kind="auto"`` builds for ``num_vectors`` rows of dimension ``dim``.

    The rule follows ``benchmarks/search.py``: on gradient-like vectors (10^6 x 1024) IVF needed
    ``nprobe`` 128 of 1024 lists for recall@10 0.966 and was then no faster than Flat, while HNSW was
    73x Flat at recall 0.974. So:

    1. ``N <= AUTO_FLAT_MAX_ROWS`` (50,000) and the float32 vectors (``4 N D`` bytes) fit the budget:
       ``"Flat"`` (exact; at this size a query costs milliseconds).
    2. The HNSW graph and its float32 vectors (:func:`hnsw_bytes`) fit the budget: ``"HNSW32,Flat"``;
       else the graph and 8-bit codes (``N (D + 256)`` bytes): ``"HNSW32,SQ8"`` (on the scale
       benchmark's data, IVF-SQ8 needed every list for recall@10 0.93, see ``benchmarks/scale.py``).
    3. Otherwise an IVF index: ``nlist = default_nlist(N)`` lists (the power of two nearest
       ``sqrt(N)``), past ``HNSW_QUANTIZER_MIN_ROWS`` (4 million) rows ``4 sqrt(N)`` lists with an HNSW
       coarse quantizer (``IVF{nlist}_HNSW32``); ``Flat`` codes when ``4 N D`` bytes fit the budget, else
       ``SQ8`` (``N D`` bytes). IVF lists larger than the budget are written to disk by the build
       (``retrac.query.index.ondisk``), so every size has an index; re-ranking against the store
       (``retrac.query.index.rerank``) makes the SQ8 scores exact.

    Args:
        num_vectors: Rows ``N`` of the index.
        dim: Vector dimension ``D``.
        memory_budget_bytes: Bytes the index may hold in RAM; default ``default_memory_budget()``.

    Returns:
        A factory string for ``faiss.index_factory``.
    """
    _check_positive_int("num_vectors", num_vectors)
    _check_positive_int("dim", dim)
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    flat_bytes = 4 * num_vectors * dim
    if num_vectors <= AUTO_FLAT_MAX_ROWS and flat_bytes <= budget:
        return "Flat"
    if num_vectors > AUTO_FLAT_MAX_ROWS and hnsw_bytes(num_vectors, dim) <= budget:
        return f"HNSW{HNSW_M},Flat"
    if num_vectors > AUTO_FLAT_MAX_ROWS and num_vectors * (dim + 2 * HNSW_M * 4) <= budget:
        return f"HNSW{HNSW_M},SQ8"  # one byte per dimension: still HNSW, which this data needs
    if num_vectors >= HNSW_QUANTIZER_MIN_ROWS:
        coarse = f"IVF{2 ** round(math.log2(4 * num_vectors**0.5))}_HNSW32"
    else:
        coarse = f"IVF{default_nlist(num_vectors)}"
    return f"{coarse},Flat" if flat_bytes <= budget else f"{coarse},SQ8"


def _resolve_kind(
    kind: str, num_vectors: int, dim: int, nlist: int | None, hnsw_m: int, budget: int | None
) -> tuple[str, str]:
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
    """``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``; a bad string raises ``ConfigError``."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise ConfigError(
            f"index kind {kind!r}: FAISS cannot build factory string {factory!r} for dimension {dim} "
            f"({first_line}); use one of {KINDS} or a valid factory string such as 'IVF1024,Flat', "
            "'IVF256,SQ8', 'IVF1024,PQ64' (PQ m must divide the dimension), 'HNSW32'."
        ) from None


def _ivf_of(index: faiss.Index):
    """The IVF part of ``index`` (for ``nlist`` / ``nprobe``), or ``None``."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index):
    """The HNSW part of ``index`` (for ``efConstruction`` / ``efSearch``), or ``None``."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if hasattr(inner, "hnsw") else None
