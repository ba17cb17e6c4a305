"""The linear datamodeling score (LDS) of a score matrix, its bootstrap interval, and the baselines.

LDS (Park et al., TRAK, ICML 2023; D-TRAK, Journey-TRAK and DAS use it for diffusion models): a
scoring ``tau(z', z)`` predicts the effect of training on a subset ``S`` on a test sample ``z'`` as the
sum of the scores of its members, ``g(S; z') = sum_{z in S} tau(z', z)``. Retrain on ``M`` random
subsets, measure the test loss ``L(z'; theta_S)`` of each, and take the Spearman rank correlation
across the subsets of ``g(S; z')`` with ``-L(z'; theta_S)``, per test sample, averaged over test samples.

**Sign**: retrac's scores are positive for proponents, training samples whose gradient step lowers
the test loss, so a subset with a larger predicted effect should have a *lower* loss: the
prediction is correlated with **minus** the loss, and a good scoring has a positive LDS.

**Test-specific LDS** (``centered=True``, a diagnostic): the losses of one retrained model share a
part common to every test sample (some subsets make a better model for all of them), and a
scoring's common part (its mean over test samples, a per-training-sample "quality") can match it by
chance; that part moves the LDS of every test sample together, so averaging over test samples does
not remove it and the bootstrap interval does not show it. Centering both the predicted effects and
the losses of each subset over the test samples (``g(S; z') - mean_z'' g(S; z'')`` against
``-(L(z'; theta_S) - mean_z'' L(z''; theta_S))``) keeps only what distinguishes one test sample from
another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from torch import Tensor

from retrac.errors import ConfigError, DataError
from retrac.events import derive_seed

PIXEL_KINDS = ("neg_l2", "cosine")
DEFAULT_BOOTSTRAP = 1000
CONFIDENCE_LEVEL = 0.95


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y``.

    Args:
        x, y: ``(M, n)``; correlated along axis 0 (ties take average ranks).

    Returns:
        ``(n,)`` float64; NaN where a column is constant (the correlation is undefined).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise DataError(f"cannot correlate arrays of shapes {x.shape} and {y.shape}; give two (M, n) arrays.")
    rx = rankdata(x, axis=0) - (x.shape[0] + 1) / 2
    ry = rankdata(y, axis=0) - (y.shape[0] + 1) / 2
    denominator = np.sqrt((rx * rx).sum(axis=0) * (ry * ry).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=0) / denominator, np.nan)


def linear_datamodeling_scores(
    scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, centered: bool = False
) -> np.ndarray:
    """The LDS of each test sample.

    Args:
        scores: ``(n_test, N)`` scores ``tau(z', z)``, positive = proponent (lowers the test loss).
        masks: ``(M, N)`` bool, subset membership of each training row.
        losses: ``(M, n_test)`` the test losses of the model retrained on each subset.
        centered: the test-specific LDS: remove each subset's mean over the test samples from the
            predicted effects and from the losses first (needs at least two test samples).

    Returns:
        ``(n_test,)`` Spearman correlation across subsets of ``g(S; z') = sum_{z in S} tau(z', z)``
        with ``-L(z'; theta_S)``; NaN for a test sample whose predictions are all equal.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    losses = np.asarray(losses, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise DataError(
            f"scores {scores.shape} and subset masks {masks.shape} must be (n_test, N) and (M, N) over the same N "
            "training samples."
        )
    if losses.shape != (masks.shape[0], scores.shape[0]):
        raise DataError(
            f"losses have shape {losses.shape}, expected (M, n_test) = {(masks.shape[0], scores.shape[0])}."
        )
    if not np.isfinite(scores).all():
        row = int(np.argwhere(~np.isfinite(scores))[0, 0])
        raise DataError(f"scores of test sample {row} are not finite; recompute them.")
    predicted = masks.astype(np.float64) @ scores.T  # g(S_m; z'_i) = sum_{z in S_m} tau(z'_i, z), (M, n_test)
    actual = -losses  # a proponent lowers the loss: correlate with -L
    if centered:
        if scores.shape[0] < 2:
            raise DataError("the test-specific (centered) LDS needs at least two test samples.")
        predicted = predicted - predicted.mean(axis=1, keepdims=True)  # each subset's common effect
        actual = actual - actual.mean(axis=1, keepdims=True)
    return spearman_columns(predicted, actual)


def bootstrap_interval(
    values: np.ndarray, num_resamples: int = DEFAULT_BOOTSTRAP, level: float = CONFIDENCE_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling its entries, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise DataError("bootstrap needs a non-empty one-dimensional array of per-test values.")
    rng = np.random.default_rng(derive_seed("retrac-lds-bootstrap", seed))
    means = values[rng.integers(0, values.size, (num_resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass
class LDSScore:
    """The LDS of one scoring on a set of test samples.

    Attributes:
        name: the scoring (a method, a baseline).
        lds: mean over test samples of the per-test Spearman correlation (positive = good).
        ci_low, ci_high: 95% percentile bootstrap interval of ``lds`` over test samples.
        per_test: ``(n_test,)`` per-test correlations (NaN where undefined).
        num_valid: test samples with a defined correlation (the mean is over these).
        num_subsets: ``M``.
        centered: whether this is the test-specific LDS.
    """

    name: str
    lds: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray
    num_valid: int
    num_subsets: int
    centered: bool = False

    def to_dict(self, per_test: bool = False) -> dict:
        record = {
            "name": self.name,
            "lds": self.lds,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n_test": int(self.per_test.size),
            "n_valid": self.num_valid,
            "n_subsets": self.num_subsets,
            "centered": self.centered,
        }
        if per_test:
            record["per_test"] = [None if np.isnan(v) else float(v) for v in self.per_test]
        return record


def lds_score(
    name: str,
    scores: np.ndarray,
    masks: np.ndarray,
    losses: np.ndarray,
    rows: Sequence[int] | np.ndarray | None = None,
    num_resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    centered: bool = False,
) -> LDSScore:
    """The LDS of ``scores`` with its bootstrap interval, on the test rows ``rows`` (default all).

    With ``rows``, only those test samples are used (``centered`` centers over them alone, so a
    validation and a report split stay independent).

    Raises:
        DataError: no test sample has a defined correlation (every prediction constant).
    """
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        scores, losses = np.asarray(scores)[rows], np.asarray(losses)[:, rows]
    per_test = linear_datamodeling_scores(scores, masks, losses, centered)
    valid = per_test[np.isfinite(per_test)]
    if valid.size == 0:
        raise DataError(f"scoring {name!r} predicts the same effect for every subset on every test sample.")
    low, high = bootstrap_interval(valid, num_resamples, seed=seed)
    return LDSScore(
        name, float(valid.mean()), low, high, per_test, int(valid.size), int(masks.shape[0]), centered
    )


def lds_table(
    scorings: Mapping[str, np.ndarray],
    masks: np.ndarray,
    losses: np.ndarray,
    rows: Sequence[int] | np.ndarray | None = None,
    num_resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    centered: bool = False,
) -> list[LDSScore]:
    """:func:`lds_score` of every scoring, in the given order."""
    return [lds_score(n, s, masks, losses, rows, num_resamples, seed, centered) for n, s in scorings.items()]


def format_table(results: Sequence[LDSScore], centered: Sequence[LDSScore] | None = None) -> str:
    """A Markdown table: scoring, LDS and its 95% bootstrap interval, test samples, subsets; with
    ``centered``, the test-specific LDS of the same scorings as two more columns."""
    extra = " test-specific LDS | 95% CI |" if centered else ""
    lines = [
        f"| scoring | LDS | 95% CI |{extra} n_test | M |",
        "|---|---:|---|" + ("---:|---|" if centered else "") + "---:|---:|",
    ]
    for i, r in enumerate(results):
        cells = f" {r.lds:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] |"
        if centered:
            c = centered[i]
            cells += f" {c.lds:.3f} | [{c.ci_low:.3f}, {c.ci_high:.3f}] |"
        lines.append(f"| {r.name} |{cells} {r.num_valid} | {r.num_subsets} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scorings: baselines and attribution indexes as dense (n_test, N) matrices.
# ---------------------------------------------------------------------------------------------


def pixel_scores(test_images: Tensor, train_images: Tensor, kind: str = "neg_l2") -> np.ndarray:
    """Pixel-space similarity of each test image to each training image, ``(n_test, N)`` float64.

    Args:
        kind: ``neg_l2``: minus the Euclidean distance ``-||x' - x||``; ``cosine``: the cosine of the
            flattened images (pixels in ``[-1, 1]``, not centred).
    """
    if kind not in PIXEL_KINDS:
        raise ConfigError(f"pixel similarity {kind!r} is unknown; choose one of {', '.join(PIXEL_KINDS)}.")
    a = np.asarray(test_images, dtype=np.float64).reshape(len(test_images), -1)
    b = np.asarray(train_images, dtype=np.float64).reshape(len(train_images), -1)
    if a.shape[1] != b.shape[1]:
        raise DataError(
            f"test images have {a.shape[1]} pixels, training images {b.shape[1]}; give one shape."
        )
    if kind == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return -np.sqrt(np.maximum(squared, 0.0))


def random_scores(num_test: int, num_train: int, seed: int = 0) -> np.ndarray:
    """Standard normal scores ``(num_test, num_train)``, seeded: the chance baseline (LDS about 0)."""
    rng = np.random.default_rng(derive_seed("retrac-lds-random", seed))
    return rng.standard_normal((num_test, num_train))


def attributor_scores(
    attributor, images: Tensor, class_labels: Tensor | None = None, methods: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Scores of every training sample for each query, from the indexes an ``Attributor`` has loaded.

    Each index is searched for all ``N`` training rows (exact with a ``flat`` index) and the scores
    are put back in training-row order; the query gradients are computed once for all methods.

    Args:
        attributor: a :class:`~retrac.query.attribution.Attributor`.
        images: ``(n, C, H, W)`` test images.
        methods: the loaded methods to score (default all).

    Returns:
        ``{method: (n, N) float64}``; ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>``, positive = proponent.

    Raises:
        ConfigError: an approximate index that does not return every training row; build it flat.
    """
    num_train = len(attributor.train_ids)
    out = {}
    for method in methods or attributor.methods:
        result = attributor.attribute(images, k=num_train, method=method, class_labels=class_labels)
        if not (np.sort(result.indices, axis=1) == np.arange(num_train)).all():
            raise ConfigError(
                f"the {method} index did not return every training row (approximate search); build it with "
                "index='flat' (retrac build --kind flat) to score every training sample."
            )
        dense = np.empty((result.indices.shape[0], num_train), dtype=np.float64)
        np.put_along_axis(dense, result.indices, result.scores.astype(np.float64), axis=1)
        out[method] = dense
    return out


def index_scores(
    indexes: Sequence[str | Path] | str | Path,
    images: Tensor,
    *,
    store: str | Path | None = None,
    query_events=None,
    class_labels: Tensor | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """:func:`attributor_scores` of index folders (``index="flat"``), one ``Attributor`` per store.

    Indexes built from one store share its query-gradient pass; indexes of different stores (a
    ``loss`` store for tracin / retrac / trak, a ``sqnorm`` store for dtrak) are grouped by the
    store their manifest records.

    Args:
        indexes: index folders (``build_attribution_index(..., index="flat")``), one per method.
        images: ``(n, C, H, W)`` test images.
        store: the store of every index (default: the one each manifest records).
        query_events: :class:`~retrac.query.attribution.QueryEvents` (default 10 x 2).

    Returns:
        ``{method: (n, N) float64}``, positive = proponent.

    Raises:
        ConfigError: two indexes of one method name.
    """
    from retrac._io import read_json
    from retrac.query.attribution import Attributor, QueryEvents

    folders = [indexes] if isinstance(indexes, (str, Path)) else list(indexes)
    groups: dict[str, list] = {}
    for folder in folders:
        manifest = read_json(Path(folder) / "manifest.json", "index manifest", DataError)
        key = str(store) if store is not None else str(manifest.get("store", {}).get("path"))
        groups.setdefault(key, []).append(folder)
    out: dict[str, np.ndarray] = {}
    for group in groups.values():
        attributor = Attributor(
            group, store=store, query_events=query_events or QueryEvents(), device=device, progress=progress
        )
        for method, scores in attributor_scores(attributor, images, class_labels).items():
            if method in out:
                raise ConfigError(f"two indexes of method {method!r}; give one index per method.")
            out[method] = scores
    return out
