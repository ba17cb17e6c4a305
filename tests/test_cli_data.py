"""Pixel ranges and labels (issue 13, items 3 and 4): --pixel-range recorded in the store and checked at
query, a warning for float data that never goes below 0, --labels FILE, ImageFolder class subfolders with
the class map recorded, numpy labels in the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.data import PixelRangeWarning, load_dataset
from retrac.errors import DataError
from retrac.indexer import FeatureStore

FAST = ["--events", "stratified:1", "--projector", "dense", "--dim", "16", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-ckpts")
    plain = save_checkpoint(make_tiny_unet(seed=5), make_scheduler(), root / "plain")
    labelled = save_checkpoint(
        make_tiny_unet(seed=6, num_class_embeds=2), make_scheduler(), root / "labelled"
    )
    return {"plain": plain, "labelled": labelled}


def _unit_images(n: int, seed: int) -> np.ndarray:
    """Float images in [0, 1] (torchvision's ToTensor convention), (n, 8, 8)."""
    return np.random.default_rng(seed).random((n, 8, 8)).astype(np.float32)


def _build_retrac_index(tmp_path) -> int:
    """``retrac build --method retrac`` of ``tmp_path/store`` into ``tmp_path/index``; the exit status."""
    store, out = str(tmp_path / "store"), str(tmp_path / "index")
    return main(["build", "--store", store, "--out", out, "--method", "retrac", "--no-progress"])


def _json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_float_data_in_0_1(checkpoints, tmp_path, capsys):
    np.save(tmp_path / "train.npy", _unit_images(10, 1))
    base = ["index", "--checkpoint", str(checkpoints["plain"]), "--data", str(tmp_path / "train.npy"), *FAST]
    # without --pixel-range: indexed as [-1, 1], with a warning that names the fix
    assert main([*base, "--out", str(tmp_path / "as-is")]) == 0
    err = capsys.readouterr().err
    assert "retrac index: warning:" in err and "never go below 0" in err and "--pixel-range 0,1" in err
    assert FeatureStore.open(tmp_path / "as-is").attrs["dataset"]["pixel_range"] == [-1.0, 1.0]
    # with it: no warning, the range recorded, the pixels mapped by 2x - 1
    assert main([*base, "--out", str(tmp_path / "store"), "--pixel-range", "0,1"]) == 0
    assert "warning" not in capsys.readouterr().err
    dataset = FeatureStore.open(tmp_path / "store").attrs["dataset"]
    assert dataset["pixel_range"] == [0.0, 1.0] and dataset["pixel_dtype"] == "float32"
    loaded = load_dataset(tmp_path / "train.npy", pixel_range="0,1")
    np.testing.assert_allclose(
        loaded.images[:, 0].numpy(), 2 * np.load(tmp_path / "train.npy") - 1, atol=1e-6
    )
    assert _build_retrac_index(tmp_path) == 0

    # at query: [0, 1] floats read with the default range are refused, naming the store's range
    queries = _unit_images(2, 2)
    np.save(tmp_path / "q01.npy", queries)
    np.save(tmp_path / "q11.npy", 2 * queries - 1)
    argv = ["query", "--index", str(tmp_path / "index"), "--k", "3", "--query-events", "fast", "--json"]
    capsys.readouterr()
    assert main([*argv, "--images", str(tmp_path / "q01.npy")]) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]
    assert error.startswith("retrac query: error:") and "--pixel-range 0,1" in error
    given = _json(capsys, [*argv, "--images", str(tmp_path / "q01.npy"), "--pixel-range", "0,1"])
    same = _json(capsys, [*argv, "--images", str(tmp_path / "q11.npy"), "--pixel-range", "-1,1"])
    assert given["results"]["retrac"]["ids"] == same["results"]["retrac"]["ids"]
    np.testing.assert_allclose(
        given["results"]["retrac"]["scores"], same["results"]["retrac"]["scores"], rtol=1e-4
    )


def test_pixel_range_parsing_and_out_of_range():
    with pytest.raises(DataError, match="not two numbers"):
        load_dataset.__globals__["parse_pixel_range"]("0;1")
    with pytest.raises(DataError, match="lo < hi"):
        load_dataset.__globals__["parse_pixel_range"]("1,0")
    with pytest.warns(PixelRangeWarning, match="never go below 0"):
        load_dataset.__globals__["images_from_array"](_unit_images(2, 3))


def _write_class_folders(root, classes: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_imagefolder_class_subfolders(checkpoints, tmp_path, capsys):
    _write_class_folders(tmp_path / "train", {"dog": 3, "cat": 4}, seed=4)
    data = load_dataset(tmp_path / "train")
    assert data.classes == {"cat": 0, "dog": 1}  # sorted class names, as torchvision's ImageFolder
    assert data.ids[:2] == ["cat/0.png", "cat/1.png"] and data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    argv = ["index", "--checkpoint", str(checkpoints["labelled"]), "--data", str(tmp_path / "train"), *FAST]
    assert main([*argv, "--out", str(tmp_path / "store")]) == 0
    dataset = FeatureStore.open(tmp_path / "store").attrs["dataset"]
    assert dataset["classes"] == {"cat": 0, "dog": 1} and dataset["has_labels"]
    assert _build_retrac_index(tmp_path) == 0
    _write_class_folders(tmp_path / "queries", {"cat": 1, "dog": 1}, seed=5)
    query = ["query", "--index", str(tmp_path / "index"), "--images", str(tmp_path / "queries"), "--k", "2"]
    document = _json(capsys, [*query, "--query-events", "fast", "--json"])
    assert document["query_ids"] == ["cat/0.png", "dog/0.png"]


def test_labels_file_and_numpy_labels(checkpoints, tmp_path, capsys):
    rng = np.random.default_rng(7)
    np.save(tmp_path / "train.npy", rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    (tmp_path / "labels.txt").write_text("0\n1\n0\n1\n1\n0\n")
    argv = [
        "index",
        "--checkpoint",
        str(checkpoints["labelled"]),
        "--data",
        str(tmp_path / "train.npy"),
        *FAST,
    ]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "no-labels")]) == 2  # a class-conditional model needs labels
    assert "label" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("0\n1\n")
    assert main([*argv, "--out", str(tmp_path / "short"), "--labels", str(tmp_path / "short.txt")]) == 2
    assert "2 labels for 6 images" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "store"), "--labels", str(tmp_path / "labels.txt")]) == 0
    dataset = FeatureStore.open(tmp_path / "store").attrs["dataset"]
    assert dataset["has_labels"] and dataset["labels_file"]["source"].endswith("labels.txt")
    assert _build_retrac_index(tmp_path) == 0

    from retrac.query.attribution import Attributor, QueryEvents

    attributor = Attributor(tmp_path / "index", query_events=QueryEvents.preset("fast"), progress=False)
    images = load_dataset(tmp_path / "train.npy").images[:2]
    with_numpy = attributor.attribute(images, 3, class_labels=np.array([1, 0]))
    with_torch = attributor.attribute(images, 3, class_labels=torch.tensor([1, 0]))
    assert with_numpy.ids == with_torch.ids
    np.testing.assert_array_equal(with_numpy.scores, with_torch.scores)
    with pytest.raises(DataError, match="integer labels"):
        attributor.attribute(images, 3, class_labels=np.array([0.5, 1.5]))
