"""Training functions for ``retrac lds``: ``train(subset_indices, out_dir)`` retrains one model.

A training function receives the training-set rows of one subset, ``(n,)`` int64 in ascending
order, and an empty folder. It trains a model on exactly those rows and leaves in the folder a
checkpoint that :func:`find_model_checkpoint` finds: the folder itself (``unet/`` + ``scheduler/``
as :func:`retrac.checkpoints.save_checkpoint` writes, or a ``save_pretrained`` folder), or
``checkpoints/checkpoint-STEP/`` (the highest step is taken; the demo trainer writes this). It must
be deterministic: a resumed LDS run equals an uninterrupted one only if a retrained model does.

Three forms: any Python callable; :class:`DemoTrainer` (the demo's DDPM recipe, built in); and
:class:`CommandTrainer`, which runs a user's command with the subset file and the folder.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from retrac.data import ImageDataset
from retrac.demo import DemoConfig, train_ddpm
from retrac.errors import CheckpointError, ConfigError

TrainFunction = Callable[[np.ndarray, Path], None]

SUBSET_FILENAME = "subset.txt"
COMMAND_LOG = "train.log"
COMMAND_PLACEHOLDERS = ("{subset_file}", "{out_dir}")
LOG_TAIL_LINES = 20


def find_model_checkpoint(out_dir: str | Path) -> Path:
    """The checkpoint a training function left in ``out_dir``.

    Raises:
        CheckpointError: ``out_dir`` holds neither a model (``unet/``, ``config.json``) nor
            ``checkpoints/checkpoint-STEP/`` folders.
    """
    out_dir = Path(out_dir)
    if (out_dir / "unet").is_dir() or (out_dir / "config.json").is_file():
        return out_dir
    steps = []
    for folder in (out_dir / "checkpoints").glob("checkpoint-*"):
        suffix = folder.name.rpartition("-")[2]
        if folder.is_dir() and suffix.isdigit():
            steps.append((int(suffix), folder))
    if not steps:
        raise CheckpointError(
            f"the training function left no model in {str(out_dir)!r}: save the trained model there "
            "(retrac.checkpoints.save_checkpoint(model, scheduler, out_dir), or unet.save_pretrained(out_dir)) "
            "or as out_dir/checkpoints/checkpoint-STEP/."
        )
    return max(steps)[1]


class DemoTrainer:
    """The demo's DDPM recipe (:func:`retrac.demo.train_ddpm`) on rows of ``data``.

    Every subset model starts from the same initialisation and uses the same per-step timestep and
    noise draws (all from ``config.seed``); only the training rows differ. With
    ``config.epochs`` fixed, a model of a half subset takes half the optimizer steps of the full set.

    Args:
        data: the full training set; subsets index its rows.
        config: the recipe (default :class:`~retrac.demo.DemoConfig` with one checkpoint: only the
            final model is measured).
        device: torch device of the training (not recorded in the manifest).
    """

    def __init__(self, data: ImageDataset, config: DemoConfig | None = None, device: str = "cpu") -> None:
        self.data = data
        self.config = config or DemoConfig(num_checkpoints=1)
        self.device = device

    def __call__(self, subset_indices: np.ndarray, out_dir: Path) -> None:
        subset = self.data.subset(np.asarray(subset_indices))
        train_ddpm(subset, self.config, out_dir, progress=False, device=self.device)

    def to_dict(self) -> dict:
        return {"kind": "demo", "config": asdict(self.config)}


class CommandTrainer:
    """Runs a user's training command once per subset.

    ``{subset_file}`` becomes a text file with the subset's training rows (0-based row numbers of
    the data set given to ``retrac lds --data``), one per line; ``{out_dir}`` the empty folder the
    model must be saved in (see :func:`find_model_checkpoint`). The command is split like a shell
    line (``shlex``) but run without a shell; its output goes to ``out_dir/train.log``.

    Args:
        command: e.g. ``"python train.py --rows {subset_file} --out {out_dir}"``.

    Raises:
        ConfigError: a placeholder is missing, or the command cannot be split.
    """

    def __init__(self, command: str) -> None:
        missing = [p for p in COMMAND_PLACEHOLDERS if p not in command]
        if missing:
            raise ConfigError(
                f"--train-command {command!r} lacks {' and '.join(missing)}; write it as "
                '"cmd {subset_file} {out_dir}" (the subset\'s row file and the folder to save the model in).'
            )
        try:
            self.argv = shlex.split(command)
        except ValueError as error:
            raise ConfigError(f"--train-command {command!r} cannot be split into words ({error}).") from None
        self.command = command

    def __call__(self, subset_indices: np.ndarray, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        subset_file = out_dir / SUBSET_FILENAME
        subset_file.write_text("".join(f"{int(row)}\n" for row in subset_indices))
        argv = [
            word.replace("{subset_file}", str(subset_file)).replace("{out_dir}", str(out_dir))
            for word in self.argv
        ]
        log = out_dir / COMMAND_LOG
        try:
            with open(log, "wb") as handle:
                status = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
        except OSError as error:
            raise ConfigError(
                f"--train-command {self.command!r} cannot be started ({error.strerror}: {argv[0]!r}); "
                "give a command on PATH or its full path."
            ) from None
        if status != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            raise ConfigError(
                f"--train-command exited with status {status} for {out_dir.name}; fix the command and rerun "
                f"(finished models are kept and reused). Last lines of its output:\n{tail}"
            )

    def to_dict(self) -> dict:
        return {"kind": "command", "command": self.command}


def describe_trainer(train: TrainFunction) -> dict:
    """What a run's manifest records about its training function (and compares on reopening).

    A trainer with ``to_dict()`` describes itself; a plain callable is recorded by its qualified
    name (a changed body under the same name cannot be detected: use a new ``--out`` then).
    """
    if hasattr(train, "to_dict"):
        return train.to_dict()
    name = getattr(train, "__qualname__", type(train).__qualname__)
    return {"kind": "callable", "name": f"{getattr(train, '__module__', '?')}.{name}"}
