"""Output folders are published whole: a writer killed at any write point leaves the old complete
folder or the new complete one, never a mix (``retrac._io.publish_directory``).

The kills run in ``tests/kill_points.py`` (a fresh interpreter that forks one child per write point
and ``os._exit``\\ s it just before that point, as ``kill -9`` would).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac._io import publish_directory
from retrac.checkpoints import save_checkpoint
from retrac.data import ImageDataset
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.query.attribution import build_attribution_index

HELPER = Path(__file__).with_name("kill_points.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    ckpt = save_checkpoint(make_tiny_unet(seed=1), make_scheduler(), root / "ckpt", 0.5, 10)
    generator = torch.Generator().manual_seed(2)
    train = ImageDataset(torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1, [f"t{i}" for i in range(8)])
    train.save_npz(root / "train.npz")
    config = IndexConfig(events="stratified:1", projector="dense", dim=8, shard_rows=4)
    store = featurize_dataset([str(ckpt)], root / "train.npz", root / "store", config, progress=False)
    build_attribution_index(store, root / "old-index", "tracin", index="flat", progress=False)
    ImageDataset(torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1, ["q0", "q1"]).save_npz(
        root / "queries.npz"
    )
    return root


def snapshot(folder: Path, *aliases: Path) -> dict[str, bytes]:
    """Every visible file of a folder (relative path: bytes, with its own path and ``aliases``, the
    folders it was copied from, written ``<OUT>``); hidden temporaries are no part of it."""

    def content(path: Path) -> bytes:
        data = path.read_bytes()
        for name in (folder, *aliases):
            data = data.replace(str(name).encode(), b"<OUT>")
        return data

    return {
        str(p.relative_to(folder)): content(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def kill_everywhere(writer: str, kwargs: dict, template: Path, work: Path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(HELPER), writer, json.dumps(kwargs), str(template), str(work)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["points"]


def test_a_rebuild_killed_at_every_write_point_leaves_the_old_or_the_new_index(world, tmp_path):
    from retrac.indexer import FeatureStore
    from retrac.query.index import load_index
    from retrac.query.provenance import derive_method

    points = kill_everywhere(
        "build_index", {"store": str(world / "store"), "method": "trak"}, world / "old-index", tmp_path
    )
    assert len(points) >= 8, points  # files, digests, manifest, the exchange, the clean-up
    assert any(p.startswith("write_index") for p in points) and any(p.startswith("_exchange") for p in points)
    old, new = snapshot(world / "old-index"), snapshot(tmp_path / "run-done" / "target")
    assert old != new and "kernel.npz" in new and "kernel.npz" not in old
    store = FeatureStore.open(world / "store")
    seen = set()
    for n, point in enumerate(points):
        target = tmp_path / f"run-{n}" / "target"
        assert target.is_dir(), f"killed before {point!r}: the index folder is gone"
        state = snapshot(target)
        assert state in (old, new), f"killed before {point!r}: a mixed folder {sorted(state)}"
        seen.add("new" if state == new else "old")
        method, _ = derive_method(
            target, json.loads((target / "manifest.json").read_text()), load_index(target), store
        )
        assert method.name == ("trak" if state == new else "tracin")
    assert seen == {"old", "new"}  # the switch happens at one point, in one step
    flips = [
        n
        for n in range(1, len(points))
        if snapshot(tmp_path / f"run-{n}" / "target") != snapshot(tmp_path / f"run-{n - 1}" / "target")
    ]
    assert len(flips) == 1, flips


def test_the_next_publish_removes_what_a_killed_writer_left(world, tmp_path):
    points = kill_everywhere(
        "build_index", {"store": str(world / "store"), "method": "retrac"}, world / "old-index", tmp_path
    )
    leftovers = [
        p.name
        for n in range(len(points))
        for p in (tmp_path / f"run-{n}").iterdir()
        if p.name.startswith(".")
    ]
    assert leftovers  # kills inside the staging folder leave it behind, hidden
    victim = next(
        n
        for n in range(len(points))
        if any(p.name.startswith(".") for p in (tmp_path / f"run-{n}").iterdir())
    )
    target = tmp_path / f"run-{victim}" / "target"
    build_attribution_index(world / "store", target, "retrac", index="flat", progress=False)
    assert [p.name for p in target.parent.iterdir()] == ["target"]


def test_an_audit_rerun_killed_at_every_write_point_leaves_the_old_or_the_new_audit(world, tmp_path):
    from retrac.audit import AuditConfig, run_audit
    from retrac.query.attribution import QueryEvents

    first = tmp_path / "first"
    run_audit(
        world / "old-index",
        first,
        images=world / "queries.npz",
        config=AuditConfig(k=3, num_neighbours=2),
        query_events=QueryEvents(1, 1),
        progress=False,
    )
    points = kill_everywhere(
        "audit",
        {"index": str(world / "old-index"), "images": str(world / "queries.npz")},
        first,
        tmp_path / "runs",
    )
    old, new = snapshot(first), snapshot(tmp_path / "runs" / "run-done" / "target", first)
    assert old != new  # another k and neighbour count: other records and summary
    for n, point in enumerate(points):
        target = tmp_path / "runs" / f"run-{n}" / "target"
        assert snapshot(target, first) in (old, new), f"killed before {point!r}: a mixed audit folder"


def test_publish_directory_keeps_the_old_folder_on_an_error(tmp_path):
    target = tmp_path / "out"
    with publish_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), publish_directory(target) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert snapshot(target) == {"a.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with publish_directory(target) as staging:
        (staging / "b.txt").write_text("new")
    assert snapshot(target) == {"b.txt": b"new"}  # the whole folder is replaced, not merged


def test_a_folder_that_is_not_an_index_is_never_replaced_by_an_index(world, tmp_path):
    from retrac.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an index folder"):
        build_attribution_index(world / "store", tmp_path, "tracin", index="flat", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "nothing", ignore_errors=True)
