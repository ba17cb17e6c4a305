"""Measuring the timestep-induced bias (docs/design.md section 1) and ReTrac's correction.

The paper's finding (Xie et al., TMLR 2024): the per-sample gradient norm ``n_k(z, e)`` depends
strongly on the timestep ``t`` of the event, so under Diffusion-TracIn the training samples whose
events fall on large-norm timesteps, and outliers, become *generally influential*: they appear
in the top-k of almost every query. Diffusion-ReTrac normalises each gradient and removes this.

Measurements, all on plain arrays so they can be checked by hand:

* :func:`norm_timestep_profile` / :func:`norm_timestep_profiles`: per checkpoint, the mean and
  spread of ``n_k(z, e)`` in timestep bins, and the Spearman correlation of norm and timestep
  over the events.
* :func:`topk_bias`: from an ``(n_query, k)`` top-k matrix, the number of distinct training samples
  over all top-k lists, the number of *generally influential* samples, and the share of planted
  outliers in the top-k lists of ordinary queries.
* :func:`influence_spearman`: Spearman correlation between a sample's mean influence over the
  queries and a per-sample statistic (the mean gradient norm of its training events,
  :func:`sample_event_norms`, or their mean timestep, :func:`sample_event_timesteps`).

**Generally influential** (the definition used everywhere in retrac): a training sample is
generally influential among ``Q`` queries when it appears in the top-k proponents of at least
``max(min_queries, ceil(fraction * Q))`` of them; the defaults are ``fraction = 0.1`` (10% of the
queries) and ``min_queries = 2`` (a sample in a single top-k list is specific to that query, never
general, even when ``Q < 20``).

:func:`measure_bias` runs every measurement for a loaded :class:`~retrac.query.attribution.Attributor`
and its indexes; ``retrac.report.bias`` renders the result as an HTML page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrac.errors import ConfigError, DataError
from retrac.query.attribution import DEFAULT_TOP_K

DEFAULT_FRACTION = 0.1
DEFAULT_MIN_QUERIES = 2
DEFAULT_BINS = 20

__all__ = [
    "BiasMeasurement",
    "NormTimestepProfile",
    "TopkBias",
    "general_threshold",
    "influence_spearman",
    "load_outlier_ids",
    "measure_bias",
    "norm_timestep_profile",
    "norm_timestep_profiles",
    "sample_event_norms",
    "sample_event_timesteps",
    "score_matrix",
    "spearman",
    "topk_bias",
    "topk_frequency",
]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays (average ranks for ties); ``nan`` if either is constant."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"spearman needs arrays of one length; got {x.size} and {y.size}.")
    if x.size < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


# ---------------------------------------------------------------------- gradient norm vs timestep
@dataclass
class NormTimestepProfile:
    """Gradient norm against timestep at one checkpoint.

    Attributes:
        checkpoint: the checkpoint index ``k``.
        bin_edges: ``(B + 1,)`` timestep bin edges over ``[0, T)``; bin ``b`` is ``[edges[b], edges[b+1])``.
        count: ``(B,)`` events per bin.
        mean: ``(B,)`` mean ``n_k(z, e)`` of the events in each bin (``nan`` for an empty bin).
        std: ``(B,)`` standard deviation over the events of each bin (``nan`` for an empty bin).
        q10, q90: ``(B,)`` 10th and 90th percentiles per bin (``nan`` for an empty bin).
        spearman: Spearman correlation of ``n_k(z, e)`` and ``t`` over all valid events.
        max_over_min: largest over smallest non-empty bin mean (how strongly the norm depends on ``t``).
        num_events: valid events used.
    """

    checkpoint: int
    bin_edges: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    q10: np.ndarray
    q90: np.ndarray
    spearman: float
    max_over_min: float
    num_events: int

    @property
    def bin_centers(self) -> np.ndarray:
        return (self.bin_edges[:-1] + self.bin_edges[1:]) / 2

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "bin_edges": self.bin_edges.tolist(),
            "count": self.count.tolist(),
            "mean": _nan_list(self.mean),
            "std": _nan_list(self.std),
            "spearman": _nan_float(self.spearman),
            "max_over_min": _nan_float(self.max_over_min),
            "num_events": self.num_events,
        }


def norm_timestep_profile(
    norms: np.ndarray,
    timesteps: np.ndarray,
    num_train_timesteps: int,
    valid: np.ndarray | None = None,
    num_bins: int = DEFAULT_BINS,
    checkpoint: int = 0,
) -> NormTimestepProfile:
    """Bin the events of one checkpoint by timestep and summarise their gradient norms.

    Args:
        norms: ``(N, S)`` ``n_k(z, e)``.
        timesteps: ``(N, S)`` the event timesteps (any value in padding slots).
        num_train_timesteps: ``T``; the bins split ``[0, T)`` into ``num_bins`` equal parts
            (edges ``floor(b T / B)``).
        valid: ``(N, S)`` bool, False for padding slots (default: all valid).
        num_bins: ``B``.
        checkpoint: recorded in the result.
    """
    norms, timesteps = np.asarray(norms, dtype=np.float64), np.asarray(timesteps)
    if norms.shape != timesteps.shape:
        raise ConfigError(f"norms {norms.shape} and timesteps {timesteps.shape} must have one shape.")
    if not 1 <= num_bins <= num_train_timesteps:
        raise ConfigError(f"num_bins={num_bins} must lie in [1, T={num_train_timesteps}].")
    mask = np.ones(norms.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    n, t = norms[mask], timesteps[mask].astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= num_train_timesteps):
        raise ConfigError(f"timesteps must lie in [0, {num_train_timesteps}); got {t.min()}..{t.max()}.")
    edges = (np.arange(num_bins + 1) * num_train_timesteps) // num_bins
    which = np.searchsorted(edges, t, side="right") - 1
    stats = {name: np.full(num_bins, np.nan) for name in ("mean", "std", "q10", "q90")}
    count = np.zeros(num_bins, dtype=np.int64)
    for b in range(num_bins):
        values = n[which == b]
        count[b] = values.size
        if values.size:
            stats["mean"][b], stats["std"][b] = values.mean(), values.std()
            stats["q10"][b], stats["q90"][b] = np.percentile(values, [10, 90])
    filled = stats["mean"][count > 0]
    ratio = float(filled.max() / filled.min()) if filled.size and filled.min() > 0 else float("nan")
    return NormTimestepProfile(
        checkpoint=checkpoint,
        bin_edges=edges,
        count=count,
        spearman=spearman(n, t),
        max_over_min=ratio,
        num_events=int(n.size),
        **stats,
    )


def norm_timestep_profiles(store, num_bins: int = DEFAULT_BINS) -> list[NormTimestepProfile]:
    """:func:`norm_timestep_profile` of every checkpoint of a feature store.

    Args:
        store: a :class:`~retrac.indexer.FeatureStore`, or any object with ``num_checkpoints``,
            ``norms(k)``, ``timesteps(k)``, ``valid(k)`` (``(N, S)`` arrays) and
            ``attrs["task"]["num_train_timesteps"]``.
    """
    T = int(store.attrs["task"]["num_train_timesteps"])
    return [
        norm_timestep_profile(store.norms(k), store.timesteps(k), T, store.valid(k), num_bins, k)
        for k in range(store.num_checkpoints)
    ]


def _per_sample_mean(store, array: str) -> np.ndarray:
    """Mean over checkpoints and valid events of ``store.<array>(k)``: ``(N,)`` float64."""
    total, count = None, None
    for k in range(store.num_checkpoints):
        values = np.asarray(getattr(store, array)(k), dtype=np.float64)
        valid = np.asarray(store.valid(k), dtype=bool)
        part, n = np.where(valid, values, 0.0).sum(axis=1), valid.sum(axis=1)
        total, count = (part, n) if total is None else (total + part, count + n)
    return total / np.maximum(count, 1)


def sample_event_norms(store) -> np.ndarray:
    """``(N,)`` mean gradient norm ``n_k(z, e)`` of each sample's training events (over ``k`` and ``e``)."""
    return _per_sample_mean(store, "norms")


