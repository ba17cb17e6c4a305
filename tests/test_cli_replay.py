"""Replay on the quick demo (issue 13, item 10): a sample not trained on in a checkpoint's interval has no
event there and contributes nothing from that interval (u_k(z) = 0); a log that never names a sample is
still refused."""

from __future__ import annotations

import json

import numpy as np

from retrac.cli import main
from retrac.data import load_dataset
from retrac.indexer import FeatureStore
from retrac.query.vectors import train_vectors


def test_replay_of_the_quick_demos_own_log(quick_demo, tmp_path, capsys):
    summary = json.loads((quick_demo / "demo.json").read_text())
    subset = tmp_path / "train-100.npz"
    load_dataset(quick_demo / "train.npz").subset(range(100)).save_npz(subset)
    argv = ["index", "--data", str(subset), "--out", str(tmp_path / "store"), "--dim", "16", "--no-progress"]
    for checkpoint in summary["checkpoints"]:
        argv += ["--checkpoint", checkpoint["path"]]
    assert main([*argv, "--events", f"replay:{quick_demo / 'events.npz'}", "--threads", "1"]) == 0, (
        capsys.readouterr().err
    )
    store = FeatureStore.open(tmp_path / "store")
    untrained = {k: ~store.valid(k).any(axis=1) for k in range(store.num_checkpoints)}
    assert any(
        rows.any() for rows in untrained.values()
    )  # the quick demo leaves some samples out of an interval
    assert not np.logical_and.reduce(list(untrained.values())).any()  # but every sample is in some interval
    for k, rows in untrained.items():
        for kind in ("tracin", "retrac"):
            u = train_vectors(store.features(k), store.norms(k), kind, store.valid(k))
            assert np.isfinite(u).all()
            assert (u[rows] == 0).all() and (np.abs(u[~rows]).sum(axis=1) > 0).all()
    for method in ("tracin", "retrac"):
        out = tmp_path / f"index-{method}"
        assert (
            main(
                [
                    "build",
                    "--store",
                    str(tmp_path / "store"),
                    "--method",
                    method,
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    queries = tmp_path / "q.npz"
    load_dataset(quick_demo / "heldout.npz").subset(range(2)).save_npz(queries)
    argv = ["query", "--index", str(tmp_path / "index-retrac"), "--images", str(queries), "--k", "3"]
    assert main([*argv, "--query-events", "fast", "--json", "--threads", "1"]) == 0


def test_replay_refuses_a_log_that_never_names_the_samples(quick_demo, tmp_path, capsys):
    from retrac.data import ImageDataset

    summary = json.loads((quick_demo / "demo.json").read_text())
    train = load_dataset(quick_demo / "train.npz").subset(range(4))
    strangers = tmp_path / "strangers.npz"
    ImageDataset(train.images, [f"stranger-{i}" for i in range(4)]).save_npz(strangers)
    argv = ["index", "--data", str(strangers), "--out", str(tmp_path / "store"), "--no-progress"]
    argv += [
        "--checkpoint",
        summary["checkpoints"][0]["path"],
        "--events",
        f"replay:{quick_demo / 'events.npz'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no event for 4 of 4 samples in any interval" in err and "--events stratified:S" in err
