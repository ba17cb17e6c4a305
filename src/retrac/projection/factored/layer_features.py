"""Per-layer math of the factored projector: one layer's stage-1 block and squared gradient norm.

For a linear or convolutional layer with (unfolded) inputs ``x_p`` and output gradients ``g_p`` at
positions ``p``, the per-sample gradient is ``G = sum_p g_p x_p^T`` (``O x I``; a bias is a
ones-column appended to ``x``), and the layer's block is

    ``B G A^T = sum_p (B g_p)(A x_p)^T``          (LoGra: the Kronecker projection ``B kron A``)

from ``A x`` (taken in the forward pass by :func:`forward_features`; for a convolution, a
convolution with ``A`` as its kernel) and ``B g`` (in the backward pass, :func:`layer_features`),
without forming ``G``, unless forming it is cheaper (:func:`forms_gradient`), which gives the
same features up to float rounding and the exact norm for free. GroupNorm and LayerNorm
parameters are kept whole: ``sum_p g_p xhat_p`` and ``sum_p g_p`` per channel (``xhat`` the
normalised input before the affine map; channels on axis 1 for GroupNorm, last for LayerNorm).

Norms: ``||G||_F^2`` from the Gram form ``sum_{p,q} (g_p . g_q)(x_p . x_q)`` when positions are
few, else by forming ``G`` a few rows at a time (:func:`exact_sq_norm`); with ``norms="auto"``,
the unbiased stage-1 estimate ``||B G A^T||_F^2`` where the exact norm would cost more than the
projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrac.projection.factored.planning import FactoredLayer

__all__ = [
    "NORM_CHUNK_FLOATS",
    "conv_out_size",
    "exact_sq_norm",
    "formed_features",
    "forms_gradient",
    "forward_features",
    "layer_features",
    "unfold",
]

NORM_CHUNK_FLOATS = 16 << 20  # transient floats per row chunk when forming G for exact norms


def unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The convolution's input patches: ``(R, C, H, W)`` -> ``(R, C kh kw, L)``."""
    return F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (R, C kh kw, L)


def conv_out_size(module: nn.Conv2d, x: Tensor) -> tuple[int, int]:
    """``(H_out, W_out)`` of the convolution on ``x`` ``(R, C, H, W)``."""
    size = []
    for i in range(2):
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * module.padding[i] - span) // module.stride[i] + 1)
    return size[0], size[1]


def forms_gradient(layer: FactoredLayer, module: nn.Module, x: Tensor) -> bool:
    """Whether forming ``G`` and then ``B G A^T`` costs less than ``sum_p (B g_p)(A x_p)^T``.

    The two orders give the same features (up to float rounding); forming ``G`` wins when a side
    is small, e.g. a convolution with few output channels and a long unfolded input.
    """
    if layer.weight is None:
        return False
    if layer.kind == "linear":
        positions = x.numel() // max(1, x.shape[0] * module.in_features)
    else:
        h, w = conv_out_size(module, x)
        positions = h * w
    i, o, k_in, k_out = layer.in_dim, layer.out_dim, layer.k_in, layer.k_out
    factored = positions * (
        (0 if layer.identity_in else i * k_in) + (0 if layer.identity_out else o * k_out) + k_in * k_out
    )
    formed = positions * o * i + (0 if layer.identity_out else k_out * o * i)
    formed += 0 if layer.identity_in else k_out * i * k_in
    return formed < factored


