"""Training and query data: arrays and image folders -> ``(N, C, H, W)`` tensors in ``[-1, 1]``.

Sources:

* ``.npy``: an array ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``; ids are row numbers.
* ``.npz``: key ``images`` (or the only array), optional ``labels`` ``(N,)``, ``ids`` ``(N,)`` and
  ``captions`` ``(N,)`` strings.
* a folder of PNG/JPEG files (sorted by name); ids are the file names. A ``metadata.jsonl`` in
  the folder gives captions the way diffusers' training scripts and ``datasets``' imagefolder read
  them: one JSON object per line with ``file_name`` and ``text`` (or another caption column).

``uint8`` arrays are scaled by ``x / 127.5 - 1`` and ``uint16`` arrays (16-bit PNGs) by
``x / 32767.5 - 1``; float arrays must already lie in ``[-1, 1]``. Grayscale files of any bit depth
(PIL modes ``L``, ``I;16``, ``I``, ``F``, ...) load as one channel.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retrac._io import atomic_save_npz
from retrac.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"  # the imagefolder convention: {"file_name": ..., "text": ...} per line
CAPTION_COLUMN = "text"
CHANNEL_COUNTS = (1, 3, 4)
GRAY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # one-channel PIL modes


@dataclass
class ImageDataset:
    """Images with stable ids and a fingerprint.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[-1, 1]``.
        ids: ``N`` stable sample ids (file names or row numbers as strings).
        labels: ``(N,)`` int64 class labels, or ``None``.
        source: where the data came from.
        captions: ``N`` captions for a text-conditioned model, or ``None``.
    """

    images: Tensor
    ids: list[str]
    labels: Tensor | None = None
    source: str = ""
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(
                f"images from {self.source or 'input'} must be (N, C, H, W); got {tuple(self.images.shape)}."
            )
        if self.images.shape[0] == 0:
            raise DataError(f"the data set {self.source or ''} is empty; give at least one image.")
        if min(self.images.shape[1:]) == 0:
            raise DataError(
                f"images from {self.source or 'input'} have shape {tuple(self.images.shape[1:])} (C, H, W) with "
                "a zero-sized axis; give images with at least one channel and one pixel."
            )
        if len(self.ids) != self.images.shape[0]:
            raise DataError(
                f"{len(self.ids)} ids for {self.images.shape[0]} images in {self.source}; give one id per image."
            )
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"sample ids in {self.source} are not unique; ids must identify samples.")
        if self.labels is not None and self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"{self.labels.shape[0]} labels for {self.images.shape[0]} images in {self.source}."
            )
        if self.captions is not None:
            self.captions = list(self.captions)
            if len(self.captions) != self.images.shape[0]:
                raise DataError(
                    f"{len(self.captions)} captions for {self.images.shape[0]} images in {self.source}; "
                    "give one caption per image."
                )
            for sample_id, caption in zip(self.ids, self.captions, strict=True):
                if not isinstance(caption, str):
                    raise DataError(
                        f"sample {sample_id!r} in {self.source} has caption {caption!r}, not a string; give every "
                        "image a caption (an empty string is the unconditional prompt)."
                    )
        if not torch.isfinite(self.images).all():
            bad = int((~torch.isfinite(self.images)).flatten(1).any(1).nonzero()[0])
            raise DataError(
                f"image {self.ids[bad]!r} in {self.source} has NaN or infinite pixels; clean or drop it."
            )
        lo, hi = float(self.images.min()), float(self.images.max())
        if lo < -1.001 or hi > 1.001:
            raise DataError(
                f"pixels of {self.source} lie in [{lo:.3g}, {hi:.3g}], outside [-1, 1]; store uint8 images "
                "or floats already scaled to [-1, 1]."
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def fingerprint(self) -> str:
        """sha256 of the pixels, ids, labels and captions: two data sets with equal fingerprints are the same."""
        digest = hashlib.sha256()
        digest.update(str(tuple(self.images.shape)).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update("\n".join(self.ids).encode())
        if self.labels is not None:
            digest.update(self.labels.numpy().astype(np.int64).tobytes())
        if self.captions is not None:  # only then: data without captions keeps its fingerprint
            digest.update(json.dumps(["captions", self.captions]).encode())
        return digest.hexdigest()

    def subset(self, rows) -> ImageDataset:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageDataset(
            images=self.images[rows],
            ids=[self.ids[i] for i in rows.tolist()],
            labels=None if self.labels is None else self.labels[rows],
            source=self.source,
            captions=None if self.captions is None else [self.captions[i] for i in rows.tolist()],
        )

    def save_npz(self, path: str | Path) -> Path:
        """Write the data set as ``.npz`` (float32 images in [-1, 1], ids, labels) that ``load_dataset`` reads."""
        arrays = {"images": self.images.numpy().astype(np.float32), "ids": np.array(self.ids)}
        if self.labels is not None:
            arrays["labels"] = self.labels.numpy()
        if self.captions is not None:
            arrays["captions"] = np.array(self.captions, dtype=str)
        path = Path(path)
        if path.suffix != ".npz":  # as np.savez names it
            path = path.with_name(path.name + ".npz")
        return atomic_save_npz(path, **arrays)


def _to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise DataError(
            f"{source}: array of shape {array.shape} is not (N, H, W), (N, H, W, C) or (N, C, H, W)."
        )
    if array.shape[1] in CHANNEL_COUNTS:
        return array
    if array.shape[-1] in CHANNEL_COUNTS:
        return np.moveaxis(array, -1, 1)
    raise DataError(f"{source}: cannot tell the channel axis of shape {array.shape}; use 1, 3 or 4 channels.")


def images_from_array(array: np.ndarray, source: str = "array") -> Tensor:
    """Convert an image array to ``(N, C, H, W)`` float32 in ``[-1, 1]``."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 127.5 - 1.0
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 32767.5 - 1.0).astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    else:
        raise DataError(
            f"{source}: images of dtype {array.dtype} are not supported; use uint8 or float in [-1, 1]."
        )
    return torch.from_numpy(np.ascontiguousarray(_to_nchw(array, source)))


