"""Latent diffusion: images -> VAE latents, and the latent cache beside a feature store.

A latent denoiser is trained on ``z = (E(x) - shift_factor) * scaling_factor`` (diffusers'
training scripts; ``shift_factor`` is 0 for Stable Diffusion 1/2 and set for SD3 / Flux VAEs), so
the objective of docs/design.md section 1 runs in latent space: ``x`` there is ``z``.

Which ``E(x)``: the training scripts draw ``z ~ N(mean, std^2)`` afresh every step
(``latent_dist.sample()``). retrac encodes every training image *once*, and by default takes the
distribution's **mean** (``mode="mean"``): it is deterministic, so featurization is reproducible
bit for bit on any shard, resumable, and independent of batch order; it is the centre of the
distribution the model was trained on; and the Stable Diffusion VAE's posterior standard
deviation is small against the mean, so the draw adds little but noise to the gradients.
``mode="sample"`` takes one draw ``mean + std * eps`` whose ``eps`` is a pure function of the seed
and the sample id (same bits on every run). Query images are always encoded to the mean: a query
has no stable id, and its mean is the latent the query image stands for.

:class:`LatentCache` keeps the training latents in ``latents.npz`` inside the store folder with a
fingerprint of the encoder (weights, scaling, mode, seed) and of the data; a cache with another
fingerprint is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from retrac._io import atomic_save_npz
from retrac.errors import ConfigError, DataError

__all__ = ["LATENT_CACHE_FILE", "LATENT_MODES", "LatentCache", "LatentEncoder"]

LATENT_MODES = ("mean", "sample")
LATENT_CACHE_FILE = "latents.npz"
ENCODE_BATCH = 16


class LatentEncoder:
    """A frozen ``AutoencoderKL`` with its ``scaling_factor`` and ``shift_factor``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (any module with ``encode(x).latent_dist`` and
            ``decode(z).sample`` and a config with ``latent_channels``, ``scaling_factor``,
            ``block_out_channels``).
        mode: ``"mean"`` (default; see the module docstring) or ``"sample"``.
        seed: seeds the draws of ``mode="sample"``.

    Raises:
        ConfigError: an unknown mode, or a VAE config without ``scaling_factor``.
    """

    def __init__(self, vae: nn.Module, mode: str = "mean", seed: int = 0) -> None:
        if mode not in LATENT_MODES:
            raise ConfigError(f"latent mode {mode!r} is unknown; choose one of {', '.join(LATENT_MODES)}.")
        cfg = vae.config
        if getattr(cfg, "scaling_factor", None) is None:
            raise ConfigError(
                f"the VAE ({type(vae).__name__}) has no scaling_factor in its config; save it with diffusers."
            )
        self.vae = vae.eval().requires_grad_(False)
        self.mode = mode
        self.seed = int(seed)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.path: str | None = None  # where it was loaded from (recorded, not compared)
        self._record: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: torch.device | str) -> LatentEncoder:
        self.vae.to(device)
        return self

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images whose latents are ``latent_shape``."""
        _, h, w = latent_shape
        return self.image_channels, h * self.downsample, w * self.downsample

    def to_dict(self) -> dict:
        """What the store records (and compares): class, sha256 of the weights, scaling, mode (and
        ``path``, where it was loaded from, which is not compared)."""
        if self._record is None:
            from retrac.checkpoints import state_dict_sha256

            self._record = {
                "class": type(self.vae).__name__,
                "sha256": state_dict_sha256(self.vae.state_dict()),
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "latent_channels": self.latent_channels,
                "downsample": self.downsample,
                "mode": self.mode,
                "seed": self.seed if self.mode == "sample" else None,
            }
        return {**self._record, **({"path": self.path} if self.path else {})}

    @torch.no_grad()
    def encode(self, images: Tensor, ids: list[str] | None = None, mode: str | None = None) -> Tensor:
        """``z = (E(x) - shift) * scaling``: ``(B, C, H, W)`` pixels in ``[-1, 1]`` -> latents, float32, CPU.

        Args:
            images: ``(B, C, H, W)`` pixels, already checked by the task.
            ids: ``B`` sample ids (seed the draws of ``mode="sample"``).
            mode: overrides the encoder's mode (queries: ``"mean"``).
        """
        from retrac.events import derive_seed, noise_from_seed

        mode = mode or self.mode
        if mode == "sample" and (ids is None or len(ids) != images.shape[0]):
            raise DataError("latent mode 'sample' draws per sample id; give one id per image.")
        out = []
        for start in range(0, images.shape[0], ENCODE_BATCH):
            batch = images[start : start + ENCODE_BATCH].to(self.device)
            dist = self.vae.encode(batch).latent_dist
            z = dist.mean
            if mode == "sample":
                eps = torch.stack(
                    [
                        noise_from_seed(
                            derive_seed("retrac-latent", self.seed, sample_id), tuple(z.shape[1:])
                        )
                        for sample_id in ids[start : start + ENCODE_BATCH]
                    ]
                ).to(z.device)
                z = z + dist.std * eps  # one draw of N(mean, std^2), a pure function of (seed, id)
            out.append(((z - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, h, w)`` -> pixels ``(B, C, H, W)`` clamped to ``[-1, 1]``, float32, CPU."""
        out = []
        for start in range(0, latents.shape[0], ENCODE_BATCH):
            z = latents[start : start + ENCODE_BATCH].to(self.device)
            out.append(
                self.vae.decode(z / self.scaling_factor + self.shift_factor).sample.clamp(-1, 1).float().cpu()
            )
        return torch.cat(out)


class LatentCache:
    """The training set's latents in one ``.npz`` file, valid while its fingerprint matches.

    Args:
        path: the cache file (``STORE/latents.npz`` for a feature store).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def fingerprint(encoder: LatentEncoder, data_fingerprint: str) -> str:
        """sha256 of the encoder's record and the data's fingerprint."""
        what = {k: v for k, v in encoder.to_dict().items() if k != "path"}  # a moved VAE is the same VAE
        record = json.dumps({"encoder": what, "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(record.encode()).hexdigest()

    def read(self, fingerprint: str) -> Tensor | None:
        """The cached latents if the file exists, is readable and has ``fingerprint``; else ``None``."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                if str(archive["fingerprint"]) != fingerprint:
                    return None
                return torch.from_numpy(np.ascontiguousarray(archive["latents"], dtype=np.float32))
        except Exception:  # a truncated or foreign file: recompute it
            return None

    def latents(self, encoder: LatentEncoder, dataset, progress: bool = False) -> tuple[Tensor, bool]:
        """The dataset's latents ``(N, C, h, w)`` float32, from the cache or encoded and cached.

        Args:
            encoder: the task's latent encoder (on the device to encode on).
            dataset: an :class:`~retrac.data.ImageDataset` whose images the task has checked.

        Returns:
            ``(latents, reused)``: ``reused`` is ``True`` when they came from the cache.
        """
        fingerprint = self.fingerprint(encoder, dataset.fingerprint)
        cached = self.read(fingerprint)
        if cached is not None and cached.shape[0] == len(dataset):
            return cached, True
        parts = []
        with tqdm(total=len(dataset), desc="encode latents", unit="image", disable=not progress) as bar:
            for start in range(0, len(dataset), 256):
                stop = min(start + 256, len(dataset))
                parts.append(encoder.encode(dataset.images[start:stop], dataset.ids[start:stop]))
                bar.update(stop - start)
        latents = torch.cat(parts)
        if not torch.isfinite(latents).all():
            bad = int((~torch.isfinite(latents)).flatten(1).any(1).nonzero()[0])
            raise DataError(
                f"the VAE gives non-finite latents for sample {dataset.ids[bad]!r}; check the VAE weights."
            )
        atomic_save_npz(self.path, latents=latents.numpy(), fingerprint=np.array(fingerprint))
        return latents, False
