"""``featurize_dataset``: dataset x checkpoints x events -> the feature store (resumable, sharded)."""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrac.checkpoints import Checkpoint, load_scheduler, load_unet, resolve_checkpoint, with_scheduler
from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, ConfigError
from retrac.events import EventPlan
from retrac.indexer.config import IndexConfig
from retrac.indexer.store import FORMAT_NAME, FORMAT_VERSION, FeatureStore, chunk_rows_for
from retrac.projection import make_projector, projected_gradients
from retrac.task import DEFAULT_DEVICE, DiffusionTask

FLOAT16_MAX = float(np.finfo(np.float16).max)
VERSIONED_PACKAGES = ("retrac", "torch", "diffusers", "zarr", "numpy", "traker")


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (or ``(I, N)``) -> ``(I, N)`` with ``0 <= I < N``; ``None`` -> ``(0, 1)``.

    ``"auto"`` takes ``I`` and ``N`` from ``RANK`` and ``WORLD_SIZE``, as ``torchrun`` sets them.

    Raises:
        ConfigError: not of the form ``I/N``, or ``I`` outside ``[0, N)``; ``auto`` outside torchrun.
    """
    if spec is None:
        return 0, 1
    if spec == "auto":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "--shard auto reads RANK and WORLD_SIZE, which are not set; launch with torchrun or give --shard I/N."
            )
        spec = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
    if isinstance(spec, str):
        index, sep, count = spec.partition("/")
        try:
            if not sep:
                raise ValueError
            spec = (int(index), int(count))
        except ValueError:
            raise ConfigError(
                f"--shard {spec!r} is not I/N; e.g. --shard 0/4 for the first of 4 processes."
            ) from None
    index, count = int(spec[0]), int(spec[1])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"--shard {index}/{count} is out of range; I must lie in [0, N) with N >= 1, e.g. 0/{max(count, 1)}."
        )
    return index, count


def resolve_device(device: str | torch.device) -> torch.device:
    """``--device`` as a ``torch.device`` that exists here (``"cuda"`` under torchrun: ``cuda:LOCAL_RANK``).

    Raises:
        ConfigError: not a torch device name, or a CUDA / MPS device this machine does not have.
    """
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun process
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"--device {device!r} is not a torch device; give cpu, cuda, cuda:N or mps."
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ConfigError(
                f"--device {device!r}: this machine has {count} CUDA device(s); use --device cpu."
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device!r}: MPS is not available here; use --device cpu.")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r} is not supported; give cpu, cuda, cuda:N or mps.")
    return resolved


def _versions() -> dict:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _load_task(
    checkpoint: Checkpoint, config: IndexConfig, device: torch.device, scheduler=None
) -> DiffusionTask:
    model = load_unet(checkpoint.path).to(device)
    scheduler = scheduler if scheduler is not None else load_scheduler(checkpoint.path)
    return DiffusionTask(model, scheduler, config.objective, config.include or None, config.exclude or None)


def store_attributes(
    config: IndexConfig,
    task: DiffusionTask,
    plan: EventPlan,
    projectors: list[dict],
    checkpoints: list[Checkpoint],
    data: ImageDataset,
) -> dict:
    """The root attributes a featurization writes (and compares when it reopens a store)."""
    num_events, dim = plan.num_events, projectors[0]["dim"]
    itemsize = np.dtype(config.dtype).itemsize
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "config": config.store_dict(),
        "task": task.to_dict(),
        "projectors": projectors,
        "norm_kind": projectors[0]["norm_kind"],
        "events": plan.describe(),
        "checkpoints": [c.to_dict() for c in checkpoints],
        "dataset": {
            "num_samples": len(data),
            "fingerprint": data.fingerprint,
            "has_labels": data.labels is not None,
            "source": data.source,
        },
        "layout": {
            "num_samples": len(data),
            "num_events": num_events,
            "dim": dim,
            "dtype": config.dtype,
            "shard_rows": config.shard_rows,
            "chunk_rows": chunk_rows_for(config.shard_rows, num_events * dim * itemsize),
            "num_shards": -(-len(data) // config.shard_rows),
        },
        "versions": _versions(),
    }


def featurize_dataset(
    checkpoints: Sequence[Checkpoint | str | Path],
    data: ImageDataset | str | Path,
    out: str | Path,
    config: IndexConfig | None = None,
    shard: str | tuple[int, int] | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    progress: bool = True,
) -> FeatureStore:
    """Compute ``phi_k(z, e)`` and ``n_k(z, e)`` for every sample, event and checkpoint into a store.

    docs/design.md sections 1 and 3: for checkpoint ``k`` with projection ``P_k`` and every training sample
    ``z`` with events ``E_k(z)`` (``S`` per sample), stores ``features[k][z, e] = P_k grad l(theta_k; z, e)``
    and ``norms[k][z, e] = ||grad l(theta_k; z, e)||``. The TracIn / ReTrac train vectors are the
    (normalised) means over events, formed later by the query side.

    Rerunning the same call resumes: shards in the ledger are skipped, others are rewritten whole,
    and the finished store is bit-identical to an uninterrupted run. With ``shard=(I, N)`` this
    process fills only shards ``s`` with ``s % N == I``; processes with disjoint ``I`` may run at
    the same time on one store.

    Args:
        checkpoints: ``Checkpoint`` objects or ``PATH[=WEIGHT]`` specs, in training order.
        data: the training set (an :class:`ImageDataset` or a path ``load_dataset`` reads); its
            labels go to class-conditional models.
        out: the store folder (created if needed).
        config: the settings (default :class:`IndexConfig`).
        shard: ``"I/N"`` or ``(I, N)``: this process's share of the shards (default all); ``"auto"``
            under ``torchrun`` (``RANK`` / ``WORLD_SIZE``).
        device: where gradients are computed (``"cpu"``, ``"cuda"``, ...); ``"cuda"`` under torchrun
            means ``cuda:LOCAL_RANK``.
        progress: show a tqdm progress bar.

    Returns:
        The store, opened for reading (complete once every ``--shard`` share has run).

    Raises:
        ConfigError: bad settings, ``--shard`` out of range, ``dim`` above the parameter count,
            an unwritable ``out``.
        CheckpointError: unreadable checkpoints or ones with different parameter counts.
        DataError: unreadable data, or a replay log that does not cover the data set.
        StoreMismatchError: ``out`` holds a store made with other settings (each difference named).
        GradientError: a non-finite gradient (names the sample and the event).
    """
    config = config or IndexConfig()
    shard_index, shard_count = parse_shard(shard)
    device = resolve_device(device)
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data)
    resolved = [
        with_scheduler(c if isinstance(c, Checkpoint) else resolve_checkpoint(c)) for c in checkpoints
    ]
    if not resolved:
        raise CheckpointError("no checkpoint given; pass --checkpoint PATH[=WEIGHT] at least once.")
    for checkpoint in resolved[1:]:  # every checkpoint is featurized with checkpoint 0's scheduler
        differ = sorted(
            key
            for key in set(checkpoint.scheduler) | set(resolved[0].scheduler)
            if checkpoint.scheduler.get(key) != resolved[0].scheduler.get(key)
        )
        if differ:
            raise CheckpointError(
                f"checkpoint {checkpoint.path!r} has another scheduler than {resolved[0].path!r} "
                f"(differing: {', '.join(differ)}); give checkpoints of one training run."
            )

    task = _load_task(resolved[0], config, device)
    task.check_images(dataset.images[:1], name=f"data {dataset.source!r}")
    plan = config.schedule.plan(
        dataset.ids, task.num_train_timesteps, config.seed, [c.step for c in resolved]
    )
    projectors = [
        make_projector(config.projector, task, config.dim, config.seed, k, config.dense_backend).to_dict()
        for k in range(len(resolved))
    ]
    attrs = store_attributes(config, task, plan, projectors, resolved, dataset)
    store = FeatureStore.create_or_open(out, attrs, dataset.ids)
    if store.ids_problem() is not None:  # a damaged ids chunk: the data set's ids are the recorded ones
        store.rewrite_ids(dataset.ids)

    owned = [s for s in range(store.num_shards) if s % shard_count == shard_index]
    todo = {k: _shards_to_compute(store, k, owned) for k in range(len(resolved))}
    total = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for shards in todo.values() for s in shards)
    bar = tqdm(total=total, desc=f"index {Path(out).name}", unit="sample", disable=not progress)
    for k, checkpoint in enumerate(resolved):
        if not todo[k]:
            continue
        if k > 0:
            task = _load_task(checkpoint, config, device, task.scheduler)
            if task.num_parameters != attrs["task"]["num_parameters"]:
                raise CheckpointError(
                    f"checkpoint {checkpoint.path!r} counts {task.num_parameters} parameters, checkpoint 0 counts "
                    f"{attrs['task']['num_parameters']}; give checkpoints of one model."
                )
        projector = make_projector(config.projector, task, config.dim, config.seed, k, config.dense_backend)
        bar.set_postfix(checkpoint=k)
        for shard_id in todo[k]:
            start, stop = store.shard_range(shard_id)
            _featurize_shard(store, task, projector, plan, dataset, config, k, shard_id, start, stop, bar)
    bar.close()
    return FeatureStore.open(out)


def _shards_to_compute(store: FeatureStore, k: int, owned: list[int]) -> list[int]:
    """The shards of ``owned`` that checkpoint ``k`` still needs: not in the ledger, or failing their digest.

    A shard whose ledger entry exists is read back and checked (docs/design.md section 3: resume recomputes
    damaged shards); a failing one loses its entry and is recomputed whole.
    """
    done = store.completed_shards(k)
    todo = []
    for shard in owned:
        problem = store.shard_problem(k, shard) if shard in done else "not computed"
        if problem is None:
            continue
        if shard in done:
            warnings.warn(f"recomputing shard {shard} of checkpoint {k}: {problem}", stacklevel=3)
            store.drop_ledger_entry(k, shard)
        todo.append(shard)
    return todo


def _featurize_shard(store, task, projector, plan, dataset, config, k, shard_id, start, stop, bar) -> None:
    """Compute rows ``[start, stop)`` at checkpoint ``k`` in batches and write the shard whole."""
    S, d = plan.num_events, projector.dim
    features = np.zeros((stop - start, S, d), dtype=np.float32)
    norms = np.zeros((stop - start, S), dtype=np.float32)
    timesteps = np.zeros((stop - start, S), dtype=np.int64)
    valid = np.zeros((stop - start, S), dtype=bool)
    for begin in range(start, stop, config.batch_size):
        rows = list(range(begin, min(begin + config.batch_size, stop)))
        events = plan.events(k, rows)
        labels = None if dataset.labels is None else dataset.labels[rows]
        feats, norm = projected_gradients(
            task,
            projector,
            dataset.images[rows],
            torch.from_numpy(events.timesteps),
            events.noise(task.sample_shape),
            class_labels=labels if task.is_class_conditional else None,
            sample_ids=[dataset.ids[r] for r in rows],
            valid=torch.from_numpy(events.valid),
        )
        local = slice(begin - start, begin - start + len(rows))
        features[local], norms[local] = feats.numpy(), norm.numpy()
        timesteps[local], valid[local] = events.timesteps, events.valid
        bar.update(len(rows))
    if config.dtype == "float16" and np.abs(features).max(initial=0) > FLOAT16_MAX:
        raise ConfigError(
            f"features of checkpoint {k}, rows {start}-{stop} exceed the float16 range "
            f"(max |phi| = {np.abs(features).max():.3g}); use --dtype float32."
        )
    store.write_shard(k, shard_id, features, norms, timesteps, valid)
