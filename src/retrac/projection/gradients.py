"""One code path from samples and their events to projected per-sample gradients and norms.

docs/design.md section 2: the indexer (train vectors) and the query side (query vectors) both
call :func:`projected_gradients`, so the two can never drift apart. For every row ``(z, e)`` with
``e = (t, eps)`` it returns ``phi_k(z, e) = P_k grad_theta l(theta_k; z, e)`` and
``n_k(z, e) = ||grad_theta l(theta_k; z, e)||`` (docs/design.md section 1).

Per-sample gradients are taken with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``) over
``task.selected_parameters()``; the other parameters and the buffers are held fixed. diffusers'
``AttnProcessor2_0`` (``scaled_dot_product_attention``) has no batching rule on the CPU, so while
gradients are taken it is swapped for the mathematically identical ``AttnProcessor`` and restored
afterwards.

This module sits below the projectors: they build on :func:`flat_per_sample_gradients` and
:func:`default_max_rows`, and it knows :class:`~retrac.projection.base.Projector` only as a type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from retrac.errors import DataError, GradientError
from retrac.task import DiffusionTask

if TYPE_CHECKING:
    from retrac.projection.base import Projector

__all__ = [
    "default_max_rows",
    "flat_per_sample_gradients",
    "projected_gradients",
    "vmap_friendly_attention",
]

GRADIENT_BUDGET_BYTES = 256 << 20  # per-chunk memory for the (rows, P) float32 gradients
MAX_ROWS_PER_CHUNK = 64


@contextlib.contextmanager
def vmap_friendly_attention(model: torch.nn.Module) -> Iterator[None]:
    """Swap diffusers' ``AttnProcessor2_0`` for the equivalent ``AttnProcessor`` while in the block."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    except ImportError:  # not a diffusers model
        yield
        return
    swapped = []
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, AttnProcessor2_0):
            swapped.append((module, module.processor))
            module.set_processor(AttnProcessor())
    try:
        yield
    finally:
        for module, processor in swapped:
            module.set_processor(processor)


def flat_per_sample_gradients(
    task: DiffusionTask,
    x_t: Tensor,
    timesteps: Tensor,
    target: Tensor,
    conditioning: Tensor | None = None,
) -> Tensor:
    """Per-sample gradients ``grad_theta l(theta; x_t, t, c)`` of the task's objective, flattened.

    The building block of gradient-forming projectors; callers want :func:`projected_gradients`.

    Args:
        task: model, scheduler, objective and the parameters that count.
        x_t: ``(R, C, H, W)`` noisy inputs on ``task.device``.
        timesteps: ``(R,)`` int64 timesteps.
        target: ``(R, C, H, W)`` prediction targets.
        conditioning: ``(R,)`` int64 labels, ``(R, L, D)`` encoder_hidden_states, or ``None`` for
            an unconditional model.

    Returns:
        ``(R, P)`` float32: the gradients concatenated in ``task.parameter_names`` order, each
        tensor flattened row-major (the parameter order ``P_k`` is defined over).
    """
    from torch.func import functional_call, grad, vmap

    model = task.model
    selected = {name: p.detach() for name, p in task.selected_parameters().items()}
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    fixed.update(dict(model.named_buffers()))

    def objective(params: dict[str, Tensor], x: Tensor, t: Tensor, tgt: Tensor, c: Tensor | None):
        # l(theta; z, e) at one event: the model sees a batch of one, called as task.model_output calls it
        args, kwargs = task.spec.inputs(x[None], t[None], None if c is None else c[None])
        out = task.spec.prediction(functional_call(model, (params, fixed), args, kwargs))
        return task.objective_from_output(out, tgt[None])[0]

    cond_dim = None if conditioning is None else 0
    per_sample = vmap(grad(objective), in_dims=(None, 0, 0, 0, cond_dim))
    with vmap_friendly_attention(model), torch.enable_grad():
        grads = per_sample(selected, x_t, timesteps, target, conditioning)
    rows = x_t.shape[0]
    return torch.cat([grads[name].reshape(rows, -1).float() for name in selected], dim=1)


