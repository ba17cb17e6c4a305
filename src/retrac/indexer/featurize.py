"""``featurize_dataset``: dataset x checkpoints x events -> the feature store (resumable, sharded)."""

from __future__ import annotations

import importlib.metadata
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrac.checkpoints import Checkpoint, resolve_checkpoint
from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, ConfigError, StoreDamagedError
from retrac.events import EventPlan
from retrac.indexer.claims import DEFAULT_LEASE_SECONDS, ShardClaims
from retrac.indexer.config import IndexConfig
from retrac.indexer.inputs import TrainingInputs
from retrac.indexer.layout import COMPACT_VECTOR_KINDS, chunk_rows_for
from retrac.indexer.store import FORMAT_NAME, FORMAT_VERSION, FeatureStore
from retrac.indexer.workers import ShardPlan, plan_shards
from retrac.pipeline import ModelParts, checkpoint_scheduler, checkpoint_task, with_pipeline_scheduler
from retrac.projection import make_projector, projected_gradients
from retrac.task import DEFAULT_DEVICE, DiffusionTask

FLOAT16_MAX = float(np.finfo(np.float16).max)
VERSIONED_PACKAGES = ("retrac", "torch", "diffusers", "zarr", "numpy", "traker")


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
    checkpoint: Checkpoint,
    config: IndexConfig,
    device: torch.device,
    scheduler=None,
    parts: ModelParts | None = None,
    like: DiffusionTask | None = None,
) -> DiffusionTask:
    """Checkpoint ``k``'s task; ``like`` (checkpoint 0's task) lends its VAE and text encoder."""
    if scheduler is None:
        scheduler = checkpoint_scheduler(checkpoint.path, parts)
    frozen = None if like is None else (like.latent_encoder, like.prompt_encoder)
    include, exclude = config.include or None, config.exclude or None
    return checkpoint_task(
        checkpoint.path, scheduler, config.objective, include, exclude, parts, device, frozen
    )


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
    width = num_events if config.layout == "full" else len(COMPACT_VECTOR_KINDS)  # rows of the big array
    layout = {
        "num_samples": len(data),
        "num_events": num_events,
        "dim": dim,
        "dtype": config.dtype,
        "shard_rows": config.shard_rows,
        "chunk_rows": chunk_rows_for(config.shard_rows, width * dim * itemsize),
        "num_shards": -(-len(data) // config.shard_rows),
    }
    if config.layout != "full":  # full stores keep the attributes they had before layouts existed
        layout["kind"] = config.layout
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
            # absolute, so that it can be found again after a move (retrac.relocate)
            "source": str(Path(data.source).absolute())
            if data.source and Path(data.source).exists()
            else data.source,
            **data.record(),  # pixel range, class map, labels file: how to read the data again the same way
        },
        "layout": layout,
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
    threads: int | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    parts: ModelParts | None = None,
) -> FeatureStore:
    """Compute ``phi_k(z, e)`` and ``n_k(z, e)`` for every sample, event and checkpoint into a store.

    docs/design.md sections 1 and 3: for checkpoint ``k`` with projection ``P_k`` and every training sample
    ``z`` with events ``E_k(z)`` (``S`` per sample), stores ``features[k][z, e] = P_k grad l(theta_k; z, e)``
    and ``norms[k][z, e] = ||grad l(theta_k; z, e)||``. The TracIn / ReTrac train vectors are the
    (normalised) means over events, formed later by the query side.

    Rerunning the same call resumes: shards in the ledger are skipped, others are rewritten whole,
    and the finished store is bit-identical to an uninterrupted run. With ``shard=(I, N)`` this
    process fills only shards ``s`` with ``s % N == I``; processes with disjoint ``I`` may run at
    the same time on one store. With ``shard="auto"`` every process claims unfinished shards
    (work stealing, :mod:`retrac.indexer.claims`) until the store is complete, taking over the claims
    of dead workers; the store is bit-identical to a one-process run with the same threads.

    Args:
        checkpoints: ``Checkpoint`` objects or ``PATH[=WEIGHT]`` specs, in training order.
        data: the training set (an :class:`ImageDataset` or a path ``load_dataset`` reads); its
            labels go to class-conditional models.
        out: the store folder or URL (``s3://``, ``gs://``, ``memory://``, ``file://``; created if needed).
        config: the settings (default :class:`IndexConfig`).
        shard: ``"I/N"`` or ``(I, N)``: this process's share of the shards (default all); ``"slurm"``:
            ``I/N`` from the SLURM job array; ``"auto"``: work stealing (:mod:`retrac.indexer.workers`).
        device: where gradients are computed (``"cpu"``, ``"cuda"``, ...); ``"cuda"`` under torchrun
            means ``cuda:LOCAL_RANK``.
        progress: show a tqdm progress bar.
        threads: torch CPU threads during the call (default: torch's setting; the CLI passes
            :func:`~retrac.indexer.workers.default_threads`). Features are bit-identical between runs
            with the same threads per process; across thread counts they differ by float rounding.
        lease_seconds: how long a claim of ``shard="auto"`` lasts without renewal.
        parts: where a latent or text model's VAE and text encoder, or LoRA checkpoints' base
            model, are when not beside the checkpoints (:class:`~retrac.pipeline.ModelParts`).
            A latent model's training latents are encoded once into ``latents.npz`` in the store.

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
    if threads is None:
        return _featurize(checkpoints, data, out, config, shard, device, progress, lease_seconds, parts)
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r} must be a positive integer.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _featurize(checkpoints, data, out, config, shard, device, progress, lease_seconds, parts)
    finally:
        torch.set_num_threads(previous)  # the caller's torch is left as it was


def _featurize(
    checkpoints, data, out, config, shard, device, progress, lease_seconds, parts=None
) -> FeatureStore:
    config = config or IndexConfig()
    shard_plan = plan_shards(shard)
    device = resolve_device(device)
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data)
    resolved = [
        with_pipeline_scheduler(c if isinstance(c, Checkpoint) else resolve_checkpoint(c), parts)
        for c in checkpoints
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

    task = _load_task(resolved[0], config, device, parts=parts)
    task.check_images(dataset.images[:1], name=f"data {dataset.source!r}")
    plan = config.schedule.plan(
        dataset.ids, task.num_train_timesteps, config.seed, [c.step for c in resolved]
    )
    projectors = [
        make_projector(config.projector, task, config.dim, config.seed, k, config.dense_backend).to_dict()
        for k in range(len(resolved))
    ]
    attrs = store_attributes(config, task, plan, projectors, resolved, dataset)
    if parts is not None and parts.scheduler is not None:  # --scheduler: queries rebuild it from the record
        attrs["task"]["scheduler_class"] = type(task.scheduler).__name__
    store = FeatureStore.create_or_open(out, attrs, dataset.ids)
    if store.ids_problem() is not None:  # a damaged ids chunk: the data set's ids are the recorded ones
        store.rewrite_ids(dataset.ids)

    models = _Models(resolved, config, device, task, attrs["task"]["num_parameters"], parts)
    local = store.location.path if store.location.is_local else None
    dataset = TrainingInputs(task, dataset, local, progress)  # x (pixels or cached latents) and c per row
    if shard_plan.mode == "claims":
        _featurize_claimed(store, models, plan, dataset, config, lease_seconds, progress, out)
        return FeatureStore.open(out)
    owned = [s for s in range(store.num_shards) if shard_plan.owns(s)]
    todo = {k: _shards_to_compute(store, k, owned) for k in range(len(resolved))}
    total = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for shards in todo.values() for s in shards)
    bar = tqdm(total=total, desc=f"index {_name(store)}", unit="sample", disable=not progress)
    for k in range(len(resolved)):
        if not todo[k]:
            continue
        task, projector = models.at(k)
        bar.set_postfix(checkpoint=k)
        for shard_id in todo[k]:
            start, stop = store.shard_range(shard_id)
            _featurize_shard(store, task, projector, plan, dataset, config, k, shard_id, start, stop, bar)
    bar.close()
    return FeatureStore.open(out)


def _name(store: FeatureStore) -> str:
    return store.url.rstrip("/").rpartition("/")[2]


class _Models:
    """The task and projector of one checkpoint at a time, loaded when a shard of it is computed."""

    def __init__(
        self, resolved: list[Checkpoint], config: IndexConfig, device, task, num_parameters: int, parts=None
    ):
        self.resolved, self.config, self.device = resolved, config, device
        self.k, self.task, self.projector = 0, task, None
        self.num_parameters, self.parts = num_parameters, parts

    def at(self, k: int):
        """``(task, projector)`` of checkpoint ``k`` (every checkpoint keeps checkpoint 0's scheduler)."""
        if k != self.k:
            checkpoint = self.resolved[k]
            self.task = _load_task(
                checkpoint, self.config, self.device, self.task.scheduler, self.parts, like=self.task
            )
            self.k, self.projector = k, None
            if self.task.num_parameters != self.num_parameters:
                raise CheckpointError(
                    f"checkpoint {checkpoint.path!r} counts {self.task.num_parameters} parameters, checkpoint 0 "
                    f"counts {self.num_parameters}; give checkpoints of one model."
                )
        if self.projector is None:
            c = self.config
            self.projector = make_projector(c.projector, self.task, c.dim, c.seed, k, c.dense_backend)
        return self.task, self.projector


def _verification_share() -> ShardPlan:
    """Which finished shards this worker re-checks on a resumed ``--shard auto`` run (each one once
    under torchrun, by ``RANK`` of ``WORLD_SIZE``; all of them when started by hand)."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit() and int(rank) < int(world):
        return ShardPlan("static", int(rank), int(world))
    return ShardPlan("all")


def _featurize_claimed(store, models, plan, dataset, config, lease_seconds, progress, out) -> None:
    """``--shard auto``: claim unfinished shards until every shard of every checkpoint is in the ledger.

    A worker that finds every unfinished shard claimed by a live worker waits (polls) until they
    finish or their leases lapse, then takes those over; so the store is complete when any worker
    returns, even if others were killed.
    """
    share = _verification_share()
    for k in range(store.num_checkpoints):  # a resumed run re-checks finished shards (each worker its share)
        _shards_to_compute(store, k, [s for s in store.completed_shards(k) if share.owns(s)])
    claims = ShardClaims(store.location, lease_seconds)
    poll = min(2.0, lease_seconds / 4)
    missing = store.missing()
    total = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for _, s in missing)
    bar = tqdm(total=total, desc=f"index {_name(store)}", unit="sample", disable=not progress)
    try:
        while missing:
            progressed = False
            for k in sorted({k for k, _ in missing}):
                newest = claims.generations(k)
                for shard in (s for kk, s in missing if kk == k):
                    if claims.try_acquire(k, shard, newest.get(shard)):
                        progressed = True
                        _claimed_shard(store, models, plan, dataset, config, claims, k, shard, bar)
            missing = store.missing()
            if missing and not progressed:
                time.sleep(poll)  # every unfinished shard is held by a live worker
    finally:
        claims.close()
        bar.close()


def _claimed_shard(store, models, plan, dataset, config, claims, k: int, shard: int, bar) -> None:
    """Compute a claimed shard unless another worker finished it meanwhile; release the claim."""
    finished = False
    try:
        try:
            done = store.ledger_entry(k, shard) is not None
        except StoreDamagedError:
            store.drop_ledger_entry(k, shard)
            done = False
        if not done:
            task, projector = models.at(k)
            start, stop = store.shard_range(shard)
            bar.set_postfix(checkpoint=k)
            _featurize_shard(
                store,
                task,
                projector,
                plan,
                dataset,
                config,
                k,
                shard,
                start,
                stop,
                bar,
                may_publish=lambda: claims.still_holds(k, shard),
            )
        finished = True
    finally:
        claims.release(k, shard, finished)


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


def _featurize_shard(
    store,
    task,
    projector,
    plan,
    dataset,
    config,
    k,
    shard_id,
    start,
    stop,
    bar,
    may_publish: Callable[[], bool] | None = None,
) -> None:
    """Compute rows ``[start, stop)`` at checkpoint ``k`` in batches and write the shard whole.

    ``may_publish`` (work stealing) is asked before writing: ``False`` means the claim was taken over
    by another worker, which writes the same bytes, so this one's result is dropped.
    """
    S, d = plan.num_events, projector.dim
    features = np.zeros((stop - start, S, d), dtype=np.float32)
    norms = np.zeros((stop - start, S), dtype=np.float32)
    timesteps = np.zeros((stop - start, S), dtype=np.int64)
    valid = np.zeros((stop - start, S), dtype=bool)
    for begin in range(start, stop, config.batch_size):
        rows = list(range(begin, min(begin + config.batch_size, stop)))
        events = plan.events(k, rows)
        samples, conditioning = dataset.batch(task, rows)  # TrainingInputs: pixels or latents, and c
        feats, norm = projected_gradients(
            task,
            projector,
            samples,
            torch.from_numpy(events.timesteps),
            events.noise(task.sample_shape),
            conditioning,
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
    if may_publish is not None and not may_publish():
        warnings.warn(
            f"shard {shard_id} of checkpoint {k} was taken over by another worker (this one's lease ran out); "
            "its result is left to that worker.",
            stacklevel=2,
        )
        return
    store.write_shard(k, shard_id, features, norms, timesteps, valid)
