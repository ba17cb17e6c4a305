"""The indexer: dataset x checkpoints x events -> Zarr store; resume, split, mismatch, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import load_scheduler, load_unet, resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, ConfigError, DataError, GradientError, StoreMismatchError
from retrac.events import TrainingEventLog, event_noise_seed, noise_from_seed
from retrac.indexer import (
    FeatureStore,
    IndexConfig,
    default_threads,
    featurize_dataset,
    parse_shard,
    plan_shards,
)
from retrac.indexer.workers import ShardPlan
from retrac.projection import projected_gradients
from retrac.task import DiffusionTask

N = 10


SMALL = {"events": "stratified:2", "projector": "dense", "dim": 32, "shard_rows": 4, "batch_size": 3}
PROJECTORS = ("dense", "factored")  # resume, split and batch-size relations hold for both


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny checkpoints (steps 5 and 10) and a labelled data set of ``N`` images saved as .npz."""
    root = tmp_path_factory.mktemp("indexer")
    checkpoints = []
    for k in range(2):
        path = save_checkpoint(
            make_tiny_unet(seed=k), make_scheduler(), root / f"checkpoint-{k}", 0.1, 5 * (k + 1)
        )
        checkpoints.append(resolve_checkpoint(path))
    generator = torch.Generator().manual_seed(0)
    data = ImageDataset(
        torch.rand((N, 1, 8, 8), generator=generator) * 2 - 1,
        [f"img-{i:02d}" for i in range(N)],
        torch.arange(N) % 3,
        source="test",
    )
    data.save_npz(root / "train.npz")
    # the stores record the data source, so every run reads the same file (as the CLI does)
    return {
        "root": root,
        "checkpoints": checkpoints,
        "data": load_dataset(root / "train.npz"),
        "npz": root / "train.npz",
    }


def run(ws, out, checkpoints=None, **overrides):
    options = {**SMALL, **overrides}
    shard = options.pop("shard", None)
    checkpoints = ws["checkpoints"] if checkpoints is None else checkpoints
    return featurize_dataset(checkpoints, ws["npz"], out, IndexConfig(**options), shard=shard, progress=False)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def references(workspace, tmp_path_factory):
    """``references(projector)``: one uninterrupted run per projector, built on first use: the store
    the split and resumed runs must equal bit for bit."""
    built = {}

    def reference_for(projector: str) -> FeatureStore:
        if projector not in built:
            out = tmp_path_factory.mktemp(f"reference-{projector}") / "store"
            built[projector] = run(workspace, out, projector=projector)
            assert built[projector].attrs["projectors"][0]["kind"] == projector
        return built[projector]

    return reference_for


@pytest.fixture(scope="module")
def reference(references):
    return references("dense")


def test_store_layout_and_attributes(reference, workspace):
    store = FeatureStore.open(reference.path)
    assert store.is_complete and store.missing() == []
    assert (store.num_samples, store.num_checkpoints, store.num_events, store.dim) == (N, 2, 2, 32)
    assert store.ids == workspace["data"].ids
    assert store.features(1, slice(2, 5)).shape == (3, 2, 32) and store.features(0).dtype == np.float32
    assert store.norms(0).shape == (N, 2) and (store.norms(0) > 0).all() and store.valid(0).all()
    attrs = store.attrs
    assert attrs["format"] == {"name": "retrac-feature-store", "version": 2}
    assert attrs["dataset"]["fingerprint"] == workspace["data"].fingerprint
    assert [c["sha256"] for c in attrs["checkpoints"]] == [c.sha256 for c in workspace["checkpoints"]]
    assert attrs["norm_kind"] == "exact" and len({p["seed"] for p in attrs["projectors"]}) == 2
    assert {"torch", "zarr", "diffusers"} <= set(attrs["versions"])
    blocks = list(store.blocks(0))
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 10)]
    np.testing.assert_array_equal(np.concatenate([b.features for b in blocks]), store.features(0))
    assert store.fingerprint == FeatureStore.open(reference.path).fingerprint


