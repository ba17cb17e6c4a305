"""Which layers the factored projector hooks, and where each one's block sits in the stage-1 features.

Covered: ``nn.Linear``, ``nn.Conv2d`` (one group, zero padding given as numbers), ``nn.GroupNorm``
and ``nn.LayerNorm`` over the last axis (the transformer blocks of ``UNet2DConditionModel`` and
DiTs). Any other selected parameter (an embedding table, a grouped convolution) is not covered;
:func:`plan_layers` names it so that the projector can report it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from retrac.task import DiffusionTask

__all__ = ["DEFAULT_LAYER_DIM", "NORM_KINDS", "FactoredLayer", "covered_kind", "plan_layers"]

NORM_KINDS = ("groupnorm", "layernorm")  # kept whole: per-channel weight and bias, no A or B

DEFAULT_LAYER_DIM = 128  # k_in = min(I, 128), k_out = min(O, 128): at most 16384 stage-1 entries per layer


@dataclass(frozen=True)
class FactoredLayer:
    """One hooked module and its slice of the stage-1 features.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv"``, ``"groupnorm"`` or ``"layernorm"``.
        weight: the selected weight's parameter name, or ``None``.
        bias: the selected bias's parameter name, or ``None``.
        in_dim: ``I'``: unfolded input size (``C kh kw`` or ``in_features``) if the weight counts,
            plus 1 if the bias counts (the ones-column); for GroupNorm / LayerNorm the channel count.
        out_dim: ``O``.
        k_in: rows of ``A`` (``in_dim`` when ``A`` is the identity).
        k_out: rows of ``B`` (``out_dim`` when ``B`` is the identity).
        offset: first stage-1 column of this layer; it spans ``k_out * k_in`` columns (row-major
            ``(k_out, k_in)``), for GroupNorm / LayerNorm ``[weight (C), bias (C)]`` as selected.
        size: number of stage-1 columns.
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None
    in_dim: int
    out_dim: int
    k_in: int
    k_out: int
    offset: int
    size: int

    @property
    def identity_in(self) -> bool:
        return self.k_in == self.in_dim

    @property
    def identity_out(self) -> bool:
        return self.k_out == self.out_dim


def covered_kind(module: nn.Module) -> str | None:
    """The kind of layer the factored projector covers, or ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layernorm"
    return None


def plan_layers(task: DiffusionTask, layer_dim: int | None) -> tuple[list[FactoredLayer], list[str]]:
    """The hooked layers in module order, and the selected parameter names no layer covers.

    Args:
        task: the task whose selected parameters count.
        layer_dim: ``k`` (a side of at most ``k`` is kept whole), or ``None`` for no compression.

    Returns:
        ``(layers, uncovered)``: the layers with their stage-1 slices laid end to end, and the
        selected parameter names (in ``task.parameter_names`` order) that no layer covers.
    """
    selected = set(task.parameter_names)
    layers: list[FactoredLayer] = []
    covered: set[str] = set()
    offset = 0
    for name, module in task.model.named_modules():
        kind = covered_kind(module)
        if kind is None:
            continue
        prefix = f"{name}." if name else ""
        weight = (
            f"{prefix}weight"
            if getattr(module, "weight", None) is not None and f"{prefix}weight" in selected
            else None
        )
        bias = (
            f"{prefix}bias"
            if getattr(module, "bias", None) is not None and f"{prefix}bias" in selected
            else None
        )
        if weight is None and bias is None:
            continue
        if kind in NORM_KINDS:
            channels = module.num_channels if kind == "groupnorm" else module.normalized_shape[0]
            size = channels * ((weight is not None) + (bias is not None))
            layer = FactoredLayer(
                name, kind, weight, bias, channels, channels, channels, channels, offset, size
            )
        else:
            if kind == "linear":
                fan_in, out = module.in_features, module.out_features
            else:
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                out = module.out_channels
            in_dim = (fan_in if weight is not None else 0) + (1 if bias is not None else 0)
            k_in = in_dim if layer_dim is None else min(in_dim, layer_dim)
            k_out = out if layer_dim is None else min(out, layer_dim)
            layer = FactoredLayer(name, kind, weight, bias, in_dim, out, k_in, k_out, offset, k_in * k_out)
        layers.append(layer)
        covered.update(p for p in (weight, bias) if p is not None)
        offset += layer.size
    uncovered = [n for n in task.parameter_names if n not in covered]
    return layers, uncovered