def forward_features(layer: FactoredLayer, module: nn.Module, x: Tensor, mats: dict) -> Tensor | None:
    """``A x'`` per position: ``(R, Pos, k_in)`` (linear) or ``(R, k_in, L)`` (conv); norms' ``xhat``."""
    if layer.kind == "groupnorm":
        return F.group_norm(x, module.num_groups, eps=module.eps)  # xhat, (R, C, ...)
    if layer.kind == "layernorm":
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)  # xhat, (R, ..., C)
    a, _ = mats[layer.module]
    rows = x.shape[0]
    if forms_gradient(layer, module, x):
        return None  # G is formed in the backward pass instead (cheaper for this layer)
    if layer.kind == "linear":
        x = x.reshape(rows, -1, module.in_features)
        if layer.weight is None:
            return x.new_ones((rows, x.shape[1], 1))
        if a is None:
            return torch.cat([x, x.new_ones((*x.shape[:2], 1))], dim=2) if layer.bias else x
        fan_in = module.in_features
        return F.linear(x, a[:, :fan_in], a[:, fan_in] if layer.bias else None)
    # conv: A applied to every unfolded patch is a convolution with A as its kernel
    if layer.weight is None:
        h, w = conv_out_size(module, x)
        return x.new_ones((rows, 1, h * w))
    if a is None:
        patches = unfold(module, x)
        if layer.bias:
            patches = torch.cat([patches, patches.new_ones((rows, 1, patches.shape[2]))], dim=1)
        return patches
    fan_in = layer.in_dim - (1 if layer.bias else 0)
    kernel = a[:, :fan_in].reshape(layer.k_in, module.in_channels, *module.kernel_size)
    out = F.conv2d(
        x, kernel, a[:, fan_in] if layer.bias else None, module.stride, module.padding, module.dilation
    )
    return out.reshape(rows, layer.k_in, -1)


def layer_features(
    layer: FactoredLayer, module: nn.Module, x: Tensor, ax: Tensor | None, g: Tensor, mats: dict, norms: str
) -> tuple[Tensor, Tensor | None]:
    """The layer's stage-1 block ``(R, size)`` and, for exact norms, ``||G||_F^2`` per row ``(R,)``.

    Args:
        layer: the planned layer; ``module`` its module.
        x: the module's input ``(R, ...)`` from the forward pass.
        ax: what :func:`forward_features` returned for ``x`` (``None``: form ``G``).
        g: the gradient of the summed objective with respect to the module's output.
        mats: the projector's matrices (:func:`~retrac.projection.factored.matrices.build_matrices`).
        norms: ``"auto"``, ``"exact"`` or ``"projected"`` (no squared norm returned).
    """
    rows = x.shape[0]
    exact = norms != "projected"
    if layer.kind == "groupnorm":
        parts = []
        g = g.reshape(rows, layer.out_dim, -1)
        if layer.weight is not None:
            parts.append((g * ax.reshape(rows, layer.out_dim, -1)).sum(dim=2))  # sum_p g_p xhat_p
        if layer.bias is not None:
            parts.append(g.sum(dim=2))  # sum_p g_p
        block = torch.cat(parts, dim=1)
        return block, (block.pow(2).sum(dim=1) if exact else None)
    if layer.kind == "layernorm":
        parts = []
        g = g.reshape(rows, -1, layer.out_dim)
        if layer.weight is not None:
            parts.append((g * ax.reshape(rows, -1, layer.out_dim)).sum(dim=1))  # sum_p g_p xhat_p
        if layer.bias is not None:
            parts.append(g.sum(dim=1))  # sum_p g_p
        block = torch.cat(parts, dim=1)
        return block, (block.pow(2).sum(dim=1) if exact else None)
    if ax is None:  # G formed (see forms_gradient): its norm is exact at no extra cost
        block, sq = formed_features(layer, module, x, g, mats)
        return block, (sq if exact else None)
    _, b = mats[layer.module]
    if layer.kind == "linear":
        g = g.reshape(rows, -1, layer.out_dim)  # (R, Pos, O)
        bg = g if b is None else g @ b.T  # (R, Pos, k_out)
        block = torch.bmm(bg.transpose(1, 2), ax)  # sum_p (B g_p)(A x_p)^T: (R, k_out, k_in)
        g_pos = g
        x_pos = x.reshape(rows, -1, module.in_features)
    else:
        g = g.reshape(rows, layer.out_dim, -1)  # (R, O, L)
        bg = g if b is None else torch.matmul(b, g)  # (R, k_out, L)
        block = torch.bmm(bg, ax.transpose(1, 2))  # (R, k_out, k_in)
        g_pos = g.transpose(1, 2)  # (R, L, O)
        x_pos = None  # unfolded lazily (only for exact norms)
    block = block.reshape(rows, -1)
    if not exact:
        return block, None
    if layer.identity_in and layer.identity_out:
        return block, block.pow(2).sum(dim=1)  # the block is G itself
    if norms == "auto":
        positions = g_pos.shape[1]
        gram_cost = positions * positions * (layer.out_dim + layer.in_dim)
        projection_cost = positions * (
            (0 if layer.identity_in else layer.in_dim * layer.k_in)
            + (0 if layer.identity_out else layer.out_dim * layer.k_out)
            + layer.k_in * layer.k_out
        )
        if gram_cost > projection_cost:
            return block, block.pow(2).sum(dim=1)  # E ||B G A^T||^2 = ||G||^2
    return block, exact_sq_norm(layer, module, x, x_pos, g_pos)


