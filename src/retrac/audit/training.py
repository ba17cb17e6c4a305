"""The training side of an audit: the store's training data, self-influence, whether the model samples.

Self-influence needs no generated image: ``SI(z) = sum_k w_k ||u_k(z)||^2`` with ``u_k`` the TracIn
train vector of the store, the TracIn score ``I(z, z)`` of a sample on itself with its training
events as query events (the inner product of its TracIn vector with itself in the score's metric).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, DataError, StoreMismatchError
from retrac.query.attribution import train_vector_blocks
from retrac.query.vectors import Method


def self_influence(store) -> np.ndarray:
    """``SI(z) = sum_k w_k ||u_k(z)||^2`` of every training row, ``(N,)`` float64 (TracIn vectors ``u_k``).

    The TracIn score ``I(z, z)`` of each training sample on itself, its training events serving as
    query events: large values mark samples whose loss gradients stay large across checkpoints.
    """
    weights = np.asarray(store.weights, dtype=np.float64)
    total = np.zeros(store.num_samples, dtype=np.float64)
    start = 0
    # train_vector_blocks streams U(z) = concat_k(w_k u_k(z)): ||w_k u_k||^2 / w_k = w_k ||u_k||^2
    for block in train_vector_blocks(store, Method.named("tracin")):
        per_checkpoint = (
            (block.astype(np.float64) ** 2).reshape(len(block), len(weights), store.dim).sum(axis=2)
        )
        total[start : start + len(block)] = per_checkpoint @ (1.0 / weights)
        start += len(block)
    return total


def load_recorded_data(path: str | Path, recorded: dict) -> ImageDataset:
    """Training data read the way the store recorded reading it: its pixel range and labels file."""
    labels_file = (recorded.get("labels_file") or {}).get("source")
    return load_dataset(path, pixel_range=recorded.get("pixel_range"), labels=labels_file)


def load_training_data(
    store, data: str | Path | ImageDataset | None = None, source_now: str | Path | None = None
) -> ImageDataset:
    """The training set of ``store``: ``data`` when given, else the source the store recorded (at
    ``source_now`` when the store's folder tree moved: ``Attributor.training_data_path``).

    Raises:
        StoreMismatchError: the data's fingerprint differs from the one the store was built from.
        DataError: no ``data`` given and the recorded source cannot be read.
    """
    recorded = store.attrs.get("dataset", {})
    if data is None:
        source = str(source_now) if source_now is not None else recorded.get("source")
        if not source or not Path(source).exists():
            raise DataError(
                f"the store {str(store.path)!r} records training data {source!r}, which cannot be read here; "
                "give the training data with --data."
            )
        data = source
    train = data if isinstance(data, ImageDataset) else load_recorded_data(data, recorded)
    if train.fingerprint != recorded.get("fingerprint"):
        raise StoreMismatchError(
            f"training data {train.source or 'given'!r} has fingerprint {train.fingerprint[:16]}..., but the store "
            f"{str(store.path)!r} was built from {recorded.get('source')!r} with fingerprint "
            f"{str(recorded.get('fingerprint'))[:16]}...; give the data the store was built from."
        )
    return train


def check_can_sample(task) -> None:
    """Raise ``CheckpointError`` unless ``retrac.sampling.generate_images`` can sample ``task``'s model.

    Sampling needs an unconditional model (a class-conditional one needs labels: audit given images
    instead) and a scheduler with a reverse process (``set_timesteps`` and ``step``).
    """
    scheduler = task.scheduler
    if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
        raise CheckpointError(
            f"the last checkpoint's scheduler {type(scheduler).__name__} has no reverse process (set_timesteps / "
            "step): it cannot sample; audit existing images with --images."
        )
    if task.is_class_conditional:
        raise CheckpointError(
            "the last checkpoint is class-conditional: --generate cannot choose its labels; sample images "
            "yourself and audit them with --images (an .npz with labels)."
        )
    if getattr(task.model.config, "sample_size", None) is None:
        raise CheckpointError("the last checkpoint's model has no sample_size: it cannot sample.")


def self_influence_ranking(self_influences: np.ndarray, ids: Sequence[str]) -> list[dict]:
    """Every training row, highest ``SI(z)`` first: rank (1-based), row, id, self_influence."""
    order = np.argsort(-self_influences, kind="stable")
    return [
        {"rank": rank + 1, "row": int(row), "id": ids[row], "self_influence": float(self_influences[row])}
        for rank, row in enumerate(order)
    ]