def sample_event_timesteps(store) -> np.ndarray:
    """``(N,)`` mean timestep of each sample's training events (over checkpoints and events)."""
    return _per_sample_mean(store, "timesteps")


# ---------------------------------------------------------------------- top-k statistics
def general_threshold(
    num_queries: int, fraction: float = DEFAULT_FRACTION, min_queries: int = DEFAULT_MIN_QUERIES
) -> int:
    """Queries a sample's top-k appearances must reach to count as generally influential:
    ``max(min_queries, ceil(fraction * num_queries))``."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction} must lie in (0, 1], e.g. 0.1 for 10% of the queries.")
    if min_queries < 1:
        raise ConfigError(f"min_queries={min_queries} must be at least 1.")
    return max(int(min_queries), math.ceil(fraction * num_queries - 1e-9))


def topk_frequency(indices: np.ndarray, num_train: int) -> np.ndarray:
    """``(N,)`` int64: in how many queries' top-k lists each training row appears (once per list).

    Args:
        indices: ``(n_query, k)`` training rows; negative entries (FAISS's "no result") are ignored.
        num_train: ``N``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 2:
        raise ConfigError(f"indices must be (n_query, k); got shape {indices.shape}.")
    if indices.size and indices.max() >= num_train:
        raise ConfigError(f"indices hold row {indices.max()} but num_train={num_train}.")
    frequency = np.zeros(num_train, dtype=np.int64)
    for row in indices:
        frequency[np.unique(row[row >= 0])] += 1
    return frequency


@dataclass
class TopkBias:
    """How concentrated the top-k lists of ``Q`` queries are.

    Attributes:
        num_queries: ``Q``.
        k: results per query.
        num_train: ``N``.
        unique: distinct training samples over all top-k lists (at most ``min(N, Q k)``; higher =
            attributions more specific to each query).
        fraction, min_queries: the parameters of the threshold.
        threshold: queries needed to be generally influential (:func:`general_threshold`).
        general_influential: samples in the top-k of at least ``threshold`` queries.
        general_rows: those samples' rows, most frequent first.
        frequency: ``(N,)`` top-k appearances per training sample.
        max_frequency_share: the most frequent sample's appearances / ``Q``.
        num_outliers: planted outliers among the training rows (0: none given).
        outlier_share: planted outliers / top-k slots of ordinary (non-outlier) queries; ``nan``
            when no outliers or no ordinary queries were given.
        outlier_base_rate: ``num_outliers / N``, the share under random top-k lists.
        outlier_query_share: ordinary queries with at least one planted outlier in their top-k.
        general_outliers: planted outliers that are generally influential.
    """

    num_queries: int
    k: int
    num_train: int
    unique: int
    fraction: float
    min_queries: int
    threshold: int
    general_influential: int
    general_rows: list[int]
    frequency: np.ndarray = field(repr=False)
    max_frequency_share: float
    num_outliers: int = 0
    outlier_share: float = float("nan")
    outlier_base_rate: float = float("nan")
    outlier_query_share: float = float("nan")
    general_outliers: int = 0

    def to_dict(self) -> dict:
        return {
            "num_queries": self.num_queries,
            "k": self.k,
            "num_train": self.num_train,
            "unique": self.unique,
            "fraction": self.fraction,
            "min_queries": self.min_queries,
            "threshold": self.threshold,
            "general_influential": self.general_influential,
            "general_rows": self.general_rows,
            "max_frequency_share": self.max_frequency_share,
            "num_outliers": self.num_outliers,
            "outlier_share": _nan_float(self.outlier_share),
            "outlier_base_rate": _nan_float(self.outlier_base_rate),
            "outlier_query_share": _nan_float(self.outlier_query_share),
            "general_outliers": self.general_outliers,
        }


def topk_bias(
    indices: np.ndarray,
    num_train: int,
    outlier_rows: Sequence[int] = (),
    query_is_outlier: Sequence[bool] | None = None,
    fraction: float = DEFAULT_FRACTION,
    min_queries: int = DEFAULT_MIN_QUERIES,
) -> TopkBias:
    """Distinct, generally influential and planted-outlier counts of a top-k matrix.

    Args:
        indices: ``(n_query, k)`` training rows of the top-k proponents of each query.
        num_train: ``N``, the number of training samples.
        outlier_rows: training rows of the planted outliers.
        query_is_outlier: ``(n_query,)`` True for queries that are outliers themselves; they are left
            out of the outlier share (default: every query is ordinary).
        fraction, min_queries: the generally-influential threshold (:func:`general_threshold`).
    """
    indices = np.asarray(indices, dtype=np.int64)
    frequency = topk_frequency(indices, num_train)
    q, k = indices.shape
    threshold = general_threshold(q, fraction, min_queries)
    general = np.flatnonzero(frequency >= threshold)
    general = general[np.argsort(-frequency[general], kind="stable")]
    outliers = np.zeros(num_train, dtype=bool)
    outliers[np.asarray(list(outlier_rows), dtype=np.int64)] = True
    result = TopkBias(
        num_queries=q,
        k=k,
        num_train=num_train,
        unique=int((frequency > 0).sum()),
        fraction=float(fraction),
        min_queries=int(min_queries),
        threshold=threshold,
        general_influential=int(general.size),
        general_rows=general.tolist(),
        frequency=frequency,
        max_frequency_share=float(frequency.max() / q) if q else float("nan"),
        num_outliers=int(outliers.sum()),
        general_outliers=int(outliers[general].sum()),
    )
    ordinary = np.ones(q, dtype=bool) if query_is_outlier is None else ~np.asarray(query_is_outlier, bool)
    if result.num_outliers and ordinary.any():
        rows = indices[ordinary]
        hit = np.where(rows >= 0, outliers[np.maximum(rows, 0)], False)
        result.outlier_share = float(hit.sum() / (rows >= 0).sum())
        result.outlier_base_rate = result.num_outliers / num_train
        result.outlier_query_share = float(hit.any(axis=1).mean())
    return result


def influence_spearman(scores: np.ndarray, per_sample: np.ndarray) -> float:
    """Spearman correlation between each sample's mean influence over the queries and ``per_sample``.

    Args:
        scores: ``(n_query, N)`` influence scores of every training sample for every query.
        per_sample: ``(N,)`` e.g. :func:`sample_event_norms`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ConfigError(f"scores must be (n_query, N); got shape {scores.shape}.")
    return spearman(scores.mean(axis=0), per_sample)


# ---------------------------------------------------------------------- on an attributor
def _vector_kind(method: str) -> str:
    """The train-vector kind of a method name (the kernel only changes the query side)."""
    return "retrac" if method.startswith("retrac") else "tracin"


def score_matrix(
    attributor, images, method: str, class_labels=None, block_rows: int = 4096, prompts=None
) -> np.ndarray:
    """Exact scores ``I(z, z') = <U(z), Q(z')>`` of every training sample for every query.

    ``prompts`` condition a text model's queries (one per image, or one ``str`` for all).

    Streams the store's train vectors in blocks, so the result ``(n_query, N)`` float32 is the only
    large array; positive = proponent, as in :class:`~retrac.query.attribution.AttributionResult`.
    """
    from retrac.query.attribution import train_vector_blocks
    from retrac.query.vectors import Method

    store = attributor.feature_store
    queries = attributor.query_vectors(images, method, class_labels, prompts).astype(np.float32)
    kind = Method(_vector_kind(method), _vector_kind(method))
    blocks = [queries @ block.T for block in train_vector_blocks(store, kind, block_rows)]
    return np.concatenate(blocks, axis=1)


@dataclass
class BiasMeasurement:
    """Every bias measurement of one store, its indexes and a set of queries.

    Attributes:
        profiles: :class:`NormTimestepProfile` per checkpoint.
        norm_timestep_spearman: mean over checkpoints of the per-checkpoint Spearman of norm and timestep.
        results: method -> :class:`~retrac.query.attribution.AttributionResult` (top-k proponents).
        topk: method -> :class:`TopkBias`.
        influence_norm_spearman: method -> Spearman(mean influence over queries, :func:`sample_event_norms`).
        influence_timestep_spearman: method -> Spearman(mean influence, :func:`sample_event_timesteps`).
        outlier_ids: planted outlier ids found among the training ids.
    """

    profiles: list[NormTimestepProfile]
    norm_timestep_spearman: float
    results: dict
    topk: dict[str, TopkBias]
    influence_norm_spearman: dict[str, float]
    influence_timestep_spearman: dict[str, float]
    outlier_ids: list[str]

    def to_dict(self) -> dict:
        """The ``retrac.report`` document (docs/design.md section 10): what ``bias.json`` holds."""
        from retrac.schema import REPORT_SCHEMA, header

        return {
            **header(REPORT_SCHEMA),
            "norm_timestep_spearman": _nan_float(self.norm_timestep_spearman),
            "norm_max_over_min": [_nan_float(p.max_over_min) for p in self.profiles],
            "topk": {m: t.to_dict() for m, t in self.topk.items()},
            "influence_norm_spearman": {m: _nan_float(v) for m, v in self.influence_norm_spearman.items()},
            "influence_timestep_spearman": {
                m: _nan_float(v) for m, v in self.influence_timestep_spearman.items()
            },
            "num_outliers": len(self.outlier_ids),
        }


def measure_bias(
    attributor,
    images,
    k: int = DEFAULT_TOP_K,
    methods: Sequence[str] | None = None,
    outlier_ids: Sequence[str] = (),
    query_is_outlier: Sequence[bool] | None = None,
    fraction: float = DEFAULT_FRACTION,
    min_queries: int = DEFAULT_MIN_QUERIES,
    num_bins: int = DEFAULT_BINS,
    class_labels=None,
    prompts=None,
) -> BiasMeasurement:
    """Run every measurement for the queries ``images`` against the attributor's indexes.

    Args:
        attributor: a loaded :class:`~retrac.query.attribution.Attributor` (e.g. TracIn + ReTrac indexes).
        images: ``(n_query, C, H, W)`` query images in ``[-1, 1]``.
        k: top-k proponents per query.
        methods: which loaded methods (default all).
        outlier_ids: ids of planted outlier training samples (ids not in the store are ignored).
        query_is_outlier: ``(n_query,)`` marks queries left out of the outlier share.
        fraction, min_queries: the generally-influential threshold (:func:`general_threshold`).
        num_bins: timestep bins of the norm profiles.
        class_labels: ``(n_query,)`` labels for a class-conditional model.
        prompts: for a text model, one prompt per query (or one ``str`` for all).
    """
    store = attributor.feature_store
    methods = list(methods or attributor.methods)
    row_of = {sid: r for r, sid in enumerate(store.ids)}
    outliers = [sid for sid in outlier_ids if sid in row_of]
    outlier_rows = [row_of[sid] for sid in outliers]
    profiles = norm_timestep_profiles(store, num_bins)
    norms, timesteps = sample_event_norms(store), sample_event_timesteps(store)
    results, topk, by_norm, by_timestep = {}, {}, {}, {}
    for method in methods:
        results[method] = attributor.attribute(images, k, method, class_labels=class_labels, prompts=prompts)
        topk[method] = topk_bias(
            results[method].indices, store.num_samples, outlier_rows, query_is_outlier, fraction, min_queries
        )
        scores = score_matrix(attributor, images, method, class_labels, prompts=prompts)
        by_norm[method] = influence_spearman(scores, norms)
        by_timestep[method] = influence_spearman(scores, timesteps)
    per_checkpoint = [p.spearman for p in profiles if not math.isnan(p.spearman)]
    return BiasMeasurement(
        profiles=profiles,
        norm_timestep_spearman=float(np.mean(per_checkpoint)) if per_checkpoint else float("nan"),
        results=results,
        topk=topk,
        influence_norm_spearman=by_norm,
        influence_timestep_spearman=by_timestep,
        outlier_ids=outliers,
    )


def _nan_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def _nan_list(values: np.ndarray) -> list:
    return [_nan_float(v) for v in np.asarray(values, dtype=np.float64)]


def load_outlier_ids(path: str | Path) -> list[str]:
    """Planted outlier ids from a file: the demo's ``planted.json`` (``{"outliers": [...]}``), a JSON
    list of ids, or a text file with one id per line.

    Raises:
        DataError: the file is missing or holds none of these.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"outlier file {str(path)!r} does not exist; give planted.json or a file of ids.")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"outlier file {str(path)!r} is not valid JSON ({exc}).") from exc
        ids = record.get("outliers") if isinstance(record, dict) else record
        if not isinstance(ids, list):
            raise DataError(
                f"outlier file {str(path)!r} holds neither a list of ids nor an object with key 'outliers'."
            )
        return [str(i) for i in ids]
    return [line.strip() for line in text.splitlines() if line.strip()]