def _read_image_files(files: list[Path], source: str) -> ImageDataset:
    from PIL import Image

    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arrays.append(_pixels(img))
        except Exception as exc:
            raise DataError(f"image {str(file)!r} cannot be read: {exc}") from exc
    if len({a.dtype for a in arrays}) > 1:  # 8-bit and 16-bit files in one folder: scale each
        arrays = [images_from_array(a[None], source)[0].numpy() for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(
            f"images in {source!r} have different sizes {sorted(shapes)}; resize them to one size."
        )
    return ImageDataset(images_from_array(np.stack(arrays), source), [f.name for f in files], source=source)


def _pixels(img) -> np.ndarray:
    """One image file's pixels: ``(H, W)`` for grayscale modes (8 or 16 bit), ``(H, W, 3)`` otherwise."""
    if img.mode in GRAY_MODES:
        if img.mode.startswith("I;16"):
            return np.asarray(img, dtype=np.uint16)  # 16-bit grayscale: keep all 16 bits
        if img.mode == "I":  # 32-bit integers: older Pillow opens 16-bit PNGs so; values above 2^16 clip
            return np.clip(np.asarray(img, dtype=np.float64), 0, 65535).astype(np.uint16)
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))


def _load_folder(folder: Path, caption_column: str = CAPTION_COLUMN) -> ImageDataset:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"folder {str(folder)!r} holds no PNG or JPEG image; give a folder of images or an array file."
        )
    data = _read_image_files(files, str(folder))
    if (folder / METADATA_FILE).is_file():
        captions = read_metadata_captions(folder / METADATA_FILE, caption_column)
        missing = [f.name for f in files if f.name not in captions]
        if missing:
            raise DataError(
                f"{str(folder / METADATA_FILE)!r} has no {caption_column!r} caption for {len(missing)} image(s), "
                f'first {missing[0]!r}; add a line {{"file_name": {missing[0]!r}, "{caption_column}": "..."}}.'
            )
        data.captions = [captions[f.name] for f in files]
        data.__post_init__()  # check the captions
    return data


def read_metadata_captions(path: Path, caption_column: str = CAPTION_COLUMN) -> dict[str, str]:
    """``file_name -> caption`` from an imagefolder ``metadata.jsonl`` (one JSON object per line).

    Raises:
        DataError: a line that is not a JSON object with ``file_name`` and a string ``caption_column``,
            or a file named twice; the line number is given.
    """
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{str(path)!r} line {number} is not JSON ({exc.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                raise DataError(f'{str(path)!r} line {number} has no "file_name"; give one per line.')
            caption = record.get(caption_column)
            if not isinstance(caption, str):
                raise DataError(
                    f"{str(path)!r} line {number} ({record['file_name']!r}) has no string {caption_column!r} "
                    f"caption (got {caption!r}); give every image a caption."
                )
            name = Path(record["file_name"]).name
            if name in captions:
                raise DataError(
                    f"{str(path)!r} names {name!r} twice (line {number}); give one line per image."
                )
            captions[name] = caption
    return captions


def load_dataset(path: str | Path, caption_column: str = CAPTION_COLUMN) -> ImageDataset:
    """Load a data set from ``.npy``, ``.npz`` or a folder of PNG/JPEG images.

    Args:
        path: the file or folder.
        caption_column: the key of a folder's ``metadata.jsonl`` that holds the captions.

    Raises:
        DataError: missing path, unknown format, empty data, NaN or out-of-range pixels, a caption
            missing for an image.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist.")
    if path.is_dir():
        return _load_folder(path, caption_column)
    source = str(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            return ImageDataset(
                images_from_array(array, source), [str(i) for i in range(len(array))], source=source
            )
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if "images" in keys:
                    array = archive["images"]
                elif len(keys) == 1:
                    array = archive[keys[0]]
                else:
                    raise DataError(
                        f"{source} has arrays {keys} and none named 'images'; name the image array 'images'."
                    )
                labels = torch.from_numpy(archive["labels"].astype(np.int64)) if "labels" in keys else None
                ids = (
                    [str(i) for i in archive["ids"]] if "ids" in keys else [str(i) for i in range(len(array))]
                )
                captions = [str(c) for c in archive["captions"]] if "captions" in keys else None
            return ImageDataset(
                images_from_array(array, source), ids, labels, source=source, captions=captions
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data file {source!r} cannot be read ({type(exc).__name__}: {exc}).") from exc
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image_files([path], source)
    raise DataError(f"data path {source!r} is not a .npy, .npz, image file or folder of images.")
