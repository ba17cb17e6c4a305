"""`retrac index` -> `retrac build` -> `retrac query --json` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = save_checkpoint(make_tiny_unet(seed=3), make_scheduler(), root / "ckpt", weight=0.5)
    generator = torch.Generator().manual_seed(2)
    data = ImageDataset(torch.rand(20, 1, 8, 8, generator=generator) * 2 - 1, [f"t{i}" for i in range(20)])
    data.save_npz(root / "train.npz")
    np.save(root / "queries.npy", ((torch.rand(3, 8, 8, generator=generator)) * 255).to(torch.uint8).numpy())
    common = ["--checkpoint", str(ckpt), "--data", str(root / "train.npz"), "--out", str(root / "store")]
    assert main(["index", *common, "--events", "stratified:1", "--dim", "16", "--no-progress"]) == 0
    for method in ("tracin", "retrac"):
        assert (
            main(
                [
                    "build",
                    "--store",
                    str(root / "store"),
                    "--method",
                    method,
                    "--out",
                    str(root / method),
                    "--no-progress",
                ]
            )
            == 0
        )
    return root


def test_query_json_has_method_indices_scores_ids(built, capsys):
    capsys.readouterr()
    args = [
        "query",
        "--index",
        str(built / "retrac"),
        "--images",
        str(built / "queries.npy"),
        "--k",
        "4",
        "--query-events",
        "fast",
    ]
    assert main([*args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "retrac.query" and list(document["results"]) == ["retrac"]
    assert document["query_ids"] == [0, 1, 2]  # .npy row numbers stay integers
    payload = document["results"]["retrac"]
    assert payload["method"] == "retrac"
    assert np.asarray(payload["indices"]).shape == (3, 4) == np.asarray(payload["scores"]).shape
    assert payload["ids"][0][0] == f"t{payload['indices'][0][0]}"
    assert all(np.diff(row).max() <= 0 for row in payload["scores"])
    assert main([*args, "--json", "--opponents"]) == 0
    opponents = json.loads(capsys.readouterr().out)["results"]["retrac"]
    assert max(map(max, opponents["scores"])) <= min(map(min, payload["scores"]))


def test_query_several_indexes_and_text_output(built, capsys):
    capsys.readouterr()
    args = ["query", "--index", str(built / "tracin"), "--index", str(built / "retrac")]
    assert (
        main([*args, "--images", str(built / "queries.npy"), "--k", "2", "--query-events", "fast", "--json"])
        == 0
    )
    both = json.loads(capsys.readouterr().out)["results"]
    assert set(both) == {"tracin", "retrac"}
    assert (
        main(
            [
                *args,
                "--images",
                str(built / "queries.npy"),
                "--k",
                "2",
                "--query-events",
                "fast",
                "--method",
                "tracin",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "tracin: top 2 proponents" in text and "positive = proponent" in text


def test_cli_errors_exit_2_with_the_input_named(built, capsys):
    capsys.readouterr()
    bad = built / "bad.npy"
    np.save(bad, np.zeros((2, 16, 16), dtype=np.uint8))
    assert (
        main(["query", "--index", str(built / "retrac"), "--images", str(bad), "--query-events", "fast"]) == 2
    )
    assert "has shape" in capsys.readouterr().err
    assert (
        main(["query", "--index", str(built / "retrac"), "--images", str(built / "queries.npy"), "--k", "21"])
        == 2
    )
    assert "k=21" in capsys.readouterr().err
    assert (
        main(["build", "--store", str(built / "store"), "--method", "dtrak", "--out", str(built / "d")]) == 2
    )
    assert "--objective sqnorm" in capsys.readouterr().err
    assert (
        main(["build", "--store", str(built / "store"), "--kind", "Bogus99", "--out", str(built / "x")]) == 2
    )
    assert "Bogus99" in capsys.readouterr().err
