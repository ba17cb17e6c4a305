"""Pixel-space memorization metrics: the relative distance of Carlini et al. 2023 and the verdicts."""

from __future__ import annotations

import numpy as np

from retrac.audit.config import AuditConfig


def relative_distances(distances: np.ndarray) -> np.ndarray:
    """``r = d_1 / mean_j d_j`` per row of ``(n_query, n)`` ascending distances (Carlini et al. 2023).

    A row whose distances are all 0 cannot occur for distinct neighbours (n >= 2); it gives ``r = 0``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    mean = distances.mean(axis=1)
    return np.divide(distances[:, 0], mean, out=np.zeros_like(mean), where=mean > 0)


def verdicts(relative: np.ndarray, config: AuditConfig) -> list[str]:
    """``copy`` (``r < copy_threshold``), ``near`` (``r < near_threshold``) or ``novel`` per image."""
    return [
        "copy" if r < config.copy_threshold else "near" if r < config.near_threshold else "novel"
        for r in np.asarray(relative, dtype=np.float64)
    ]
