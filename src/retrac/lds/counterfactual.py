"""The counterfactual check: remove a test sample's top-k proponents, retrain, measure its loss.

For each test sample ``z'``: train on the whole set less the ``k`` training samples with the largest
scores (its proponents), and on the whole set less ``k`` random samples; the loss change on ``z'``
against the model trained on everything should be larger for the proponents if the scores mean what
they say (Hammoudeh and Lowd; Journey-TRAK and D-TRAK report this check for diffusion models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from retrac.errors import ConfigError, DataError
from retrac.events import derive_seed
from retrac.lds.run import LDSRun, rows_sha256


@dataclass
class CounterfactualResult:
    """Loss changes of each test sample after removing its top-k proponents or k random samples.

    Attributes:
        name: the scoring whose proponents were removed.
        k: samples removed per test sample.
        loss_full: ``(n,)`` mean loss on the model trained on every sample.
        loss_without_top: ``(n,)`` mean loss after removing the top-``k`` proponents.
        loss_without_random: ``(n,)`` mean loss after removing ``k`` random samples.
    """

    name: str
    k: int
    loss_full: np.ndarray
    loss_without_top: np.ndarray
    loss_without_random: np.ndarray

    @property
    def delta_top(self) -> np.ndarray:
        return self.loss_without_top - self.loss_full

    @property
    def delta_random(self) -> np.ndarray:
        return self.loss_without_random - self.loss_full

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "k": self.k,
            "n_test": int(self.loss_full.size),
            "mean_delta_top": float(self.delta_top.mean()),
            "mean_delta_random": float(self.delta_random.mean()),
            "share_top_above_random": float((self.delta_top > self.delta_random).mean()),
            "loss_full": self.loss_full.tolist(),
            "loss_without_top": self.loss_without_top.tolist(),
            "loss_without_random": self.loss_without_random.tolist(),
        }


def removal_model_name(removed: np.ndarray) -> str:
    """``without-HASH``: the model trained on every row but ``removed`` (shared by equal removals)."""
    return f"without-{rows_sha256(removed)[:16]}"


def counterfactual_check(
    run: LDSRun,
    scores: np.ndarray,
    images: Tensor,
    k: int,
    name: str = "scores",
    class_labels: Tensor | None = None,
) -> CounterfactualResult:
    """Remove each test image's top-``k`` proponents under ``scores`` (and ``k`` random samples), retrain.

    Models are trained through ``run`` (cached in its folder and reused: a random removal is shared by
    every scoring, a removal set by every scoring that picks it); random removals are seeded by the
    run's seed, the test row and ``k``.

    Args:
        run: the LDS run (its training function and data).
        scores: ``(n, N)`` scores of the ``n`` test images, positive = proponent.
        images: ``(n, C, H, W)`` the test images.
        k: samples removed per test image, ``1 <= k < N``.

    Returns:
        A :class:`CounterfactualResult`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    num_train = run.num_samples
    if scores.ndim != 2 or scores.shape != (len(images), num_train):
        raise DataError(
            f"scores have shape {scores.shape}; expected (n_test, N) = {(len(images), num_train)}."
        )
    if not 1 <= k < num_train:
        raise ConfigError(f"k={k} must lie in [1, {num_train}) (the number of training samples).")
    everything = np.arange(num_train)
    full, top, rand = [], [], []
    for i in range(len(images)):
        image = images[i : i + 1]
        labels = None if class_labels is None else class_labels[i : i + 1]
        full.append(run.model_losses("full", everything, image, labels).mean())
        proponents = np.argsort(-scores[i], kind="stable")[:k]
        rng = np.random.default_rng(derive_seed("retrac-lds-counterfactual", run.config.seed, i, k))
        random_rows = rng.choice(num_train, k, replace=False)
        for removed, out in ((proponents, top), (random_rows, rand)):
            kept = np.setdiff1d(everything, removed)
            out.append(run.model_losses(removal_model_name(removed), kept, image, labels).mean())
    return CounterfactualResult(name, k, np.array(full), np.array(top), np.array(rand))
