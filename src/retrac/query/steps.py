"""Step-specific queries (Journey-TRAK): attribute a generated sample at chosen steps of its trajectory.

Georgiev et al., "The Journey, Not the Destination: How Data Guides Diffusion Models" (2023)
attribute each step of a sampling trajectory separately: different training samples steer the
coarse layout (early, large ``t``) and the details (late, small ``t``). retrac's definition:

1. Sample with the checkpoint's scheduler (``num_inference_steps``, seeded), recording the latent
   ``x_t`` on the trajectory at each requested step (a requested timestep is snapped to the nearest
   timestep of the sampler's grid; the snapped value is reported).
2. At step ``t`` the query's clean sample is the model's own estimate from the trajectory,
   ``x0_hat_t = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t, c)) / sqrt(alpha_bar_t)`` (for
   ``epsilon`` prediction; ``v_prediction`` and ``sample`` by their formulas), with the last
   checkpoint's model, clamped to ``[-1, 1]`` for a pixel model.
3. Its query events are ``M`` noise draws at that one timestep: ``q_k(z'; t) = mean_m P_k grad
   l(theta_k; x0_hat_t, t, eps_m, c)`` (docs/design.md section 1 with ``T_q = 1`` and ``tau = t``),
   noise as :class:`~retrac.query.attribution.QueryEvents` draws it; scores and search as for any query.

:func:`attribute_steps` returns one :class:`~retrac.query.attribution.AttributionResult` per step.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from retrac.errors import ConfigError
from retrac.query.attribution import AttributionResult, Attributor, QueryEvents
from retrac.task import DiffusionTask

__all__ = [
    "DEFAULT_SAMPLING_STEPS",
    "StepEvents",
    "Trajectory",
    "attribute_steps",
    "generate_samples",
    "parse_steps",
    "sample_trajectory",
]

DEFAULT_SAMPLING_STEPS = 50  # reverse steps of the sampler that draws the trajectory


def parse_steps(spec: str | list[int], num_train_timesteps: int) -> list[int]:
    """``"900,500,100"`` -> ``[900, 500, 100]``, each in ``[0, T)``.

    Raises:
        ConfigError: not a comma-separated list of integers in ``[0, T)``.
    """
    try:
        steps = [int(s) for s in spec.split(",")] if isinstance(spec, str) else [int(s) for s in spec]
    except ValueError:
        raise ConfigError(
            f"--query-steps {spec!r} is not a list of timesteps; e.g. --query-steps 900,500,100."
        ) from None
    if not steps or any(not 0 <= s < num_train_timesteps for s in steps):
        raise ConfigError(
            f"--query-steps {spec!r}: give timesteps in [0, {num_train_timesteps}) (the scheduler's T), e.g. "
            f"{int(num_train_timesteps * 0.9)},{num_train_timesteps // 2},{num_train_timesteps // 10}."
        )
    return steps


@dataclass(frozen=True)
class StepEvents(QueryEvents):
    """Query events at one timestep: ``M`` noise draws at ``step`` (``T_q = 1``)."""

    step: int = 0

    def timesteps(self, num_train_timesteps: int) -> np.ndarray:
        if not 0 <= self.step < num_train_timesteps:
            raise ConfigError(f"step {self.step} lies outside [0, {num_train_timesteps}).")
        return np.array([self.step], dtype=np.int64)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trajectory:
    """A sampled trajectory at the requested steps.

    Attributes:
        requested: the steps asked for.
        timesteps: each snapped to the sampler's grid (same order).
        latents: ``(S, n, C, H, W)`` the trajectory's ``x_t`` at each step (latents for a latent model).
        predicted: ``(S, n, C, H, W)`` ``x0_hat_t``, the queries' clean samples.
        final: ``(n, C, H, W)`` the sample the trajectory ends in.
        seed: the sampling seed.
    """

    requested: list[int]
    timesteps: list[int]
    latents: Tensor
    predicted: Tensor
    final: Tensor
    seed: int


def predicted_clean(task: DiffusionTask, x_t: Tensor, t: int, output: Tensor) -> Tensor:
    """``x0_hat`` from ``x_t`` and the model's prediction at ``t`` (by the scheduler's prediction type)."""
    alpha_bar = task.scheduler.alphas_cumprod[t].to(x_t.device, x_t.dtype)
    if task.prediction_type == "epsilon":
        x0 = (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    elif task.prediction_type == "v_prediction":
        x0 = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    else:
        x0 = output
    return x0 if task.is_latent else x0.clamp(-1, 1)


@torch.no_grad()
def sample_trajectory(
    task: DiffusionTask,
    steps: list[int],
    num_images: int = 1,
    conditioning: Tensor | None = None,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = 1.0,
    unconditional: Tensor | None = None,
    progress: bool = False,
) -> Trajectory:
    """Sample ``num_images`` with ``task``'s scheduler and record ``x_t`` and ``x0_hat_t`` at ``steps``.

    Args:
        task: the model that samples (the last checkpoint's).
        steps: timesteps in ``[0, T)``; each is snapped to the nearest one of the sampler's grid.
        num_images: how many samples.
        conditioning: ``(n,)`` labels or ``(n, L, D)`` encoder_hidden_states (see ``task.conditioning``).
        seed: seeds the initial noise and every stochastic step.
        num_inference_steps: reverse steps of the sampler.
        guidance_scale: classifier-free guidance ``eps_u + g (eps_c - eps_u)`` for a text model
            (1: none); ``unconditional`` are the states of the empty prompt.
        progress: show a progress bar.

    Raises:
        ConfigError: bad step counts, guidance without unconditional states.
    """
    total = task.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise ConfigError(f"sampling steps {num_inference_steps!r} must be an integer in [1, {total}].")
    if not 1 <= num_inference_steps <= total:
        raise ConfigError(
            f"sampling steps {num_inference_steps} must lie in [1, {total}] (the scheduler's T)."
        )
    if guidance_scale != 1.0 and (not task.is_text_conditional or unconditional is None):
        raise ConfigError("guidance_scale != 1 needs a text model and the empty prompt's states.")
    scheduler = type(task.scheduler).from_config(task.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    grid = [int(t) for t in scheduler.timesteps]
    requested, snapped = [], []
    for step in steps:  # two requests that snap to one grid step give one list
        t = min(grid, key=lambda g, s=step: (abs(g - s), g))
        if t not in snapped:
            requested.append(step)
            snapped.append(t)
    cond = task.conditioning(conditioning, num_images)
    device = task.device
    cond = None if cond is None else cond.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn((num_images, *task.sample_shape), generator=generator).to(device)
    if hasattr(scheduler, "init_noise_sigma"):
        x = x * scheduler.init_noise_sigma
    recorded: dict[int, tuple[Tensor, Tensor]] = {}
    for t in tqdm(grid, desc="sample trajectory", disable=not progress):
        timesteps = torch.full((num_images,), t, dtype=torch.long, device=device)
        output = task.model_output(x, timesteps, cond)
        if guidance_scale != 1.0:
            uncond = unconditional.to(device).expand(num_images, *unconditional.shape[1:])
            plain = task.model_output(x, timesteps, uncond)
            output = plain + guidance_scale * (output - plain)
        if t in snapped:
            recorded[t] = (x.float().cpu(), predicted_clean(task, x, t, output).float().cpu())
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    final = x.float().cpu() if task.is_latent else x.clamp(-1, 1).float().cpu()
    empty = torch.empty((0, *final.shape))
    return Trajectory(
        requested=requested,
        timesteps=snapped,
        latents=torch.stack([recorded[t][0] for t in snapped]) if snapped else empty,
        predicted=torch.stack([recorded[t][1] for t in snapped]) if snapped else empty,
        final=final,
        seed=int(seed),
    )


def generate_samples(
    task: DiffusionTask,
    num_images: int,
    conditioning: Tensor | None = None,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = 1.0,
    unconditional: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """``num_images`` samples as pixels ``(n, C, H, W)`` in ``[-1, 1]`` (a latent model's decoded by its VAE).

    The sampler of :func:`sample_trajectory` (same seed, same draws), recording no step.
    """
    trajectory = sample_trajectory(
        task, [], num_images, conditioning, seed, num_inference_steps, guidance_scale, unconditional, progress
    )
    if not task.is_latent:
        return trajectory.final
    return task.latent_encoder.to(task.device).decode(trajectory.final)


def attribute_steps(
    attributor: Attributor,
    trajectory: Trajectory,
    k: int,
    method: str | None = None,
    opponents: bool = False,
    class_labels=None,
    prompts=None,
) -> dict[int, AttributionResult]:
    """One top-``k`` list per step of ``trajectory``: the query ``x0_hat_t`` at timestep ``t`` alone.

    The attributor's query events give ``M`` and the seed of the noise draws.

    Returns:
        ``{t: AttributionResult}`` in the trajectory's step order (``t`` snapped to the grid).
    """
    events = attributor.query_events
    space = "latents" if attributor.task.is_latent else "pixels"
    results = {}
    try:
        for s, t in enumerate(trajectory.timesteps):
            attributor.query_events = StepEvents(1, events.num_noise, events.seed, step=t)
            results[t] = attributor.attribute(
                trajectory.predicted[s],
                k,
                method,
                opponents,
                class_labels,
                prompts=prompts,
                input_space=space,
            )
    finally:
        attributor.query_events = events
    return results
