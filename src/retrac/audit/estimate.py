"""How long an audit's sampling and attribution will take, measured on this machine before they start.

Sampling ``N`` images with ``S`` reverse steps costs ``S * ceil(N / B)`` forward passes of a batch of ``B``
images: one pass is timed. Attributing them costs about ``N`` times the query gradients of one image
(``K`` checkpoints x ``T_q x M`` events): one image is timed. Both are rough (batching makes many images
cheaper per image), and printed so that a long run is not a surprise.
"""

from __future__ import annotations

import math
import time

import torch

DEFAULT_AUDIT_SAMPLING_STEPS = 100  # reverse steps of `retrac audit --generate` (at most the scheduler's T)
SAMPLING_BATCH = 256  # retrac.sampling.generate_images' batch


def audit_sampling_steps(requested: int | None, num_train_timesteps: int) -> int:
    """``requested``, or ``min(DEFAULT_AUDIT_SAMPLING_STEPS, T)``."""
    return requested if requested is not None else min(DEFAULT_AUDIT_SAMPLING_STEPS, num_train_timesteps)


def _seconds(call) -> float:
    call()  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def sampling_seconds(task, num_images: int, steps: int) -> float:
    """Estimated seconds to draw ``num_images`` with ``steps`` reverse steps (one batched forward pass timed)."""
    batch = min(num_images, SAMPLING_BATCH)
    device = task.device
    x = torch.zeros((batch, *task.sample_shape), device=device)  # latents for a latent model
    t = torch.full((batch,), task.num_train_timesteps // 2, device=device, dtype=torch.long)
    # a text model's forward pass takes encoder_hidden_states; their length hardly changes its cost
    cond = torch.zeros((batch, 1, task.spec.context_dim), device=device) if task.is_text_conditional else None
    with torch.no_grad():
        one = _seconds(lambda: task.model_output(x, t, cond))
    return one * steps * math.ceil(num_images / batch)


def attribution_seconds(attributor, image: torch.Tensor, num_images: int) -> float:
    """Estimated seconds for the query gradients of ``num_images`` (one image's timed, times ``num_images``)."""
    progress, attributor.progress = attributor.progress, False
    try:
        started = time.perf_counter()
        prompts = "" if attributor.task.is_text_conditional else None  # a text model's query takes a prompt
        attributor.query_features(
            image[None], prompts=prompts
        )  # one call: its warm-up makes it a little high
        one = time.perf_counter() - started
    finally:
        attributor.progress = progress
    return one * num_images


def describe(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
