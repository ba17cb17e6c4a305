"""The ``factored`` projector: per-layer projections from layer hooks, never forming the gradient.

docs/design.md section 1 asks for ``phi_k(z, e) = P_k grad_theta l(theta_k; z, e)``. This module
drives the hooks: it registers a forward hook on every planned layer
(:mod:`~retrac.projection.factored.planning`), takes ``A x`` there, runs one backward pass, and
turns each layer's output gradient into its stage-1 block and squared norm
(:mod:`~retrac.projection.factored.layer_features`). The blocks are concatenated (stage 1, ``D1``
entries) and optionally compressed to exactly ``d`` by a seeded second stage (FactGraSS; see
:mod:`~retrac.projection.factored.matrices`): a sparse JL matrix (``s`` random signed entries per
input coordinate, rows balanced) or a dense Gaussian one. ``E <P g, P g'> = <g, g'>`` holds for
every stage.

GroupNorm and LayerNorm parameters are covered exactly. Any other selected parameter (an embedding table, a
grouped convolution) is *not covered*: it is left out of the features and norms and reported,
with its share of the parameters, in :meth:`FactoredProjector.to_dict`.

All rows of a chunk (samples x events) take one forward and one backward pass: the loss is the
sum of the per-row objectives, and the rows do not interact in the model, so the gradient of
that sum with respect to a row's activations is that row's output gradient.

Norms ``n_k``: ``sqrt(sum over layers of ||G||_F^2)``. ``norms="exact"``: each ``||G||_F^2`` exact
(Gram form or ``G`` formed). ``norms="auto"`` (the default): exact only where it costs no more than
the layer's projection, elsewhere the unbiased stage-1 estimate ``||B G A^T||_F^2`` (the store
records ``norm_kind="mixed"``). ``norms="projected"``: ``||phi||``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrac.errors import ConfigError, GradientError
from retrac.projection.base import Projector, register_projector
from retrac.projection.factored.layer_features import forward_features, layer_features
from retrac.projection.factored.matrices import SPARSE_NONZEROS, apply_second_stage, build_matrices
from retrac.projection.factored.planning import DEFAULT_LAYER_DIM, NORM_KINDS, FactoredLayer, plan_layers
from retrac.task import DiffusionTask

__all__ = ["FACTORED_NORMS", "FACTORED_SECOND_STAGES", "MAX_FACTORED_ROWS", "FactoredProjector"]

FACTORED_SECOND_STAGES = ("sparse", "dense", "none")
FACTORED_NORMS = ("auto", "exact", "projected")
MAX_FACTORED_ROWS = 64  # rows per forward/backward pass (activations bound it)


@register_projector("factored")
class FactoredProjector(Projector):
    """LoGra-style factored projection from forward/backward hooks, with an optional second stage.

    Args:
        task: the task whose selected parameters count (gives the layers and ``P``).
        dim: ``d``. With a second stage, in ``[1, D1]`` (``D1`` = stage-1 size, see
            :attr:`stage1_dim`); with ``second_stage="none"``, ``None`` or ``D1``.
        seed: the seed of ``P_k`` (see :func:`retrac.projection.base.projector_seed`); each layer's
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
        self.layers, self.uncovered = plan_layers(task, layer_dim)
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

    @classmethod
    def create(
        cls, task: DiffusionTask, dim: int | None, seed: int, backend: str, settings: dict
    ) -> FactoredProjector:
        """The factored projector for ``task``; ``settings`` may give ``layer_dim``, ``second_stage``
        and ``norms`` (``backend`` is unused)."""
        return cls(
            task,
            dim,
            seed,
            layer_dim=settings.get("layer_dim", DEFAULT_LAYER_DIM),
            second_stage=settings.get("second_stage", "sparse"),
            norms=settings.get("norms", "auto"),
        )

    @classmethod
    def from_record(cls, record: dict, task: DiffusionTask) -> FactoredProjector:
        """Rebuilt from ``record``; raises ``ConfigError`` when ``task`` plans other layers or coverage."""
        projector = cls(
            task,
            int(record["dim"]),
            int(record["seed"]),
            layer_dim=record["layer_dim"],
            second_stage=record["second_stage"],
            norms=record["norms"],
        )
        if projector.to_dict() != record:
            raise ConfigError(
                "the factored projector rebuilt for this task differs from the recorded one (other layers or "
                "coverage); use the same model and include/exclude patterns as when it was built."
            )
        return projector

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
    def _device_matrices(self, device: torch.device) -> dict:
        """``A``, ``B`` per layer and the second stage on ``device`` (built once per device)."""
        key = str(device)
        if key not in self._matrices:
            self._matrices[key] = build_matrices(
                self.layers, self.seed, self.stage1_dim, self.dim, self.second_stage, device
            )
        return self._matrices[key]

    # ------------------------------------------------------------------ featurization
    def featurize_rows(self, task, x_t, timesteps, target, conditioning=None):
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
                    ax = forward_features(layer, module, x, mats)
                calls.append((layer, output, x, ax))

            return forward_hook

        handles = [modules[layer.module].register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                out = task.model_output(x_t, timesteps, conditioning)
                # rows do not interact, so d(sum_r l_r) / d(activations of row r) = row r's output gradient
                loss = task.objective_from_output(out, target).sum()
                grads = torch.autograd.grad(loss, [c[1] for c in calls], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        stage1 = torch.zeros((rows, self.stage1_dim), dtype=torch.float32, device=device)
        sq_norms = torch.zeros(rows, dtype=torch.float64, device=device)
        grads = list(grads)
        by_module: dict[str, list[int]] = {}  # the calls of each module, in call order
        for i, call in enumerate(calls):
            by_module.setdefault(call[0].module, []).append(i)
        for name, indices in by_module.items():
            layer, module = calls[indices[0]][0], modules[name]
            parts = []
            for i in indices:
                _, output, x, ax = calls[i]
                g = grads[i] if grads[i] is not None else torch.zeros_like(output)
                parts.append((x, ax, g.detach()))
                calls[i] = grads[i] = None  # free each layer's tensors once used
            with torch.no_grad():
                block, sq = self._module_block(layer, module, parts, mats)
                stage1[:, layer.offset : layer.offset + layer.size] += block
                if sq is not None:
                    sq_norms += sq.double()
        with torch.no_grad():
            features = apply_second_stage(stage1, mats, self.second_stage, self.dim)
            if self.norms == "projected":
                norms = torch.linalg.vector_norm(features, dim=1)
            else:
                norms = sq_norms.sqrt().float()
        return features, norms

    def _module_block(
        self, layer: FactoredLayer, module, parts: list[tuple[Tensor, Tensor | None, Tensor]], mats: dict
    ) -> tuple[Tensor, Tensor | None]:
        """One module's stage-1 block and squared norm from its calls ``(x, Ax, g)`` in one forward pass.

        A module called more than once (DiT recomputes block 0's conditioning embedding for its output
        layer) has the sum of its calls' gradients ``G = sum_calls sum_p g_p x_p^T``. A linear layer's
        calls are its positions laid end to end, so the exact norm covers the sum; GroupNorm / LayerNorm
        blocks are ``G`` itself, so they are summed before the norm is taken.
        """
        if len(parts) == 1:
            x, ax, g = parts[0]
            return layer_features(layer, module, x, ax, g, mats, self.norms)
        if self.norms == "projected" or layer.kind in NORM_KINDS:
            block = sum(layer_features(layer, module, x, ax, g, mats, "projected")[0] for x, ax, g in parts)
            exact_block = layer.kind in NORM_KINDS and self.norms != "projected"
            return block, (block.pow(2).sum(dim=1) if exact_block else None)
        if layer.kind == "linear":
            rows = parts[0][0].shape[0]
            x = torch.cat([x.reshape(rows, -1, module.in_features) for x, _, _ in parts], dim=1)
            g = torch.cat([g.reshape(rows, -1, module.out_features) for _, _, g in parts], dim=1)
            return layer_features(
                layer, module, x, forward_features(layer, module, x, mats), g, mats, self.norms
            )
        raise GradientError(
            f"module {layer.module!r} runs more than once per forward pass; exact factored norms of a convolution "
            "need one call per module: use norms='projected' or --projector dense."
        )
