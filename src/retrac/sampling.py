"""Sampling new images from a checkpoint with its scheduler (the demo's and the audit's generated queries)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from tqdm.auto import tqdm

from retrac.errors import ConfigError

DEFAULT_SAMPLING_SEED = 0


@torch.no_grad()
def generate_images(
    model,
    scheduler,
    num_images: int,
    seed: int = DEFAULT_SAMPLING_SEED,
    num_inference_steps: int | None = None,
    class_labels: Tensor | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Draw images with the reverse process of ``scheduler`` (ancestral DDPM sampling by default).

    Args:
        model: a diffusers ``UNet2DModel``.
        scheduler: the checkpoint's noise scheduler; a copy is configured, the argument is unchanged.
        num_images: how many images to draw.
        seed: seeds the initial noise and every sampling step.
        num_inference_steps: reverse steps in ``[1, T]`` (default: the scheduler's ``T``,
            ``num_train_timesteps``).
        class_labels: ``(num_images,)`` labels for a class-conditional model.

    Returns:
        ``(num_images, C, H, W)`` float32 in ``[-1, 1]``.
    """
    if num_images < 1:
        raise ConfigError(f"num_images={num_images}; ask for at least one image.")
    scheduler = type(scheduler).from_config(scheduler.config)
    total = int(scheduler.config.num_train_timesteps)
    steps = total if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= total:
        raise ConfigError(
            f"sampling steps {steps!r} must be an integer in [1, {total}] (the scheduler's T); "
            f"give --sampling-steps between 1 and {total}, or leave it out for {total}."
        )
    scheduler.set_timesteps(steps)
    cfg = model.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    device = next(model.parameters()).device
    outputs = []
    with tqdm(
        total=num_images * len(scheduler.timesteps), desc="sample", disable=not progress, unit="img-step"
    ) as bar:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            labels = None if class_labels is None else class_labels[start : start + n].to(device)
            x = torch.randn((n, cfg.in_channels, h, w), generator=generator).to(device)
            for t in scheduler.timesteps:
                eps = model(x, t, class_labels=labels).sample
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
                bar.update(n)
            outputs.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(outputs)
