"""Deterministic noise for events, and the training-event log.

DESIGN section 1: the noise of an event is a pure function of
``(seed, checkpoint, sample id, event index)``, so any shard recomputed alone gives identical bits.
The training-event log records, for every training step of every sample, the ``(t, noise seed)``
it was trained on, grouped by checkpoint interval, so the paper's replay is possible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retrac.errors import DataError

NOISE_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and platforms)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & NOISE_SEED_MASK


def noise_from_seed(noise_seed: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise ``(shape)`` float32 on the CPU, a pure function of ``noise_seed``."""
    generator = torch.Generator().manual_seed(int(noise_seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def event_noise_seed(seed: int, checkpoint: int, sample_id: str, event_index: int) -> int:
    """The noise seed of event ``event_index`` of ``sample_id`` at checkpoint ``checkpoint``."""
    return derive_seed("retrac-event", seed, checkpoint, sample_id, event_index)


@dataclass
class TrainingEventLog:
    """Every training step each sample saw: ``(t, noise seed)`` per step, grouped by checkpoint interval.

    Checkpoint ``k`` covers the steps ``(checkpoint_steps[k-1], checkpoint_steps[k]]``; ``interval``
    is that ``k`` for each logged event. All per-event arrays have shape ``(E,)``.
    """

    sample_id: np.ndarray  # str
    timestep: np.ndarray  # int64
    noise_seed: np.ndarray  # int64
    step: np.ndarray  # int64, global optimizer step
    interval: np.ndarray  # int64, checkpoint index k
    checkpoint_steps: np.ndarray  # (K,) int64

    def save(self, path: str | Path) -> Path:
        np.savez(
            path,
            sample_id=self.sample_id.astype(str),
            timestep=self.timestep,
            noise_seed=self.noise_seed,
            step=self.step,
            interval=self.interval,
            checkpoint_steps=self.checkpoint_steps,
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingEventLog:
        try:
            with np.load(path, allow_pickle=False) as archive:
                return cls(**{key: archive[key] for key in cls.__dataclass_fields__})
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(
                f"training-event log {str(path)!r} cannot be read ({exc}); give the events.npz the demo trainer wrote."
            ) from exc

    def __len__(self) -> int:
        return int(self.timestep.shape[0])
