"""Featurization across processes: torchrun workers, work stealing with claims and leases, killed workers.

Relations, not numbers: two torchrun workers write the store one process writes (bit for bit, same
threads per process); a worker killed for good mid-shard leaves its shards to the others, which finish
the same store; a stale claim is taken over by exactly one worker, a live one by none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.errors import ConfigError
from retrac.indexer import FeatureStore
from retrac.indexer.claims import Claim, ShardClaims
from retrac.indexer.location import open_location
from retrac.indexer.workers import available_cores

N = 12
OPTIONS = [
    "--events",
    "stratified:2",
    "--projector",
    "dense",
    "--dim",
    "16",
    "--shard-rows",
    "2",
    "--batch-size",
    "2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny checkpoints, ``N`` images in a .npz, and the store one process writes (1 thread)."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoints = [
        resolve_checkpoint(
            save_checkpoint(make_tiny_unet(seed=k), make_scheduler(), root / f"ckpt-{k}", 0.1, 5 * (k + 1))
        )
        for k in range(2)
    ]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((N, 1, 8, 8), generator=generator) * 2 - 1
    ImageDataset(images, [f"img-{i:02d}" for i in range(N)], source="test").save_npz(root / "train.npz")
    world = {"root": root, "checkpoints": checkpoints, "npz": root / "train.npz"}
    reference = root / "reference"
    assert main(index_args(world, reference, "--threads", "1")) == 0
    world["reference"] = reference
    return world


def index_args(world, out, *extra) -> list[str]:
    args = ["index", "--data", str(world["npz"]), "--out", str(out), "--no-progress", *OPTIONS]
    for checkpoint in world["checkpoints"]:
        args += ["--checkpoint", f"{checkpoint.path}={checkpoint.weight}"]
    return [*args, *extra]


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def environment(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def test_launch_two_torchrun_workers_equal_one_process_bit_for_bit(world, tmp_path):
    """``retrac index --launch 2`` runs torchrun's module (``torchrun --nproc-per-node 2 -m retrac index ...
    --shard auto``, the documented launcher) and exits with its status; the store equals one process's."""
    threads = max(1, available_cores() // 2)  # the default of each of 2 local workers
    single = tmp_path / "single"
    assert main(index_args(world, single, "--threads", str(threads))) == 0
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "retrac", *index_args(world, out, "--launch", "2")]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = next(line for line in done.stderr.splitlines() if "launching 2 workers" in line)
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m retrac index" in launched
    assert launched.endswith("--shard auto") and "--launch" not in launched  # workers steal shards
    assert done.stdout.count("complete") == 2  # each worker waits until the store is whole
    assert f"{threads} torch threads" in done.stdout  # cores / LOCAL_WORLD_SIZE by default
    store = FeatureStore.open(out)
    assert store.is_complete
    assert tree_bytes(out) == tree_bytes(single)  # no claim is left behind either
    # a worker's failure is the launcher's exit status: 2 for bad input, one line each, no traceback
    failing = [sys.executable, "-m", "retrac", *index_args(world, tmp_path / "bad", "--launch=2")]
    failing[failing.index(str(world["npz"]))] = str(tmp_path / "missing.npz")
    failed = subprocess.run(failing, env=environment(), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "missing.npz' does not exist" in failed.stderr and "exited with status 2" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_launch_refuses_a_static_split_and_a_memory_store(world, tmp_path, capsys):
    assert main(index_args(world, tmp_path / "a", "--launch", "2", "--shard", "0/2")) == 2
    assert "--launch starts --shard auto workers itself" in capsys.readouterr().err
    assert main(index_args(world, "memory://x", "--launch", "2")) == 2
    assert "memory:// store lives in one process" in capsys.readouterr().err
    assert main(index_args(world, tmp_path / "b", "--launch", "0")) == 2
    assert "at least 1" in capsys.readouterr().err


def test_worker_arguments_drop_every_spelling_of_launch():
    from retrac.cli.launch import worker_arguments

    argv = ["index", "--out", "s", "--launch", "2", "--lau=3", "--layout", "full", "--launc", "4"]
    assert worker_arguments(argv) == ["index", "--out", "s", "--layout", "full"]


DYING_WORKER = """
import os, sys
from retrac.indexer import FeatureStore
original = FeatureStore._write_region
def dying_write(array, start, stop, data):
    print("dying in rows", start, stop, flush=True)
    os._exit(17)  # killed for good in the middle of its first shard: its claim stays behind
FeatureStore._write_region = staticmethod(dying_write)
from retrac.cli import main
sys.exit(main({argv!r}))
"""


def test_a_killed_worker_s_shards_are_finished_by_the_other_two(world, tmp_path):
    out = tmp_path / "stolen"
    argv = index_args(world, out, "--shard", "auto", "--threads", "1", "--lease", "30")
    env = environment(OMP_NUM_THREADS="1")
    script = textwrap.dedent(DYING_WORKER.format(argv=argv))
    dying = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    claims = out / "claims"
    deadline = time.monotonic() + 120
    while not (claims.is_dir() and any(claims.rglob("*.json"))) and dying.poll() is None:
        assert time.monotonic() < deadline, "the first worker never claimed a shard"
        time.sleep(0.05)
    others = [
        subprocess.Popen([sys.executable, "-m", "retrac", *argv], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert dying.wait(timeout=120) == 17
    assert "dying in rows" in dying.stdout.read()
    for worker in others:
        assert worker.wait(timeout=300) == 0
        assert "complete" in worker.stdout.read()
    # its claim was taken over at once (its process is gone); the store is the one-process store
    assert FeatureStore.open(out).is_complete
    assert tree_bytes(out) == tree_bytes(world["reference"])


def claim_record(host: str, pid: int, expires: float) -> str:
    return json.dumps(
        {"owner": f"{host}:{pid}:x", "host": host, "pid": pid, "expires": expires, "lease_seconds": 5}
    )


@pytest.mark.parametrize("url", ["local", "memory://claims-test"])
def test_a_stale_claim_is_taken_over_by_exactly_one_worker(tmp_path, url):
    location = open_location(tmp_path / "store" if url == "local" else url)
    first, second = ShardClaims(location, 5.0), ShardClaims(location, 5.0)
    try:
        assert first.try_acquire(0, 3)
        assert not second.try_acquire(0, 3)  # live: held by a process of this machine that exists
        assert first.still_holds(0, 3)
        # a claim of another machine whose lease ran out: one of two takers gets generation 1
        location.write_text(Claim(0, 4, 0).key, claim_record("elsewhere", 1, time.time() - 1))
        newest = first.generations(0)
        assert newest == {3: 0, 4: 0}
        assert [first.try_acquire(0, 4, newest[4]), second.try_acquire(0, 4, newest[4])] == [True, False]
        assert first.held[(0, 4)].generation == 1
        # a claim of another machine within its lease is left alone
        location.write_text(Claim(0, 5, 0).key, claim_record("elsewhere", 1, time.time() + 60))
        assert not second.try_acquire(0, 5)
        # a claim of this machine whose process is gone is stale at once, lease or not
        gone = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        location.write_text(Claim(0, 6, 0).key, claim_record(first.host, int(gone.stdout), time.time() + 60))
        assert second.try_acquire(0, 6)
        first.release(0, 4, finished=True)  # the finished shard's claims are all removed
        assert 4 not in first.generations(0)
        assert not first.still_holds(0, 4)
    finally:
        first.close()
        second.close()
    # left: the other machine's live claim, and the stale generation 0 of shard 6 (an unfinished shard's
    # release drops only the releasing worker's own generation)
    assert ShardClaims(location).generations(0) == {5: 0, 6: 0}


def test_the_lease_is_renewed_while_the_shard_is_computed(tmp_path):
    location = open_location(tmp_path)
    claims = ShardClaims(location, 0.3)
    try:
        assert claims.try_acquire(1, 0)
        before = json.loads(location.read_text(Claim(1, 0, 0).key))["expires"]
        time.sleep(0.5)
        after = json.loads(location.read_text(Claim(1, 0, 0).key))["expires"]
        assert after > before
    finally:
        claims.close()
    assert location.read_text(Claim(1, 0, 0).key) is None  # close releases what it still held
    with pytest.raises(ConfigError, match="lease"):
        ShardClaims(location, 0)
