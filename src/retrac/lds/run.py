"""An LDS run folder: seeded subsets, one cached retrained model per subset, cached test losses.

Layout of ``out``::

    manifest.json                     format, config, data fingerprint, trainer, every subset's rows
    models/NAME/                      one retrained model, published whole (retrac._io.publish_directory)
    models/NAME/lds_model.json        its training rows' sha256, row count and training seconds
    losses/IMAGES/NAME.npy            (n_images, E) float64 loss of each image at each loss event
    losses/IMAGES/events.json         the loss events and the images' fingerprint

``NAME`` is ``subset-MMM`` for the random subsets, ``full`` for the whole training set and
``without-HASH`` for the counterfactual check's removals; ``IMAGES`` is the first 16 hex digits of
the images' sha256. A finished model is reused, never retrained; a killed run leaves at most a
hidden ``.NAME.tmp-*`` folder, which is ignored, and rerunning the same call resumes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from retrac._io import atomic_save_npy, atomic_write_json, publish_directory, read_json, record_differences
from retrac.checkpoints import load_scheduler, load_unet
from retrac.data import ImageDataset, load_dataset
from retrac.errors import ConfigError, DataError, StoreMismatchError
from retrac.events import derive_seed
from retrac.lds.trainers import TrainFunction, describe_trainer, find_model_checkpoint
from retrac.query.attribution import QueryEvents
from retrac.task import DiffusionTask

FORMAT = {"name": "retrac-lds", "version": 1}
MANIFEST = "manifest.json"
MODEL_RECORD = "lds_model.json"
LOSS_OBJECTIVES = ("loss", "l1")
LOSS_BATCH_ROWS = 4096  # model inputs per forward pass when measuring losses
MIN_SUBSETS = 3  # a Spearman correlation across fewer subsets is meaningless


@dataclass
class LDSConfig:
    """Settings of an LDS run (recorded in its manifest and compared on reopening).

    Attributes:
        num_subsets: ``M``, the random subsets retrained on.
        alpha: the subset fraction; each subset holds ``round(alpha * N)`` distinct training rows.
        seed: seeds the subsets (and the counterfactual check's random removals).
        loss_timesteps: ``T_l`` timesteps of the loss events, ``tau_j = floor((j + 1/2) T / T_l)``.
        loss_noise: ``M_l`` noise draws per timestep.
        loss_seed: seed of the loss noise, drawn with the query-event convention
            (:class:`~retrac.query.attribution.QueryEvents`, checkpoint 0), the same for every image and
            every model (common random numbers). Default 1, unlike the attribution queries' 0, so the
            measurement does not reuse the noise the scores were computed with.
        objective: ``loss`` (mean squared error to the prediction target) or ``l1``.
    """

    num_subsets: int = 32
    alpha: float = 0.5
    seed: int = 0
    loss_timesteps: int = 50
    loss_noise: int = 4
    loss_seed: int = 1
    objective: str = "loss"

    def __post_init__(self) -> None:
        if not isinstance(self.num_subsets, int) or self.num_subsets < MIN_SUBSETS:
            raise ConfigError(
                f"num_subsets={self.num_subsets!r}: give at least {MIN_SUBSETS} subsets (LDS correlates across them)."
            )
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha={self.alpha!r} must lie in (0, 1), e.g. 0.5 for half subsets.")
        if self.objective not in LOSS_OBJECTIVES:
            raise ConfigError(
                f"objective={self.objective!r} is not a loss; choose one of {', '.join(LOSS_OBJECTIVES)}."
            )
        _ = self.loss_events  # QueryEvents validates the event counts

    @property
    def loss_events(self) -> QueryEvents:
        """The ``T_l x M_l`` loss events."""
        return QueryEvents(self.loss_timesteps, self.loss_noise, self.loss_seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> LDSConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def draw_subsets(num_samples: int, num_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """``(num_subsets, round(alpha * num_samples))`` int64 training rows, each row sorted, seeded.

    Raises:
        ConfigError: a subset would be empty or the whole set.
    """
    size = round(alpha * num_samples)
    if not 1 <= size < num_samples:
        raise ConfigError(
            f"alpha={alpha} of {num_samples} training samples gives subsets of {size}; choose alpha so that "
            "a subset holds at least one sample and not all of them."
        )
    rng = np.random.default_rng(derive_seed("retrac-lds-subsets", seed))
    return np.stack([np.sort(rng.choice(num_samples, size, replace=False)) for _ in range(num_subsets)])


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of a set of training rows (sorted, int64)."""
    return hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()


def images_sha256(images: Tensor, labels: Tensor | None = None) -> str:
    """sha256 of test images (shape and float32 bytes) and their labels."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().float().numpy().tobytes())
    if labels is not None:
        digest.update(torch.as_tensor(labels).long().numpy().tobytes())
    return digest.hexdigest()


class LDSRun:
    """Creates or reopens an LDS run folder; trains, caches and measures the retrained models.

    Args:
        out: the run folder (created; reopened to resume).
        data: the training set (an :class:`~retrac.data.ImageDataset` or a path ``load_dataset`` reads).
        train: the training function ``train(subset_indices, out_dir)`` (see :mod:`retrac.lds.trainers`).
        config: the settings (default :class:`LDSConfig`).
        scheduler: the noise scheduler of the loss; default the one saved with each model.
        device: torch device of the loss measurement.
        progress: show tqdm progress bars.

    Raises:
        StoreMismatchError: ``out`` holds a run made with other settings, data or trainer (each
            difference named).
    """

    def __init__(
        self,
        out: str | Path,
        data: ImageDataset | str | Path,
        train: TrainFunction,
        config: LDSConfig | None = None,
        scheduler=None,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        self.path = Path(out)
        self.data = data if isinstance(data, ImageDataset) else load_dataset(data)
        self.train = train
        self.config = config or LDSConfig()
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.progress = progress
        self.trained: list[str] = []  # models this object trained (not found finished on disk)
        subsets = draw_subsets(len(self.data), self.config.num_subsets, self.config.alpha, self.config.seed)
        manifest = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "data": {
                "num_samples": len(self.data),
                "fingerprint": self.data.fingerprint,
                "source": self.data.source,
            },
            "trainer": describe_trainer(train),
            "subset_size": int(subsets.shape[1]),
            "subsets": subsets.tolist(),
        }
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            found = read_json(manifest_path, "LDS run manifest", StoreMismatchError)
            differences = record_differences(manifest, found)
            if differences:
                raise StoreMismatchError(
                    f"{self.path} holds an LDS run made with other settings: {'; '.join(differences[:5])}; "
                    "rerun with the same settings to resume, or give another --out."
                )
        else:
            atomic_write_json(manifest_path, manifest)
        self.subsets = subsets
        self.manifest = manifest

    # ------------------------------------------------------------------ subsets
    @property
    def num_samples(self) -> int:
        return len(self.data)

    @property
    def subset_names(self) -> list[str]:
        return [f"subset-{m:03d}" for m in range(self.config.num_subsets)]

    def masks(self) -> np.ndarray:
        """``(M, N)`` bool: ``masks[m, z]`` is whether training row ``z`` is in subset ``m``."""
        out = np.zeros((self.config.num_subsets, self.num_samples), dtype=bool)
        for m, rows in enumerate(self.subsets):
            out[m, rows] = True
        return out

    # ------------------------------------------------------------------ models
    def model(self, name: str, rows: np.ndarray) -> Path:
        """The checkpoint of the model trained on ``rows``, trained (and published) if missing.

        Raises:
            StoreMismatchError: ``models/NAME`` was trained on other rows.
        """
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if rows.ndim != 1 or rows.size == 0 or rows[0] < 0 or rows[-1] >= self.num_samples:
            raise DataError(
                f"model {name!r}: training rows must be a non-empty list in [0, {self.num_samples})."
            )
        if np.unique(rows).size != rows.size:
            raise DataError(f"model {name!r}: training rows repeat; give each row once.")
        folder = self.path / "models" / name
        digest = rows_sha256(rows)
        if not folder.is_dir():
            started = time.perf_counter()
            with publish_directory(folder) as staging:
                self.train(rows, staging)
                find_model_checkpoint(staging)  # refuse to publish a folder without a model
                record = {
                    "name": name,
                    "rows_sha256": digest,
                    "num_rows": int(rows.size),
                    "train_seconds": round(time.perf_counter() - started, 3),
                }
                atomic_write_json(staging / MODEL_RECORD, record)
            self.trained.append(name)
        record = read_json(folder / MODEL_RECORD, f"model record of {name}", StoreMismatchError)
        if record.get("rows_sha256") != digest:
            raise StoreMismatchError(
                f"{folder} was trained on other training rows than asked for; remove it or give another --out."
            )
        return find_model_checkpoint(folder)

    def train_subset_models(self) -> list[Path]:
        """Train every subset model not yet finished; the checkpoints in subset order."""
        paths = []
        bar = tqdm(self.subset_names, desc="subset models", unit="model", disable=not self.progress)
        for name, rows in zip(bar, self.subsets, strict=True):
            paths.append(self.model(name, rows))
        return paths

    # ------------------------------------------------------------------ losses
    def model_losses(
        self, name: str, rows: np.ndarray, images: Tensor, class_labels: Tensor | None = None
    ) -> np.ndarray:
        """Each image's loss at each loss event on model ``name`` (trained on ``rows`` if missing).

        Returns:
            ``(n_images, T_l * M_l)`` float64; event ``j * M_l + m`` is timestep ``tau_j``, noise ``m``.
        """
        images = torch.as_tensor(images, dtype=torch.float32)
        folder = self._loss_folder(images, class_labels)
        cached = folder / f"{name}.npy"
        checkpoint = self.model(name, rows)
        if cached.is_file():
            return np.load(cached)
        losses = self._measure(checkpoint, images, class_labels)
        atomic_save_npy(cached, losses)
        return losses

    def losses(self, images: Tensor, class_labels: Tensor | None = None) -> np.ndarray:
        """``(M, n_images)`` float64: each image's mean loss over the loss events on each subset model."""
        out = []
        bar = tqdm(self.subset_names, desc="subset losses", unit="model", disable=not self.progress)
        for name, rows in zip(bar, self.subsets, strict=True):
            out.append(self.model_losses(name, rows, images, class_labels).mean(axis=1))
        return np.stack(out)

    def _loss_folder(self, images: Tensor, class_labels: Tensor | None) -> Path:
        digest = images_sha256(images, class_labels)
        folder = self.path / "losses" / digest[:16]
        record = {
            "images_sha256": digest,
            "num_images": int(images.shape[0]),
            "events": self.config.loss_events.to_dict(),
            "objective": self.config.objective,
        }
        if (folder / "events.json").is_file():
            found = read_json(folder / "events.json", "loss record", StoreMismatchError)
            differences = record_differences(record, found)
            if differences:
                raise StoreMismatchError(f"{folder} holds other losses: {'; '.join(differences)}; remove it.")
        else:
            atomic_write_json(folder / "events.json", record)
        return folder

    @torch.no_grad()
    def _measure(self, checkpoint: Path, images: Tensor, class_labels: Tensor | None) -> np.ndarray:
        scheduler = self.scheduler if self.scheduler is not None else load_scheduler(checkpoint)
        task = DiffusionTask(load_unet(checkpoint).to(self.device), scheduler, self.config.objective)
        task.check_images(images, "test images")
        events = self.config.loss_events
        taus = torch.from_numpy(events.timesteps(task.num_train_timesteps))
        noise = events.noise(0, tuple(images.shape[1:])).flatten(0, 1)  # (E, C, H, W), row j * M_l + m
        timesteps = taus.repeat_interleave(events.num_noise)  # (E,)
        num_events = noise.shape[0]
        per_batch = max(1, LOSS_BATCH_ROWS // num_events)
        out = np.zeros((images.shape[0], num_events), dtype=np.float64)
        for start in range(0, images.shape[0], per_batch):
            batch = images[start : start + per_batch]
            b = batch.shape[0]
            labels = None
            if task.is_class_conditional:
                labels = torch.as_tensor(class_labels)[start : start + b].repeat_interleave(num_events)
            values = task.per_sample_objective(
                batch.repeat_interleave(num_events, dim=0).to(self.device),
                timesteps.repeat(b).to(self.device),
                noise.repeat(b, 1, 1, 1).to(self.device),
                labels,
            )
            out[start : start + b] = values.double().cpu().numpy().reshape(b, num_events)
        if not np.isfinite(out).all():
            raise DataError(
                f"the model {checkpoint} gives a non-finite loss on a test image; check its training."
            )
        return out
