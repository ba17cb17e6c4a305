"""The denoiser's view of a training set: clean samples ``x`` and conditioning ``c`` per row.

For a pixel model ``x`` is the image; for a latent model it is the image's scaled VAE latent,
encoded once and kept in the store folder (``latents.npz``, :class:`~retrac.latents.LatentCache`,
reused while the VAE and the data are the same). ``c`` is the class label, or for a text model the
``encoder_hidden_states`` of the sample's caption (computed once per distinct caption by the
task's text encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError
from retrac.latents import LATENT_CACHE_FILE, LatentCache
from retrac.task import DiffusionTask

__all__ = ["TrainingInputs"]


class TrainingInputs:
    """Clean samples and conditioning of a data set for one task's denoiser.

    Args:
        task: the task (checkpoint 0's; the VAE and text encoder are shared by every checkpoint).
        dataset: the training images, ids, labels and captions.
        cache_folder: where ``latents.npz`` is kept (the store folder), or ``None`` for no cache.
        progress: show a progress bar while encoding latents.

    Attributes:
        ids: the sample ids.
        samples: ``(N, C, H, W)`` clean samples ``x`` (pixels or latents), float32, CPU.
        latents_reused: ``True`` when the latents came from the cache.

    Raises:
        DataError: a text model and data without captions.
        ConfigError: a text model and no text encoder.
    """

    def __init__(
        self,
        task: DiffusionTask,
        dataset: ImageDataset,
        cache_folder: Path | None = None,
        progress: bool = False,
    ) -> None:
        self.dataset = dataset
        self.ids = dataset.ids
        self.latents_reused = False
        if task.is_text_conditional:
            if dataset.captions is None:
                raise DataError(
                    f"the {task.spec.model_class} is text-conditioned, but the data {dataset.source!r} has no "
                    "captions; add a metadata.jsonl (file_name + text per image) to the image folder, or a "
                    "'captions' array to the .npz."
                )
            if task.prompt_encoder is None:
                raise ConfigError(
                    f"the {task.spec.model_class} is text-conditioned but no text encoder was found beside the "
                    "checkpoint; give a pipeline folder with text_encoder/ and tokenizer/, or --text-encoder PATH."
                )
        if task.latent_encoder is None:
            self.samples = dataset.images
            return
        encoder = task.latent_encoder.to(task.device)
        if cache_folder is None:
            self.samples = encoder.encode(dataset.images, dataset.ids)
            return
        self.samples, self.latents_reused = LatentCache(Path(cache_folder) / LATENT_CACHE_FILE).latents(
            encoder, dataset, progress
        )

    def batch(self, task: DiffusionTask, rows: list[int]) -> tuple[Tensor, Tensor | None]:
        """``(samples (B, C, H, W), conditioning)`` of ``rows`` for ``task``'s denoiser."""
        samples = self.samples[rows]
        if task.is_text_conditional:
            captions = [self.dataset.captions[r] for r in rows]
            return samples, task.encode_prompts(captions, name=f"captions of {self.dataset.source!r}")
        if task.is_class_conditional:
            labels = self.dataset.labels
            return samples, None if labels is None else torch.as_tensor(labels)[rows]
        return samples, None
