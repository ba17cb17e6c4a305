"""Movable indexes (issue 13, item 7): a project folder moved as a whole still answers queries;
``--store`` / ``--checkpoint`` say where moved parts are, ``--search-path`` finds them by fingerprint /
sha256, and a wrong file is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.relocate import displaced_path, relative_record


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """project/{ckpt-a,ckpt-b,train.npz,queries.npy,store,index}: two checkpoints, 16 samples."""
    root = tmp_path_factory.mktemp("relocate") / "project"
    a = save_checkpoint(make_tiny_unet(seed=3), make_scheduler(), root / "ckpt-a", weight=0.5)
    b = save_checkpoint(make_tiny_unet(seed=4), make_scheduler(), root / "ckpt-b", weight=0.5)
    generator = torch.Generator().manual_seed(2)
    data = ImageDataset(torch.rand(16, 1, 8, 8, generator=generator) * 2 - 1, [f"t{i}" for i in range(16)])
    data.save_npz(root / "train.npz")
    np.save(root / "queries.npy", (torch.rand(2, 8, 8, generator=generator) * 255).to(torch.uint8).numpy())
    argv = ["index", "--checkpoint", str(a), "--checkpoint", str(b), "--data", str(root / "train.npz")]
    argv += ["--out", str(root / "store"), "--events", "stratified:1", "--dim", "16", "--no-progress"]
    assert main(argv) == 0
    build = ["build", "--store", str(root / "store"), "--method", "retrac", "--no-progress"]
    assert main([*build, "--out", str(root / "index")]) == 0
    return root


def _query(index, queries, *extra) -> list[str]:
    return [
        "query",
        "--index",
        str(index),
        "--images",
        str(queries),
        "--k",
        "3",
        "--query-events",
        "fast",
        "--json",
        *extra,
    ]


def _answer(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_relative_records():
    assert relative_record("/a/b/store", "/a/b/index") == "../store"
    assert relative_record("/x/store", "/y/index") is None  # only the file system root in common
    assert relative_record("s3://bucket/store", "/a/index") is None
    assert displaced_path("/old/p/ckpt", "/old/p/store", "/old/p/store") == displaced_path(
        "/old/p/ckpt", None, None
    )


def test_index_queried_after_moving_its_folder_tree(project, tmp_path, capsys):
    manifest = json.loads((project / "index" / "manifest.json").read_text())
    assert manifest["store"]["relative_path"] == "../store"
    expected = _answer(capsys, _query(project / "index", project / "queries.npy"))
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(project, tmp_path / "copy")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "copy").rename(moved)
    # the original stays, so make sure the moved tree is the one read: hide the original's checkpoints
    hidden = project.parent / "hidden"
    project.rename(hidden)
    try:
        got = _answer(capsys, _query(moved / "index", moved / "queries.npy"))
    finally:
        hidden.rename(project)
    assert got["results"] == expected["results"]


def test_store_and_checkpoint_overrides_are_checked(project, tmp_path, capsys):
    # the checkpoints moved on their own: the recorded paths and the tree-relative ones both miss
    tree = tmp_path / "tree"
    shutil.copytree(project, tree, ignore=shutil.ignore_patterns("ckpt-*"))
    shelf = tmp_path / "shelf"
    for name in ("ckpt-a", "ckpt-b"):
        shutil.copytree(project / name, shelf / name)
    hidden = project.parent / "hidden"
    project.rename(hidden)
    try:
        capsys.readouterr()
        assert main(_query(tree / "index", tree / "queries.npy")) == 2
        err = capsys.readouterr().err
        assert (
            "checkpoint 0 of the store" in err
            and "--checkpoint" in err
            and len(err.strip().splitlines()) == 1
        )
        overrides = ["--checkpoint", str(shelf / "ckpt-a"), "--checkpoint", str(shelf / "ckpt-b")]
        got = _answer(capsys, _query(tree / "index", tree / "queries.npy", *overrides))
        assert set(got["results"]) == {"retrac"}
        swapped = ["--checkpoint", str(shelf / "ckpt-b"), "--checkpoint", str(shelf / "ckpt-a")]
        assert main(_query(tree / "index", tree / "queries.npy", *swapped)) == 2
        assert "sha256" in capsys.readouterr().err  # a wrong file is refused, never used
        assert main(_query(tree / "index", tree / "queries.npy", "--checkpoint", str(shelf / "ckpt-a"))) == 2
        assert "1 checkpoint paths given for a store of 2" in capsys.readouterr().err
    finally:
        hidden.rename(project)
    # --store: another place of the same store is taken; a different store is refused by fingerprint
    shutil.copytree(project / "store", tmp_path / "store-copy")
    store_copy = ["--store", str(tmp_path / "store-copy")]
    assert _answer(capsys, _query(project / "index", project / "queries.npy", *store_copy))["results"]
    other = tmp_path / "other-store"
    argv = ["index", "--checkpoint", str(project / "ckpt-a"), "--data", str(project / "train.npz")]
    assert main([*argv, "--out", str(other), "--events", "stratified:1", "--dim", "16", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(_query(project / "index", project / "queries.npy", "--store", str(other))) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_search_path_finds_moved_store_and_checkpoints_by_identity(project, tmp_path, capsys):
    expected = _answer(capsys, _query(project / "index", project / "queries.npy"))
    # the index stays; the store and the checkpoints moved into an unrelated tree, renamed and nested
    index = tmp_path / "index-only" / "index"
    shutil.copytree(project / "index", index)
    shutil.copy(project / "queries.npy", tmp_path / "queries.npy")
    archive = tmp_path / "archive"
    shutil.copytree(project / "store", archive / "features" / "run-1")
    shutil.copytree(project / "ckpt-a", archive / "models" / "first")
    shutil.copytree(project / "ckpt-b", archive / "models" / "second")
    (archive / "models" / "notes").mkdir()
    hidden = project.parent / "hidden"
    project.rename(hidden)
    try:
        capsys.readouterr()
        assert main(_query(index, tmp_path / "queries.npy")) == 2  # nothing where recorded
        assert "is not a retrac feature store" in capsys.readouterr().err
        argv = _query(index, tmp_path / "queries.npy", "--search-path", str(tmp_path / "empty"))
        argv += ["--search-path", str(archive)]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        got = json.loads(out)
        assert f"store found by fingerprint at {archive / 'features' / 'run-1'}" in err
        assert f"checkpoint found by sha256 at {archive / 'models' / 'first'}" in err
        assert f"checkpoint found by sha256 at {archive / 'models' / 'second'}" in err
    finally:
        hidden.rename(project)
    assert got["results"] == expected["results"]


def test_search_path_never_takes_a_different_store(project, tmp_path, capsys):
    index = tmp_path / "lone" / "index"
    shutil.copytree(project / "index", index)
    other = tmp_path / "shelf" / "other-store"
    argv = ["index", "--checkpoint", str(project / "ckpt-a"), "--data", str(project / "train.npz")]
    assert main([*argv, "--out", str(other), "--events", "stratified:1", "--dim", "16", "--no-progress"]) == 0
    hidden = project.parent / "hidden"
    project.rename(hidden)
    try:
        capsys.readouterr()
        assert main(_query(index, hidden / "queries.npy", "--search-path", str(tmp_path / "shelf"))) == 2
        err = capsys.readouterr().err
        assert "no store under --search-path" in err and "fingerprint" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        hidden.rename(project)
