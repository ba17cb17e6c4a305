"""Captions in the data: imagefolder metadata.jsonl, an .npz 'captions' array, and their checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrac.data import ImageDataset, load_dataset
from retrac.errors import DataError


def write_folder(folder, captions: dict[str, str | None], extra_lines: tuple[str, ...] = ()):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in captions:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    lines = [
        json.dumps({"file_name": name, "text": text}) for name, text in captions.items() if text is not None
    ]
    (folder / "metadata.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return folder


def test_metadata_jsonl_captions_follow_the_files(tmp_path):
    folder = write_folder(tmp_path / "imgs", {"b.png": "a red square", "a.png": "a blue circle"})
    data = load_dataset(folder)
    assert data.ids == ["a.png", "b.png"] and data.captions == ["a blue circle", "a red square"]
    assert data.subset([1]).captions == ["a red square"]
    other = ImageDataset(data.images, data.ids, captions=["a blue circle", "a green square"])
    bare = ImageDataset(data.images, data.ids)
    assert len({data.fingerprint, other.fingerprint, bare.fingerprint}) == 3


def test_npz_captions_round_trip(tmp_path):
    data = ImageDataset(torch.zeros(2, 3, 4, 4), ["x", "y"], captions=["one", "two"], source="mem")
    loaded = load_dataset(data.save_npz(tmp_path / "d.npz"))
    assert loaded.captions == ["one", "two"] and loaded.fingerprint == data.fingerprint


def test_a_missing_or_bad_caption_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no 'text' caption for 1 image\(s\), first 'b.png'"):
        load_dataset(write_folder(tmp_path / "missing", {"a.png": "one", "b.png": None}))
    with pytest.raises(DataError, match="line 2 .*'b.png'.* no string 'text' caption"):
        load_dataset(
            write_folder(
                tmp_path / "null", {"a.png": "one", "b.png": None}, ('{"file_name": "b.png", "text": null}',)
            )
        )
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_dataset(write_folder(tmp_path / "broken", {"a.png": "one"}, ("{not json",)))
    with pytest.raises(DataError, match="2 captions for 1 images"):
        ImageDataset(torch.zeros(1, 1, 2, 2), ["a"], captions=["one", "two"])
    with pytest.raises(DataError, match="sample 'a' .* has caption None"):
        ImageDataset(torch.zeros(1, 1, 2, 2), ["a"], captions=[None])


def test_another_caption_column(tmp_path):
    folder = tmp_path / "col"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "zero"}) + "\n")
    assert load_dataset(folder, caption_column="prompt").captions == ["zero"]
    with pytest.raises(DataError, match="no string 'text' caption"):
        load_dataset(folder)


def test_a_datasets_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(p) for p in pixels],
            "text": ["one", "two", "three"],
            "label": [0, 1, 0],
            "id": ["a", "b", "c"],
        }
    ).cast_column("label", datasets.ClassLabel(names=["x", "y"]))
    table.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset(tmp_path / "saved")
    assert data.ids == ["a", "b", "c"] and data.captions == ["one", "two", "three"]
    assert data.labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(data.images, torch.from_numpy(pixels / 127.5 - 1).float().permute(0, 3, 1, 2))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="DatasetDict with splits \\['train'\\]; give one split's folder"):
        load_dataset(tmp_path / "dict")
