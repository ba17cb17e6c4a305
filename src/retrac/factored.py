"""The ``factored`` projector: per-layer projections from layer hooks, never forming the gradient.

DESIGN section 1 asks for ``phi_k(z, e) = P_k grad_theta l(theta_k; z, e)``. For a linear or
convolutional layer with (unfolded) inputs ``x_p`` and output gradients ``g_p`` at positions ``p``,
the per-sample gradient is ``G = sum_p g_p x_p^T`` (``O x I``). With small seeded per-layer
matrices ``A`` (``k_in x I``) and ``B`` (``k_out x O``)

    ``B G A^T = sum_p (B g_p)(A x_p)^T``          (LoGra: the Kronecker projection ``B kron A``)

is computed from ``A x`` (taken in the forward pass, for a convolution as a convolution with ``A``
as its kernel) and ``B g`` (in the backward pass), without forming ``G``. A bias is a ones-column
appended to ``x``, so ``G`` becomes ``[G_w, sum_p g_p]``. The per-layer blocks are concatenated
(stage 1, ``D1`` entries) and optionally compressed to exactly ``d`` by a seeded second stage
(FactGraSS): a sparse JL matrix (``s`` random signed entries per input coordinate, rows balanced) or a dense
Gaussian one. ``E <P g, P g'> = <g, g'>`` holds for every stage.

GroupNorm parameters are covered exactly (their per-sample gradients, ``sum_p g_p xhat_p`` and
``sum_p g_p`` per channel, are small and kept whole). Any other selected parameter (an embedding
table, a grouped convolution) is *not covered*: it is left out of the features and norms and
reported, with its share of the parameters, in :meth:`FactoredProjector.to_dict`.

All rows of a chunk (samples x events) take one forward and one backward pass: the loss is the
sum of the per-row objectives, and the rows do not interact in the model, so the gradient of
that sum with respect to a row's activations is that row's output gradient.

Norms ``n_k``: ``sqrt(sum over layers of ||G||_F^2)``. ``norms="exact"``: each ``||G||_F^2`` from the
Gram form ``sum_{p,q} (g_p . g_q)(x_p . x_q)`` when positions are few, else by forming ``G`` one
layer and a few rows at a time (as costly as that layer's forward pass). ``norms="auto"`` (the
default): the Gram form only where it costs no more than the layer's projection, elsewhere the
unbiased stage-1 estimate ``||B G A^T||_F^2`` (the store records ``norm_kind="mixed"``).
``norms="projected"``: ``||phi||``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrac.errors import ConfigError, GradientError
from retrac.events import derive_seed
from retrac.projection import MAX_FACTORED_ROWS, Projector
from retrac.task import DiffusionTask

__all__ = ["FACTORED_NORMS", "FACTORED_SECOND_STAGES", "FactoredLayer", "FactoredProjector"]

FACTORED_SECOND_STAGES = ("sparse", "dense", "none")
FACTORED_NORMS = ("auto", "exact", "projected")
DEFAULT_LAYER_DIM = 128  # k_in = min(I, 128), k_out = min(O, 128): at most 16384 stage-1 entries per layer
SPARSE_NONZEROS = 4  # entries per input coordinate of the sparse second stage
NORM_CHUNK_FLOATS = 16 << 20  # transient floats per row chunk when forming G for exact norms


@dataclass(frozen=True)
class FactoredLayer:
    """One hooked module and its slice of the stage-1 features.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv"`` or ``"groupnorm"``.
        weight: the selected weight's parameter name, or ``None``.
        bias: the selected bias's parameter name, or ``None``.
        in_dim: ``I'``: unfolded input size (``C kh kw`` or ``in_features``) if the weight counts,
            plus 1 if the bias counts (the ones-column); for GroupNorm the channel count.
        out_dim: ``O``.
        k_in: rows of ``A`` (``in_dim`` when ``A`` is the identity).
        k_out: rows of ``B`` (``out_dim`` when ``B`` is the identity).
        offset: first stage-1 column of this layer; it spans ``k_out * k_in`` columns (row-major
            ``(k_out, k_in)``), for GroupNorm ``[weight (C), bias (C)]`` as selected.
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


def _covered(module: nn.Module) -> str | None:
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
    return None