def formed_features(
    layer: FactoredLayer, module: nn.Module, x: Tensor, g: Tensor, mats: dict
) -> tuple[Tensor, Tensor]:
    """``B G A^T`` with ``G = [sum_p g_p x_p^T, sum_p g_p]`` formed a few rows at a time; ``||G||^2``."""
    a, b = mats[layer.module]
    rows = x.shape[0]
    positions_first = layer.kind == "linear"
    g_pos = g.reshape(rows, -1, layer.out_dim) if positions_first else g.reshape(rows, layer.out_dim, -1)
    blocks, sq = [], []
    step = max(
        1, NORM_CHUNK_FLOATS // max(1, layer.in_dim * (layer.out_dim + g_pos[0].numel() // layer.out_dim))
    )
    for start in range(0, rows, step):
        part = slice(start, start + step)
        if positions_first:
            xp = x[part].reshape(x[part].shape[0], -1, module.in_features)
            gp = g_pos[part].transpose(1, 2)  # (r, O, Pos)
        else:
            xp = unfold(module, x[part]).transpose(1, 2)  # (r, L, C kh kw)
            gp = g_pos[part]  # (r, O, L)
        if layer.bias is not None:
            xp = torch.cat([xp, xp.new_ones((*xp.shape[:2], 1))], dim=2)
        grad = torch.bmm(gp, xp)  # G = sum_p g_p x'_p^T: (r, O, I')
        sq.append(grad.pow(2).sum(dim=(1, 2)))
        if b is not None:
            grad = torch.matmul(b, grad)  # (r, k_out, I')
        if a is not None:
            grad = torch.matmul(grad, a.T)  # (r, k_out, k_in)
        blocks.append(grad.reshape(grad.shape[0], -1))
    return torch.cat(blocks), torch.cat(sq)


def exact_sq_norm(
    layer: FactoredLayer, module: nn.Module, x: Tensor, x_pos: Tensor | None, g_pos: Tensor
) -> Tensor:
    """``||[G_w, g_b]||_F^2`` per row with ``G_w = sum_p g_p x_p^T`` and ``g_b = sum_p g_p``.

    Gram form ``sum_{p,q} (g_p . g_q)(x_p . x_q)`` when ``Pos^2 (O + I) <= Pos O I``, else ``G_w``
    formed for a few rows at a time.
    """
    rows, positions, out = g_pos.shape
    sq = torch.zeros(rows, dtype=torch.float32, device=g_pos.device)
    if layer.bias is not None:
        sq += g_pos.sum(dim=1).pow(2).sum(dim=1)  # ||sum_p g_p||^2
    if layer.weight is None:
        return sq
    fan_in = layer.in_dim - (1 if layer.bias else 0)
    gram = positions * positions * (out + fan_in) <= positions * out * fan_in
    per_row = fan_in * positions + (positions * positions * 2 if gram else out * fan_in)
    step = max(1, NORM_CHUNK_FLOATS // max(1, per_row))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        # (r, Pos, I): linear inputs as they are, conv inputs unfolded into patches
        xp = x_pos[part] if x_pos is not None else unfold(module, x[part]).transpose(1, 2)
        gp = g_pos[part]
        if gram:
            sq[part] += (torch.bmm(gp, gp.transpose(1, 2)) * torch.bmm(xp, xp.transpose(1, 2))).sum(
                dim=(1, 2)
            )
        else:
            sq[part] += torch.bmm(gp.transpose(1, 2), xp).pow(2).sum(dim=(1, 2))
    return sq
