"""Default search parameters of an approximate index, calibrated against exact search.

After adding, ``build_index`` searches calibration queries (``calibration_queries``, else
``NUM_CALIBRATION_QUERIES / 2`` = 128 sample rows plus isotropic noise of the same norm), each both
as ``Q`` and as ``-Q`` (proponents and opponents), and takes the smallest ``nprobe`` (IVF: 1, 2, 4,
..., nlist) or ``efSearch`` (HNSW: 16, 32, ..., 4096) whose recall@10 against the exact top 10
(computed by brute force during the same add pass) reaches ``target_recall + CALIBRATION_MARGIN``
(0.95 + 0.02). Proponents (``Q``) and opponents (``-Q``) get their own values. The values and the
measured recalls are stored in ``SearchIndex.search_params`` / ``SearchIndex.recall`` and in the
manifest; every approximate index thus reports its recall against Flat.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from retrac.query.index.checks import _as_queries
from retrac.query.index.exact import recall_at_k
from retrac.query.index.kinds import _hnsw_of, _ivf_of
from retrac.query.index.search_index import SearchIndex
from retrac.query.index.topk import _ExactTopK

DEFAULT_TARGET_RECALL = 0.95
CALIBRATION_MARGIN = 0.02
NUM_CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_EF_SEARCH = 128  # used when target_recall=None


def default_search_params(index: SearchIndex) -> dict[str, Any]:
    """Fixed defaults when calibration is skipped: ``nprobe = nlist / 16``, ``efSearch = 128``."""
    ivf = _ivf_of(index.index)
    if ivf is not None:
        return {"nprobe": max(1, int(ivf.nlist) // 16)}
    if _hnsw_of(index.index) is not None:
        return {"efSearch": DEFAULT_EF_SEARCH}
    return {}


class Calibration:
    """The calibration queries ``[Q; -Q]`` and their exact top-k, gathered during the add pass.

    Args:
        given: ``(n, D)`` calibration queries, or ``None`` to draw them from ``sample`` (or, without a
            training sample, from the first block added).
        dim: Vector dimension ``D``.
        sample: The training sample ``(m, D)``, or ``None``.
        seed: Seed of the drawn queries.
    """

    def __init__(self, given: np.ndarray | None, dim: int, sample: np.ndarray | None, seed: int):
        self.given = given is not None
        self.sample = sample
        self.seed = seed
        self.top: _ExactTopK | None = None
        if given is not None:
            queries = _as_queries(given, dim)
            self.top = _ExactTopK(np.vstack([queries, -queries]), CALIBRATION_K)  # proponents and opponents

    def update(self, block: np.ndarray, offset: int) -> None:
        """Fold the block of rows ``offset ..`` (train vectors, as added) into the exact top-k."""
        if self.top is None:
            pool = self.sample if self.sample is not None and self.sample.shape[0] else block
            drawn = _calibration_queries(pool, NUM_CALIBRATION_QUERIES // 2, self.seed)
            self.top = _ExactTopK(np.vstack([drawn, -drawn]), CALIBRATION_K)  # proponents and opponents
        self.top.update(block, offset)

    def calibrate(self, index: SearchIndex, target_recall: float) -> None:
        """Set ``index.search_params`` and ``index.recall`` from the smallest settings reaching the goal.

        Warns when the settings scan over a quarter of the lists, or when even the largest setting
        stays below ``target_recall``.
        """
        k = min(CALIBRATION_K, index.num_vectors)
        goal = min(1.0, float(target_recall) + CALIBRATION_MARGIN)
        half = self.top.queries.shape[0] // 2  # rows [Q; -Q]
        queries, exact_ids = self.top.queries[:half], self.top.ids[:, :k]
        params, recall = _tune(index, queries, exact_ids[:half], goal, opponents=False)
        opponent_params, opponent_recall = _tune(index, queries, exact_ids[half:], goal, opponents=True)
        index.search_params = {**params, "opponents": opponent_params}
        index.recall = {
            f"recall_at_{k}": round(float(recall), 4),
            f"recall_at_{k}_opponents": round(float(opponent_recall), 4),
            "target": float(target_recall),
            "calibration_target": goal,
            "n_queries": int(half),
            "queries": "given" if self.given else "sample rows + noise",
        }
        ivf = _ivf_of(index.index)
        probes = max(params.get("nprobe", 0), opponent_params.get("nprobe", 0))
        if ivf is not None and probes > ivf.nlist // 4:
            warnings.warn(
                f"index {index.factory!r} needs nprobe={probes} of {ivf.nlist} lists for recall@{k} >= {goal:.2f}: "
                "it scans over a quarter of the vectors per query, barely faster than exact search. Such "
                "data (wide norm spread, high intrinsic dimension) suits kind='hnsw' better, or 'flat'.",
                stacklevel=3,
            )
        if min(recall, opponent_recall) < float(target_recall):
            warnings.warn(
                f"index {index.factory!r} reaches recall@{k} = {min(recall, opponent_recall):.3f} < target {target_recall} against exact "
                "search even at its largest search setting; use kind='ivf' or 'hnsw' (Flat codes) or "
                "re-rank exactly.",
                stacklevel=3,
            )


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
            _, found = index.search_as_built(queries, k, opponents=opponents, nprobe=value)
        else:
            _, found = index.search_as_built(queries, k, opponents=opponents, ef_search=value)
        recall = recall_at_k(found, exact_ids, k)
        if recall >= target:
            break
    return {name: value}, recall
