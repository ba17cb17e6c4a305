"""What the denoiser sees of a query: its clean sample ``x`` and its conditioning ``c``.

``x`` is the query image for a pixel model; for a latent model it is the VAE's distribution mean
(scaled), or the latents themselves with ``input_space="latents"`` (e.g. a generated sample). ``c``
for a text model is the ``encoder_hidden_states`` of the query's prompt (one per image, or one for
all); class labels are handled by the attributor as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from retrac.errors import ConfigError, DataError
from retrac.task import DiffusionTask

__all__ = ["INPUT_SPACES", "query_inputs"]

INPUT_SPACES = ("pixels", "latents")  # what query images are: pixels, or a latent model's scaled latents


def query_inputs(
    task: DiffusionTask, images: Tensor, prompts: Sequence[str] | str | None, input_space: str = "pixels"
) -> tuple[Tensor, Tensor | None]:
    """Clean samples ``x`` ``(n, C, H, W)`` and, for a text model, the prompts' states ``(n, L, D)`` on the CPU.

    Raises:
        ConfigError: an unknown ``input_space``, or latents for a pixel model.
        DataError: images that do not fit, no prompts for a text model, a prompt count other than 1 or ``n``.
    """
    if input_space not in INPUT_SPACES:
        raise ConfigError(f"input_space={input_space!r} is unknown; choose one of {', '.join(INPUT_SPACES)}.")
    if input_space == "latents":
        if not task.is_latent:
            raise ConfigError("input_space='latents' needs a latent model (one with a VAE); give pixels.")
        task.check_samples(images, "query latents")
        samples = images
    else:
        samples = task.encode_images(images, "query images")  # pixels checked; latents for a latent model
    if prompts is None:
        if task.is_text_conditional:
            raise DataError(
                f"the {task.spec.model_class} is text-conditioned; give the queries' prompts (--prompt)."
            )
        return samples, None
    prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != images.shape[0]:
        raise DataError(f"got {len(prompts)} prompts for {images.shape[0]} query images; give one per image.")
    return samples, task.encode_prompts(prompts, "query prompts").cpu()