def default_max_rows(num_parameters: int) -> int:
    """Rows per gradient chunk so that the ``(rows, P)`` gradients stay within ``GRADIENT_BUDGET_BYTES``."""
    return max(1, min(MAX_ROWS_PER_CHUNK, GRADIENT_BUDGET_BYTES // (4 * max(1, num_parameters))))


def projected_gradients(
    task: DiffusionTask,
    projector: Projector,
    images: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    conditioning: Tensor | None = None,
    sample_ids: Sequence[str] | None = None,
    valid: Tensor | None = None,
    max_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Projected per-sample gradients and gradient norms of ``B`` samples at ``S`` events each.

    Row ``(b, s)`` is sample ``images[b]`` at event ``(timesteps[b, s], noise[b, s])``:
    ``x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps``, the task's objective ``l`` at it, and
    ``features[b, s] = P_k grad_theta l``, ``norms[b, s] = n_k`` (``||grad_theta l||`` for the
    ``exact`` and ``dense`` projectors; see ``projector.norm_kind``). The train side passes a
    sample's training events; the query side passes a query's ``T_q x M`` events and averages.

    Args:
        task: model at checkpoint ``k``, scheduler, objective (``loss`` / ``l1`` / ``sqnorm``).
        projector: ``P_k`` (from :func:`retrac.projection.make_projector` or ``FeatureStore.projector``).
        images: ``(B, C, H, W)`` clean samples ``x``: pixels in ``[-1, 1]``, or scaled latents for
            a latent model (``task.encode_images``).
        timesteps: ``(B, S)`` integer timesteps in ``[0, T)`` (any value in invalid slots).
        noise: ``(B, S, C, H, W)`` noise ``eps`` per event.
        conditioning: ``(B,)`` labels for a class-conditional model, ``(B, L, D)``
            encoder_hidden_states for a text model (``task.encode_prompts``); ignored by an
            unconditional one.
        sample_ids: ``B`` ids used in error messages (default: row numbers).
        valid: ``(B, S)`` bool; rows with ``False`` are skipped and get zero features and norms.
        max_rows: rows per ``vmap`` chunk (bounds memory; default from the parameter count).

    Returns:
        ``(features, norms)``: ``(B, S, d)`` float32 and ``(B, S)`` float32, on the CPU.

    Raises:
        DataError: shapes that do not fit, images outside ``[-1, 1]``, timesteps outside ``[0, T)``.
        GradientError: a NaN or infinite gradient; the message names the sample id and event index.
    """
    task.check_samples(images, "images")
    if timesteps.ndim != 2 or timesteps.shape[0] != images.shape[0]:
        raise DataError(
            f"timesteps have shape {tuple(timesteps.shape)}, expected (B, S) = ({images.shape[0]}, S): "
            "give S timesteps per image."
        )
    B, S = timesteps.shape
    if tuple(noise.shape) != (B, S, *images.shape[1:]):
        raise DataError(
            f"noise has shape {tuple(noise.shape)}, expected (B, S, C, H, W) = {(B, S, *images.shape[1:])}: "
            "give one noise tensor per event."
        )
    if valid is None:
        valid = torch.ones((B, S), dtype=torch.bool)
    valid = torch.as_tensor(valid, dtype=torch.bool).reshape(B * S).cpu()
    ids = [str(i) for i in range(B)] if sample_ids is None else [str(s) for s in sample_ids]
    if len(ids) != B:
        raise DataError(f"got {len(ids)} sample ids for {B} images; give one id per image.")

    device = task.device
    rows = valid.nonzero().flatten()  # flat row r = b * S + s
    flat_t = torch.as_tensor(timesteps).long().reshape(B * S)[rows].to(device)
    if rows.numel():
        task.check_timesteps(flat_t)
    flat_x = images.to(device).repeat_interleave(S, dim=0)[rows.to(device)]
    flat_noise = noise.reshape(B * S, *images.shape[1:]).to(device)[rows.to(device)]
    cond = task.conditioning(conditioning, B)
    flat_cond = None if cond is None else cond.to(device).repeat_interleave(S, dim=0)[rows.to(device)]
    x_t, target = task.noisy_inputs(flat_x, flat_t, flat_noise)

    features = torch.zeros((B * S, projector.dim), dtype=torch.float32)
    norms = torch.zeros(B * S, dtype=torch.float32)
    chunk = max_rows or projector.max_rows(task)
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        feats, norm = projector.featurize_rows(
            task, x_t[part], flat_t[part], target[part], None if flat_cond is None else flat_cond[part]
        )
        feats, norm = feats.float().cpu(), norm.float().cpu()
        # a NaN or inf anywhere in grad (or in phi, for projected norms) makes its norm non-finite
        finite = torch.isfinite(norm)
        if not bool(finite.all()):
            r = int(rows[start + int((~finite).nonzero()[0])])
            raise GradientError(
                f"the gradient of sample {ids[r // S]!r} at event {r % S} (timestep "
                f"{int(timesteps.reshape(-1)[r])}) is NaN or infinite; check that sample's pixels and "
                "the checkpoint's weights (a diverged checkpoint gives non-finite gradients), or exclude it."
            )
        features[rows[part]] = feats
        norms[rows[part]] = norm
    return features.reshape(B, S, projector.dim), norms.reshape(B, S)
