"""Independent references for the tests: the design formulas written out in numpy, not through retrac."""

from __future__ import annotations

import numpy as np


def scores_by_hand(store, query_features, kind: str) -> np.ndarray:
    """``(n_query, N)`` scores ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>`` in float64 numpy, written out
    from the formulas (docs/design.md section 1), not through retrac's vector code.

    Args:
        store: a feature store (``features(k)`` ``(N, S, d)``, ``norms(k)``, ``valid(k)``, ``weights``).
        query_features: per checkpoint ``(n_query, T_q, M, d)`` projected query gradients
            (``Attributor.query_features``).
        kind: ``"tracin"`` (means of ``phi``) or ``"retrac"`` (means of ``phi / n`` and ``g / ||g||``).
    """
    total = 0.0
    for k, (weight, query) in enumerate(zip(store.weights, query_features, strict=True)):
        phi = store.features(k).astype(np.float64)
        valid = store.valid(k).astype(np.float64)
        if kind == "retrac":
            phi = phi / np.where(valid > 0, store.norms(k), 1.0)[..., None]
        u = (phi * valid[..., None]).sum(axis=1) / valid.sum(axis=1)[:, None]  # mean over valid events
        g = query.astype(np.float64).mean(axis=2)  # mean over noise draws: (n_query, T_q, d)
        if kind == "retrac":
            g = g / np.linalg.norm(g, axis=2, keepdims=True)
        total = total + weight * g.mean(axis=1) @ u.T
    return total