def _plan_layers(task: DiffusionTask, layer_dim: int | None) -> tuple[list[FactoredLayer], list[str]]:
    """The hooked layers in module order, and the selected parameter names no layer covers."""
    selected = set(task.parameter_names)
    layers: list[FactoredLayer] = []
    covered: set[str] = set()
    offset = 0
    for name, module in task.model.named_modules():
        kind = _covered(module)
        if kind is None:
            continue
        prefix = f"{name}." if name else ""
        weight = f"{prefix}weight" if module.weight is not None and f"{prefix}weight" in selected else None
        bias = (
            f"{prefix}bias"
            if getattr(module, "bias", None) is not None and f"{prefix}bias" in selected
            else None
        )
        if weight is None and bias is None:
            continue
        if kind == "groupnorm":
            channels = module.num_channels
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


class FactoredProjector(Projector):
    """LoGra-style factored projection from forward/backward hooks, with an optional second stage.

    Args:
        task: the task whose selected parameters count (gives the layers and ``P``).
        dim: ``d``. With a second stage, in ``[1, D1]`` (``D1`` = stage-1 size, see
            :attr:`stage1_dim`); with ``second_stage="none"``, ``None`` or ``D1``.
        seed: the seed of ``P_k`` (see :func:`retrac.projection.projector_seed`); each layer's
            ``A`` and ``B`` are seeded by ``derive_seed(seed, module name)``.
        layer_dim: ``k``: ``A`` is ``min(I', k) x I'`` and ``B`` is ``min(O, k) x O``; a side whose
            size is at most ``k`` is kept whole (identity). ``None``: no compression (identity
            everywhere: the stage-1 features are the exact gradients, reordered).
        second_stage: ``"sparse"`` (``SPARSE_NONZEROS`` signed entries per column, scaled
            ``1/sqrt(s)``), ``"dense"`` (Gaussian, ``1/sqrt(d)``) or ``"none"``.
        norms: ``"auto"`` (per layer exact where cheap, else the unbiased stage-1 estimate; see
            ``norm_detail`` in :meth:`to_dict`), ``"exact"`` (``||grad||`` over the covered
            parameters) or ``"projected"`` (``||phi||``).

    Raises:
        ConfigError: bad ``dim``, ``layer_dim``, ``second_stage`` or ``norms``; a task with no
            covered parameter.
    """

    kind = "factored"

    def __init__(
        self,
        task: DiffusionTask,
        dim: int | None,
        seed: int,
        layer_dim: int | None = DEFAULT_LAYER_DIM,
        second_stage: str = "sparse",
        norms: str = "auto",
    ) -> None:
        if second_stage not in FACTORED_SECOND_STAGES:
            raise ConfigError(
                f"factored second_stage={second_stage!r} is unknown; choose one of {', '.join(FACTORED_SECOND_STAGES)}."
            )
        if norms not in FACTORED_NORMS:
            raise ConfigError(
                f"factored norms={norms!r} is unknown; choose one of {', '.join(FACTORED_NORMS)}."
            )
        if layer_dim is not None and (not isinstance(layer_dim, int) or layer_dim < 1):
            raise ConfigError(
                f"factored layer_dim={layer_dim!r} must be a positive integer or None (no compression)."
            )
        self.layers, self.uncovered = _plan_layers(task, layer_dim)
        if not self.layers:
            raise ConfigError(
                "the factored projector covers nn.Linear, nn.Conv2d and nn.GroupNorm parameters, and the task "
                "selects none of them; use --projector dense."
            )
        self.stage1_dim = sum(layer.size for layer in self.layers)
        if second_stage == "none":
            if dim is not None and int(dim) != self.stage1_dim:
                raise ConfigError(
                    f"without a second stage the factored projector gives d = {self.stage1_dim} (the stage-1 size); "
                    f"drop dim={dim} or use a second stage to project to it."
                )
            dim = self.stage1_dim
        elif dim is None or not 1 <= int(dim) <= self.stage1_dim:
            raise ConfigError(
                f"dim={dim} must lie in [1, {self.stage1_dim}] (the factored stage-1 size at layer_dim={layer_dim}); "
                "lower --dim, or raise layer_dim."
            )
        super().__init__(task.num_parameters, int(dim), seed)
        self.layer_dim = layer_dim
        self.second_stage = second_stage
        self.norms = norms
        params = task.selected_parameters()
        self.uncovered_parameters = sum(params[n].numel() for n in self.uncovered)
        if norms == "projected":
            self.norm_kind = "projected"
        elif self.uncovered or (
            norms == "auto" and not all(layer.identity_in and layer.identity_out for layer in self.layers)
        ):
            self.norm_kind = "mixed"  # see norm_detail in to_dict
        else:
            self.norm_kind = "exact"
        self._matrices: dict[str, dict] = {}

    # ------------------------------------------------------------------ record
    def to_dict(self) -> dict:
        share = self.uncovered_parameters / max(1, self.num_parameters)
        if self.norms == "projected":
            detail = "||phi||, the norm of the projected features"
        elif self.norms == "auto":
            detail = (
                "sqrt of a sum over layers: exact ||G||^2 where the Gram form costs no more than the layer's "
                "projection (few positions: attention, time embedding, low-resolution convolutions) or a factor is "
                "whole, GroupNorm exact, else the unbiased stage-1 estimate ||B G A^T||^2"
            )
        else:
            detail = "exact ||grad||"
        if self.norms != "projected":
            detail += (
                f" over the {self.num_parameters - self.uncovered_parameters} covered parameters; "
                f"{self.uncovered_parameters} uncovered parameters ({share:.2%}) are left out of features and norms"
                if self.uncovered
                else " over all parameters"
            )
        return {
            **super().to_dict(),
            "layer_dim": self.layer_dim,
            "second_stage": self.second_stage,
            "sparse_nonzeros": SPARSE_NONZEROS if self.second_stage == "sparse" else None,
            "norms": self.norms,
            "norm_detail": detail,
            "stage1_dim": self.stage1_dim,
            "num_layers": len(self.layers),
            "covered_parameters": self.num_parameters - self.uncovered_parameters,
            "uncovered_parameters": self.uncovered_parameters,
            "uncovered_share": share,
            "uncovered": list(self.uncovered),
        }

    def max_rows(self, task: DiffusionTask) -> int:
        """Rows per pass: activations, not ``(rows, P)`` gradients, bound the memory."""
        return MAX_FACTORED_ROWS

    # ------------------------------------------------------------------ seeded matrices
    def _gaussian(self, rows: int, cols: int, *parts: object) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed("retrac-factored", self.seed, *parts))
        return torch.randn((rows, cols), generator=generator, dtype=torch.float32) / math.sqrt(rows)

    def _device_matrices(self, device: torch.device) -> dict:
        """``A``, ``B`` per layer and the second stage, generated on the CPU and moved to ``device``."""
        key = str(device)
        if key in self._matrices:
            return self._matrices[key]
        mats: dict = {}
        for layer in self.layers:
            if layer.kind == "groupnorm":
                continue
            a = None if layer.identity_in else self._gaussian(layer.k_in, layer.in_dim, layer.module, "A")
            b = None if layer.identity_out else self._gaussian(layer.k_out, layer.out_dim, layer.module, "B")
            mats[layer.module] = (
                None if a is None else a.to(device),
                None if b is None else b.to(device),
            )
        if self.second_stage == "dense":
            # columns generated in the (D1, d) layout, scaled 1/sqrt(d): E ||S v||^2 = ||v||^2
            generator = torch.Generator().manual_seed(derive_seed("retrac-factored-stage2", self.seed))
            stage2 = torch.randn((self.stage1_dim, self.dim), generator=generator) / math.sqrt(self.dim)
            mats["stage2"] = stage2.to(device)
        elif self.second_stage == "sparse":
            # S (d x D1) with exactly s entries +-1/sqrt(s) per column, at random rows (a repeated row
            # adds up), stored by row for a gather: D1 s slots (s per input coordinate) dealt out by a
            # random permutation into d rows of m = ceil(D1 s / d) slots; spare slots have sign 0.
            # A gather and a sum give the same bits on every device (no atomics, no sparse kernels).
            generator = torch.Generator().manual_seed(derive_seed("retrac-factored-stage2", self.seed))
            s = SPARSE_NONZEROS
            slots = self.stage1_dim * s
            per_row = -(-slots // self.dim)
            order = torch.randperm(self.dim * per_row, generator=generator).reshape(self.dim, per_row)
            signs = torch.randint(0, 2, (self.dim, per_row), generator=generator).float() * 2 - 1
            used = order < slots
            index = torch.where(used, order // s, 0)
            signs = torch.where(used, signs / math.sqrt(s), 0.0)
            mats["stage2"] = (index.reshape(-1).to(device), signs.to(device))
        self._matrices[key] = mats
        return mats

    # ------------------------------------------------------------------ featurization
    def featurize_rows(self, task, x_t, timesteps, target, class_labels=None):
        rows = x_t.shape[0]
        device = x_t.device
        mats = self._device_matrices(device)
        modules = dict(task.model.named_modules())
        calls: list[tuple[FactoredLayer, Tensor, Tensor, Tensor | None]] = []  # (layer, output, x, Ax)

        def hook(layer: FactoredLayer):
            def forward_hook(module, inputs, output):
                x = inputs[0].detach()
                if x.shape[0] != rows or output.shape[0] != rows:
                    raise GradientError(
                        f"module {layer.module!r} sees a batch of {x.shape[0]} rows, not {rows}: the factored "
                        "projector needs modules that keep one row per sample; use --projector dense."
                    )
                with torch.no_grad():
                    ax = self._forward_features(layer, module, x, mats)
                calls.append((layer, output, x, ax))

            return forward_hook

        handles = [modules[layer.module].register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                out = task.model_output(x_t, timesteps, class_labels)
                # rows do not interact, so d(sum_r l_r) / d(activations of row r) = row r's output gradient
                loss = task.objective_from_output(out, target).sum()
                grads = torch.autograd.grad(loss, [c[1] for c in calls], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        seen = set()
        stage1 = torch.zeros((rows, self.stage1_dim), dtype=torch.float32, device=device)
        sq_norms = torch.zeros(rows, dtype=torch.float64, device=device)
        grads = list(grads)
        for i in range(len(calls)):
            layer, output, x, ax = calls[i]
            g = grads[i]
            calls[i] = grads[i] = None  # free each layer's tensors once used
            if g is None:
                g = torch.zeros_like(output)
            if layer.module in seen and self.norms != "projected":
                raise GradientError(
                    f"module {layer.module!r} runs more than once per forward pass; exact factored norms need "
                    "one call per module: use norms='projected' or --projector dense."
                )
            seen.add(layer.module)
            with torch.no_grad():
                block, sq = self._layer_features(layer, modules[layer.module], x, ax, g.detach(), mats)
                stage1[:, layer.offset : layer.offset + layer.size] += block
                if sq is not None:
                    sq_norms += sq.double()
        with torch.no_grad():
            features = self._second_stage(stage1, mats)
            if self.norms == "projected":
                norms = torch.linalg.vector_norm(features, dim=1)
            else:
                norms = sq_norms.sqrt().float()
        return features, norms

    def _second_stage(self, stage1: Tensor, mats: dict) -> Tensor:
        if self.second_stage == "none":
            return stage1
        if self.second_stage == "dense":
            return stage1 @ mats["stage2"]
        index, signs = mats["stage2"]  # phi_r = sum_j S_rj v_j over the m slots of row r
        gathered = stage1.T.contiguous().index_select(0, index)  # whole rows: (d m, R)
        summed = torch.bmm(signs[:, None, :], gathered.reshape(self.dim, -1, stage1.shape[0]))  # (d, 1, R)
        return summed[:, 0].T.contiguous()

    def _forward_features(
        self, layer: FactoredLayer, module: nn.Module, x: Tensor, mats: dict
    ) -> Tensor | None:
        """``A x'`` per position: ``(R, Pos, k_in)`` (linear) or ``(R, k_in, L)`` (conv); GroupNorm ``xhat``."""
        if layer.kind == "groupnorm":
            return F.group_norm(x, module.num_groups, eps=module.eps)  # xhat, (R, C, ...)
        a, _ = mats[layer.module]
        rows = x.shape[0]
        if self._materialize(layer, module, x):
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
            h, w = self._conv_out_size(module, x)
            return x.new_ones((rows, 1, h * w))
        if a is None:
            patches = self._unfold(module, x)
            if layer.bias:
                patches = torch.cat([patches, patches.new_ones((rows, 1, patches.shape[2]))], dim=1)
            return patches
        fan_in = layer.in_dim - (1 if layer.bias else 0)
        kernel = a[:, :fan_in].reshape(layer.k_in, module.in_channels, *module.kernel_size)
        out = F.conv2d(
            x, kernel, a[:, fan_in] if layer.bias else None, module.stride, module.padding, module.dilation
        )
        return out.reshape(rows, layer.k_in, -1)

    @staticmethod
    def _unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
        return F.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )  # (R, C kh kw, L)

    @staticmethod
    def _conv_out_size(module: nn.Conv2d, x: Tensor) -> tuple[int, int]:
        size = []
        for i in range(2):
            span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            size.append((x.shape[2 + i] + 2 * module.padding[i] - span) // module.stride[i] + 1)
        return size[0], size[1]

    @staticmethod
    def _materialize(layer: FactoredLayer, module: nn.Module, x: Tensor) -> bool:
        """Whether forming ``G`` and then ``B G A^T`` costs less than ``sum_p (B g_p)(A x_p)^T``.

        The two orders give the same features (up to float rounding); forming ``G`` wins when a side
        is small, e.g. a convolution with few output channels and a long unfolded input.
        """
        if layer.weight is None:
            return False
        if layer.kind == "linear":
            positions = x.numel() // max(1, x.shape[0] * module.in_features)
        else:
            h, w = FactoredProjector._conv_out_size(module, x)
            positions = h * w
        i, o, k_in, k_out = layer.in_dim, layer.out_dim, layer.k_in, layer.k_out
        factored = positions * (
            (0 if layer.identity_in else i * k_in) + (0 if layer.identity_out else o * k_out) + k_in * k_out
        )
        formed = positions * o * i + (0 if layer.identity_out else k_out * o * i)
        formed += 0 if layer.identity_in else k_out * i * k_in
        return formed < factored

    def _formed_features(
        self, layer: FactoredLayer, module: nn.Module, x: Tensor, g: Tensor, mats: dict
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
                xp = self._unfold(module, x[part]).transpose(1, 2)  # (r, L, C kh kw)
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

    def _layer_features(
        self, layer: FactoredLayer, module: nn.Module, x: Tensor, ax: Tensor, g: Tensor, mats: dict
    ) -> tuple[Tensor, Tensor | None]:
        """The layer's stage-1 block ``(R, size)`` and, for exact norms, ``||G||_F^2`` per row ``(R,)``."""
        rows = x.shape[0]
        exact = self.norms != "projected"
        if layer.kind == "groupnorm":
            parts = []
            g = g.reshape(rows, layer.out_dim, -1)
            if layer.weight is not None:
                parts.append((g * ax.reshape(rows, layer.out_dim, -1)).sum(dim=2))  # sum_p g_p xhat_p
            if layer.bias is not None:
                parts.append(g.sum(dim=2))  # sum_p g_p
            block = torch.cat(parts, dim=1)
            return block, (block.pow(2).sum(dim=1) if exact else None)
        if ax is None:  # G formed (see _materialize): its norm is exact at no extra cost
            block, sq = self._formed_features(layer, module, x, g, mats)
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
        if self.norms == "auto":
            positions = g_pos.shape[1]
            gram_cost = positions * positions * (layer.out_dim + layer.in_dim)
            projection_cost = positions * (
                (0 if layer.identity_in else layer.in_dim * layer.k_in)
                + (0 if layer.identity_out else layer.out_dim * layer.k_out)
                + layer.k_in * layer.k_out
            )
            if gram_cost > projection_cost:
                return block, block.pow(2).sum(dim=1)  # E ||B G A^T||^2 = ||G||^2
        return block, self._exact_sq_norm(layer, module, x, x_pos, g_pos)

    def _exact_sq_norm(
        self, layer: FactoredLayer, module: nn.Module, x: Tensor, x_pos: Tensor | None, g_pos: Tensor
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
            xp = x_pos[part] if x_pos is not None else self._unfold(module, x[part]).transpose(1, 2)
            gp = g_pos[part]
            if gram:
                sq[part] += (torch.bmm(gp, gp.transpose(1, 2)) * torch.bmm(xp, xp.transpose(1, 2))).sum(
                    dim=(1, 2)
                )
            else:
                sq[part] += torch.bmm(gp.transpose(1, 2), xp).pow(2).sum(dim=(1, 2))
        return sq
