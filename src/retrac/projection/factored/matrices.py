"""The factored projector's seeded matrices: per-layer ``A`` and ``B`` (stage 1) and the second stage.

Every matrix is generated on the CPU from a seed derived from the projector's seed (and, for ``A``
and ``B``, the module name), so every device and every process sees the same ``P_k``
(docs/design.md section 1). Each has ``E ||M v||^2 = ||v||^2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retrac.events import derive_seed
from retrac.projection.factored.planning import NORM_KINDS, FactoredLayer

__all__ = ["SPARSE_NONZEROS", "apply_second_stage", "build_matrices", "gaussian"]

SPARSE_NONZEROS = 4  # entries per input coordinate of the sparse second stage


def gaussian(seed: int, rows: int, cols: int, *parts: object) -> Tensor:
    """A ``(rows, cols)`` float32 Gaussian matrix scaled ``1 / sqrt(rows)``, seeded by ``(seed, *parts)``."""
    generator = torch.Generator().manual_seed(derive_seed("retrac-factored", seed, *parts))
    return torch.randn((rows, cols), generator=generator, dtype=torch.float32) / math.sqrt(rows)


def build_matrices(
    layers: list[FactoredLayer],
    seed: int,
    stage1_dim: int,
    dim: int,
    second_stage: str,
    device: torch.device,
) -> dict:
    """``A``, ``B`` per layer and the second stage, generated on the CPU and moved to ``device``.

    Args:
        layers: the planned layers (GroupNorm / LayerNorm layers get no matrices: they are kept whole).
        seed: the seed of ``P_k``.
        stage1_dim: ``D1``, the stage-1 size.
        dim: ``d``.
        second_stage: ``"sparse"``, ``"dense"`` or ``"none"``.
        device: where the matrices are used.

    Returns:
        ``{module name: (A or None, B or None)}`` (``None`` for an identity side) and, with a second
        stage, ``"stage2"``: the dense ``(D1, d)`` matrix, or for ``sparse`` the gather ``index``
        ``(d m,)`` and the ``signs`` ``(d, m)`` (see :func:`apply_second_stage`).
    """
    mats: dict = {}
    for layer in layers:
        if layer.kind in NORM_KINDS:
            continue
        a = None if layer.identity_in else gaussian(seed, layer.k_in, layer.in_dim, layer.module, "A")
        b = None if layer.identity_out else gaussian(seed, layer.k_out, layer.out_dim, layer.module, "B")
        mats[layer.module] = (
            None if a is None else a.to(device),
            None if b is None else b.to(device),
        )
    if second_stage == "dense":
        # columns generated in the (D1, d) layout, scaled 1/sqrt(d): E ||S v||^2 = ||v||^2
        generator = torch.Generator().manual_seed(derive_seed("retrac-factored-stage2", seed))
        stage2 = torch.randn((stage1_dim, dim), generator=generator) / math.sqrt(dim)
        mats["stage2"] = stage2.to(device)
    elif second_stage == "sparse":
        # S (d x D1) with exactly s entries +-1/sqrt(s) per column, at random rows (a repeated row
        # adds up), stored by row for a gather: D1 s slots (s per input coordinate) dealt out by a
        # random permutation into d rows of m = ceil(D1 s / d) slots; spare slots have sign 0.
        # A gather and a sum give the same bits on every device (no atomics, no sparse kernels).
        generator = torch.Generator().manual_seed(derive_seed("retrac-factored-stage2", seed))
        s = SPARSE_NONZEROS
        slots = stage1_dim * s
        per_row = -(-slots // dim)
        order = torch.randperm(dim * per_row, generator=generator).reshape(dim, per_row)
        signs = torch.randint(0, 2, (dim, per_row), generator=generator).float() * 2 - 1
        used = order < slots
        index = torch.where(used, order // s, 0)
        signs = torch.where(used, signs / math.sqrt(s), 0.0)
        mats["stage2"] = (index.reshape(-1).to(device), signs.to(device))
    return mats


def apply_second_stage(stage1: Tensor, mats: dict, second_stage: str, dim: int) -> Tensor:
    """``(R, D1)`` stage-1 features -> ``(R, d)`` features ``phi = S v`` (``v`` itself for ``"none"``)."""
    if second_stage == "none":
        return stage1
    if second_stage == "dense":
        return stage1 @ mats["stage2"]
    index, signs = mats["stage2"]  # phi_r = sum_j S_rj v_j over the m slots of row r
    gathered = stage1.T.contiguous().index_select(0, index)  # whole rows: (d m, R)
    summed = torch.bmm(signs[:, None, :], gathered.reshape(dim, -1, stage1.shape[0]))  # (d, 1, R)
    return summed[:, 0].T.contiguous()