def test_exact_store_equals_autograd_one_sample_at_a_time(workspace, tmp_path):
    checkpoint = workspace["checkpoints"][1]
    store = run(
        workspace,
        tmp_path / "exact",
        [checkpoint],
        projector="exact",
        dim=None,
        events="uniform:2",
        shard_rows=5,
    )
    task = DiffusionTask(load_unet(checkpoint.path), load_scheduler(checkpoint.path))
    assert store.dim == task.num_parameters
    data = workspace["data"]
    for row in (0, 7):
        for event, t in enumerate((0, 50)):  # uniform:2 with T = 100
            assert store.timesteps(0)[row, event] == t
            noise = noise_from_seed(event_noise_seed(0, 0, data.ids[row], event), (1, 8, 8))
            task.model.zero_grad(set_to_none=True)
            task.per_sample_objective(
                data.images[row : row + 1], torch.tensor([t]), noise[None]
            ).sum().backward()
            grad = torch.cat([p.grad.reshape(-1) for p in task.selected_parameters().values()])
            np.testing.assert_allclose(store.features(0)[row, event], grad.numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(store.norms(0)[row, event], float(grad.norm()), rtol=1e-5)


def test_query_side_projector_reproduces_stored_features(reference, workspace):
    store = FeatureStore.open(reference.path)
    checkpoint = workspace["checkpoints"][0]
    task = DiffusionTask(load_unet(checkpoint.path), load_scheduler(checkpoint.path))
    data = workspace["data"]
    rows = [1, 2]
    timesteps = torch.from_numpy(store.timesteps(0)[rows].astype(np.int64))
    noise = torch.stack(
        [
            torch.stack(
                [noise_from_seed(event_noise_seed(0, 0, data.ids[r], j), (1, 8, 8)) for j in range(2)]
            )
            for r in rows
        ]
    )
    features, norms = projected_gradients(task, store.projector(0, task), data.images[rows], timesteps, noise)
    np.testing.assert_allclose(features.numpy(), store.features(0)[rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norms.numpy(), store.norms(0)[rows], rtol=1e-5)
    narrower = DiffusionTask(task.model, task.scheduler, include=["conv_out.*"])
    with pytest.raises(StoreMismatchError, match="include/exclude"):
        store.projector(0, narrower)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_batch_size_does_not_change_results(references, workspace, tmp_path, projector):
    reference = references(projector)
    other = run(
        workspace, tmp_path / "batch", workspace["checkpoints"][:1], projector=projector, batch_size=4
    )
    for k in range(1):
        np.testing.assert_allclose(other.features(k), reference.features(k), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(other.norms(k), reference.norms(k), rtol=1e-5)
        np.testing.assert_array_equal(other.timesteps(k), reference.timesteps(k))


def test_float16_store_is_close_to_float32(reference, workspace, tmp_path):
    half = run(workspace, tmp_path / "half", workspace["checkpoints"][:1], dtype="float16")
    assert half._array(0, "features").dtype == np.float16
    np.testing.assert_allclose(half.features(0), reference.features(0), rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(half.norms(0), reference.norms(0))


@pytest.mark.parametrize("projector", PROJECTORS)
def test_two_shard_processes_equal_one(references, workspace, tmp_path, projector):
    reference = references(projector)
    out = tmp_path / "split"
    first = run(workspace, out, projector=projector, shard="0/2")
    assert not first.is_complete
    assert first.missing() == [(0, 1), (1, 1)]  # 3 shards: this process owns 0 and 2
    with pytest.raises(DataError, match="incomplete"):
        first.require_complete()
    second = run(workspace, out, projector=projector, shard=(1, 2))
    assert second.is_complete
    assert tree_bytes(out) == tree_bytes(reference.path)


KILLED_RUN = """
import os, sys
from retrac.indexer import FeatureStore
writes = {{"n": 0}}
original = FeatureStore._write_region
def dying_write(array, start, stop, data):
    writes["n"] += 1
    if writes["n"] > {limit}:
        os._exit(17)  # killed mid-shard: some arrays of this shard written, no ledger entry
    original(array, start, stop, data)
FeatureStore._write_region = staticmethod(dying_write)
from retrac.cli import main
sys.exit(main({argv!r}))
"""


def cli_args(ws, out, *extra, projector="dense"):
    args = ["index", "--data", str(ws["npz"]), "--out", str(out), "--no-progress"]
    for checkpoint in ws["checkpoints"]:
        args += ["--checkpoint", f"{checkpoint.path}={checkpoint.weight}"]
    return args + [
        "--events",
        "stratified:2",
        "--projector",
        projector,
        "--dim",
        "32",
        "--shard-rows",
        "4",
        "--batch-size",
        "3",
        "--threads",
        "1",  # the library runs it is compared with use the suite's one thread (bits depend on threads)
        *extra,
    ]


@pytest.mark.parametrize("projector", PROJECTORS)
def test_killed_run_resumes_to_a_bit_identical_store(references, workspace, tmp_path, projector):
    reference = references(projector)
    out = tmp_path / "killed"
    argv = cli_args(workspace, out, projector=projector)
    script = textwrap.dedent(KILLED_RUN.format(limit=6, argv=argv))  # 4 writes per shard: dies in shard 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == 17, killed.stderr
    torn = FeatureStore.open(out)
    assert torn.completed_shards(0) == {0} and not torn.is_complete
    assert (torn.timesteps(0, slice(4, 8)) == -1).all()  # shard 1 is torn: features written, timesteps not
    assert main(argv) == 0
    resumed = FeatureStore.open(out)
    assert resumed.is_complete
    assert tree_bytes(out) == tree_bytes(reference.path)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_rerunning_a_complete_store_changes_nothing(references, workspace, projector):
    reference = references(projector)
    before = tree_bytes(reference.path)
    run(workspace, reference.path, projector=projector)
    assert tree_bytes(reference.path) == before


def test_reopening_with_other_settings_names_every_difference(reference, workspace, tmp_path):
    checkpoints = workspace["checkpoints"]
    reweighted = [checkpoints[0], resolve_checkpoint(checkpoints[1].path, weight=0.3)]
    with pytest.raises(StoreMismatchError) as error:
        featurize_dataset(
            reweighted, workspace["data"], reference.path, IndexConfig(**{**SMALL, "dim": 16}), progress=False
        )
    message = str(error.value)
    assert "config.dim: stored 32, given 16" in message
    assert "checkpoints[1].weight: stored 0.1, given 0.3" in message
    other_data = workspace["data"].subset(list(range(N - 1)))
    with pytest.raises(StoreMismatchError, match="dataset.fingerprint"):
        featurize_dataset(checkpoints, other_data, reference.path, IndexConfig(**SMALL), progress=False)
    with pytest.raises(StoreMismatchError, match="config.events.kind: stored 'stratified', given 'uniform'"):
        run(workspace, reference.path, events="uniform:2")


def test_replay_pads_with_a_validity_mask(workspace, tmp_path):
    ids = workspace["data"].ids
    # interval 0 (checkpoint at step 5): every sample once, img-03 twice; interval 1: every sample once
    sample_id = ids + ["img-03"] + ids
    interval = [0] * (N + 1) + [1] * N
    step = [1] * N + [2] + [6] * N
    timestep = list(range(N)) + [99] + list(range(50, 50 + N))
    log = TrainingEventLog(
        sample_id=np.array(sample_id),
        timestep=np.array(timestep),
        noise_seed=np.arange(2 * N + 1) + 1000,
        step=np.array(step),
        interval=np.array(interval),
        checkpoint_steps=np.array([5, 10]),
    )
    log_path = log.save(tmp_path / "events.npz")
    store = run(workspace, tmp_path / "replay", events=f"replay:{log_path}")
    assert store.num_events == 2
    valid, timesteps = store.valid(0), store.timesteps(0)
    assert valid[3].all() and valid.sum() == N + 1 and store.valid(1).sum() == N
    assert timesteps[3].tolist() == [3, 99] and timesteps[0].tolist() == [0, -1]
    assert store.timesteps(1)[:, 0].tolist() == list(range(50, 50 + N))
    assert (store.features(0)[~valid] == 0).all() and (store.norms(0)[valid] > 0).all()

    uncovered = TrainingEventLog(**{**log.__dict__, "sample_id": np.array(["other"] * (2 * N + 1))})
    uncovered_path = uncovered.save(tmp_path / "uncovered.npz")
    with pytest.raises(DataError, match="has no event for 10 of 10 samples in any interval"):
        run(workspace, tmp_path / "uncovered", events=f"replay:{uncovered_path}")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"shard": "2/2"}, ConfigError, "out of range"),
        ({"shard": "1"}, ConfigError, "is not I/N"),
        ({"dim": 10**9}, ConfigError, r"must lie in \[1, 44969\]"),
        ({"projector": "exact", "dim": 12}, ConfigError, "drop --dim"),
        ({"projector": "sketch"}, ConfigError, "projector='sketch' is unknown"),
        ({"dtype": "int8"}, ConfigError, "dtype='int8'"),
        ({"batch_size": 0}, ConfigError, "batch_size=0"),
        ({"events": "stratified:1000"}, ConfigError, "T=100"),
        ({"events": "5,500"}, ConfigError, r"\[0, 100\)"),
        ({"include": ("nothing.*",)}, ConfigError, "select no trainable parameter"),
    ],
)
def test_bad_settings_raise(workspace, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run(workspace, tmp_path / "bad", **overrides)
    assert not (tmp_path / "bad").exists() or "shard" in overrides


def test_bad_outputs_and_inputs_raise(workspace, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(workspace, blocker)
    with pytest.raises(ConfigError, match="give a writable path"):
        run(workspace, blocker / "store")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a retrac store"):
        run(workspace, tmp_path / "busy")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        featurize_dataset([], workspace["data"], tmp_path / "none", IndexConfig(**SMALL), progress=False)
    with pytest.raises(DataError, match="not a retrac feature store"):
        FeatureStore.open(tmp_path / "busy")
    with pytest.raises(ConfigError, match="shard"):
        parse_shard("-1/2")


def test_shard_specs_static_slurm_and_work_stealing(monkeypatch):
    assert parse_shard(None) == (0, 1) and parse_shard((1, 4)) == (1, 4) and parse_shard("3/4") == (3, 4)
    assert plan_shards("auto") == ShardPlan("claims") and plan_shards(None) == ShardPlan("all")
    assert plan_shards("1/3") == ShardPlan("static", 1, 3) and plan_shards("0/1") == ShardPlan("all")
    with pytest.raises(ConfigError, match="work stealing"):
        parse_shard("auto")
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("slurm")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")  # sbatch --array=4-7: the second of four tasks
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("slurm") == (1, 4)


def test_default_threads_split_the_cores_between_local_workers(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert default_threads(None) == 8 and default_threads("auto") == 8
    assert default_threads("1/2") == 4  # two processes started by hand on this machine
    assert default_threads("0/16") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node 4
    assert default_threads("auto") == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # a SLURM task has its own CPUs (its affinity mask)
    assert default_threads("1/2") == 8


def test_nan_gradients_name_the_sample_and_nothing_is_marked_complete(workspace, tmp_path):
    model = make_tiny_unet()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    path = save_checkpoint(model, make_scheduler(), tmp_path / "diverged")
    with pytest.raises(
        GradientError, match=r"sample 'img-00' at event 0 \(timestep \d+\) is NaN or infinite"
    ):
        run(workspace, tmp_path / "store", [resolve_checkpoint(path)])
    assert FeatureStore.open(tmp_path / "store").completed_shards(0) == set()


CONDITIONAL_INCLUDE = ("class_embedding.*", "conv_out.*")  # 169 parameters: exact gradients stay small


def conditional_gradient(model, scheduler, image, t: int, noise, label: int) -> np.ndarray:
    """Reference without retrac: ``x_t`` by hand, the UNet called with ``class_labels``, plain autograd
    over the ``CONDITIONAL_INCLUDE`` parameters in model order."""
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * image + (1 - alpha_bar).sqrt() * noise
    out = model(x_t[None], torch.tensor([t]), class_labels=torch.tensor([label])).sample[0]
    params = [p for n, p in model.named_parameters() if n.startswith(("class_embedding.", "conv_out."))]
    grads = torch.autograd.grad(((out - noise) ** 2).mean(), params)
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


def test_class_conditional_models_get_the_labels(workspace, tmp_path):
    model, scheduler = make_tiny_unet(num_class_embeds=3), make_scheduler()
    path = save_checkpoint(model, scheduler, tmp_path / "conditional")
    config = IndexConfig(**{**SMALL, "projector": "exact", "dim": None, "include": CONDITIONAL_INCLUDE})
    store = featurize_dataset([path], workspace["npz"], tmp_path / "store", config, progress=False)
    assert store.is_complete and (store.norms(0) > 0).all()
    data = workspace["data"]
    labels = data.labels.tolist()
    assert sorted(set(labels)) == [0, 1, 2]
    # every row's stored gradient is the one taken with that row's own label, not another
    for row in range(N):
        for event in range(2):
            t = int(store.timesteps(0)[row, event])
            noise = noise_from_seed(event_noise_seed(0, 0, data.ids[row], event), (1, 8, 8))
            args = (model, scheduler, data.images[row], t, noise)
            own = conditional_gradient(*args, labels[row])
            np.testing.assert_allclose(store.features(0)[row, event], own, rtol=1e-4, atol=1e-6)
            other = conditional_gradient(*args, (labels[row] + 1) % 3)
            assert np.linalg.norm(store.features(0)[row, event] - other) > 1e-2 * np.linalg.norm(own)
    unlabelled = ImageDataset(workspace["data"].images, workspace["data"].ids)
    with pytest.raises(DataError, match="class-conditional"):
        featurize_dataset([path], unlabelled, tmp_path / "unlabelled", IndexConfig(**SMALL), progress=False)


def test_cli_index_reports_and_fails_cleanly(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(cli_args(workspace, out, "--shard", "1/2")) == 0
    printed = capsys.readouterr().out
    assert "N=10 samples x K=2 checkpoints x S=2 events, d=32" in printed and "left for other" in printed
    fingerprint = FeatureStore.open(out).fingerprint
    assert fingerprint in printed
    assert main(cli_args(workspace, out, "--dim", "16")) == 2
    assert "config.dim: stored 32, given 16" in capsys.readouterr().err
    assert main(cli_args(workspace, tmp_path / "x", "--shard", "3/2")) == 2
    assert json.loads((out / "zarr.json").read_text())["attributes"]["config"]["dim"] == 32
