"""Data loaders: arrays and image folders -> (N, C, H, W) in [-1, 1] with ids and fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrac.data import ImageDataset, load_dataset
from retrac.errors import DataError


def test_npy_uint8_layouts_and_row_ids(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", nhwc)
    data = load_dataset(tmp_path / "nhwc.npy")
    assert data.images.shape == (5, 3, 6, 7)
    assert data.ids == ["0", "1", "2", "3", "4"]
    expected = torch.from_numpy(nhwc.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(data.images, expected)
    np.save(tmp_path / "gray.npy", nhwc[..., 0])
    assert load_dataset(tmp_path / "gray.npy").images.shape == (5, 1, 6, 7)
    np.save(tmp_path / "nchw.npy", np.moveaxis(nhwc, -1, 1))
    torch.testing.assert_close(load_dataset(tmp_path / "nchw.npy").images, expected)


def test_npz_round_trip_with_ids_and_labels(tmp_path):
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    original = ImageDataset(images, ["a", "b", "c", "d"], torch.tensor([0, 1, 0, 2]), source="mem")
    original.save_npz(tmp_path / "d.npz")
    loaded = load_dataset(tmp_path / "d.npz")
    assert loaded.ids == original.ids
    assert torch.equal(loaded.labels, original.labels)
    assert torch.equal(loaded.images, original.images)
    assert loaded.fingerprint == original.fingerprint


def test_fingerprint_depends_on_pixels_ids_and_labels():
    images = torch.zeros(3, 1, 4, 4)
    base = ImageDataset(images, ["x", "y", "z"])
    assert base.fingerprint == ImageDataset(images.clone(), ["x", "y", "z"]).fingerprint
    assert base.fingerprint != ImageDataset(images, ["x", "y", "w"]).fingerprint
    assert base.fingerprint != ImageDataset(images + 0.5, ["x", "y", "z"]).fingerprint
    assert base.fingerprint != ImageDataset(images, ["x", "y", "z"], torch.tensor([0, 0, 1])).fingerprint


def test_image_folder_ids_are_sorted_file_names(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {name: rng.integers(0, 256, size=(8, 8), dtype=np.uint8) for name in ["b.png", "a.png", "c.jpg"]}
    for name, array in arrays.items():
        Image.fromarray(array).save(tmp_path / name)
    data = load_dataset(tmp_path)
    assert data.ids == ["a.png", "b.png", "c.jpg"]
    assert data.images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(
        data.images[0, 0], torch.from_numpy(arrays["a.png"].astype(np.float32) / 127.5 - 1)
    )
    single = load_dataset(tmp_path / "b.png")
    assert single.ids == ["b.png"] and torch.equal(single.images[0], data.images[1])


def test_bad_data_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_dataset(tmp_path / "empty")
    np.save(tmp_path / "zero.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "zero.npy")
    nan = np.zeros((2, 8, 8), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match="'1'.*NaN"):
        load_dataset(tmp_path / "nan.npy")
    np.save(tmp_path / "range.npy", np.full((2, 8, 8), 3.0, dtype=np.float32))
    with pytest.raises(DataError, match="outside \\[-1, 1\\]"):
        load_dataset(tmp_path / "range.npy")
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset(tmp_path / "bad.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4)), b=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="none named 'images'"):
        load_dataset(tmp_path / "two.npz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="is not a .npy"):
        load_dataset(tmp_path / "x.txt")
    with pytest.raises(DataError, match="not unique"):
        ImageDataset(torch.zeros(2, 1, 4, 4), ["a", "a"])
