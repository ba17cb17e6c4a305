"""Training and query data: arrays and image folders -> ``(N, C, H, W)`` tensors in ``[-1, 1]``.

Sources:

* ``.npy``: an array ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``; ids are row numbers.
* ``.npz``: key ``images`` (or the only array), optional ``labels`` ``(N,)``, ``ids`` ``(N,)`` and
  ``captions`` ``(N,)`` strings.
* a folder of PNG/JPEG files (sorted by name); ids are the file names. A ``metadata.jsonl`` in
  the folder gives captions the way diffusers' training scripts and ``datasets``' imagefolder read
  them: one JSON object per line with ``file_name`` and ``text`` (or another caption column).
* a folder of class subfolders ``folder/CLASS/*.png`` (torchvision's ``ImageFolder``): the label of
  an image is the index of its class in the sorted class names (``classes``, recorded in the store);
  ids are ``CLASS/file name``.
* a ``datasets`` dataset saved with ``save_to_disk`` (``state.json`` + ``dataset_info.json``): its
  ``Image`` column, the caption column (``text``) when present, a ``ClassLabel`` column as labels
  and an ``id`` column as ids (else row numbers). Needs the ``datasets`` package.

Labels may also come from a separate file (``labels=``, ``retrac index --labels FILE``): ``.npy``
``(N,)`` integers, ``.txt`` one integer a line, or ``.json`` (a list, or ``{id: label}``), in the
order of the data's samples.

Pixel values are mapped from their range ``[lo, hi]`` to the model's ``[-1, 1]`` by
``2 (x - lo) / (hi - lo) - 1``: ``uint8`` from ``[0, 255]`` (``x / 127.5 - 1``), ``uint16`` (16-bit
PNGs) from ``[0, 65535]``, floats from ``pixel_range`` (``--pixel-range``; default ``-1,1``, i.e. as they
are; ``0,1`` is torchvision's ``ToTensor`` convention). Float data that never goes below 0 read with the
default range gets a warning: it is probably in ``[0, 1]``. Grayscale files of any bit depth (PIL
modes ``L``, ``I;16``, ``I``, ``F``, ...) load as one channel.
"""

from __future__ import annotations

import hashlib
import json
import warnings
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
DEFAULT_FLOAT_RANGE = (-1.0, 1.0)  # floats are taken as they are unless --pixel-range says otherwise
INTEGER_RANGES = {"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0)}
LABEL_SUFFIXES = (".npy", ".txt", ".json")


class PixelRangeWarning(UserWarning):
    """Float pixels read with the default ``[-1, 1]`` range never go below 0: probably ``[0, 1]`` data."""


def parse_pixel_range(value) -> tuple[float, float] | None:
    """``"lo,hi"`` (or a pair) as ``(lo, hi)`` floats with ``lo < hi``; ``None`` stays ``None``.

    Raises:
        DataError: not two numbers, or ``lo >= hi``.
    """
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise DataError(
            f"pixel range {value!r} is not two numbers 'lo,hi'; give e.g. -1,1 (default), 0,1 or 0,255."
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise DataError(f"pixel range {value!r} needs finite lo < hi; give e.g. -1,1, 0,1 or 0,255.")
    return lo, hi


@dataclass
class ImageDataset:
    """Images with stable ids and a fingerprint.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[-1, 1]``.
        ids: ``N`` stable sample ids (file names or row numbers as strings).
        labels: ``(N,)`` int64 class labels, or ``None``.
        source: where the data came from.
        captions: ``N`` captions for a text-conditioned model, or ``None``.
        pixel_range: ``(lo, hi)``, the range the source's values were mapped from to ``[-1, 1]``.
        pixel_dtype: the source's value type (``"float32"``, ``"uint8"``, ...), ``""`` when unknown.
        classes: ``{class name: label}`` of an ``ImageFolder``-style folder, else ``None``.
        labels_source: the file the labels came from (``--labels``), else ``""``.
    """

    images: Tensor
    ids: list[str]
    labels: Tensor | None = None
    source: str = ""
    captions: list[str] | None = None
    pixel_range: tuple[float, float] = DEFAULT_FLOAT_RANGE
    pixel_dtype: str = ""
    classes: dict[str, int] | None = None
    labels_source: str = ""

    def __post_init__(self) -> None:
        if self.labels is not None and not isinstance(self.labels, Tensor):  # numpy or a list
            self.labels = torch.from_numpy(_integer_labels(np.asarray(self.labels), self.source or "labels"))
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
            given = ",".join(f"{v:g}" for v in self.pixel_range)
            raise DataError(
                f"pixels of {self.source} lie in [{lo:.3g}, {hi:.3g}] after mapping range {given} to [-1, 1], "
                "outside [-1, 1]; give the data's range with --pixel-range LO,HI (e.g. 0,255 for float "
                "values in 0..255), or store uint8 images."
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
            pixel_range=self.pixel_range,
            pixel_dtype=self.pixel_dtype,
            classes=self.classes,
            labels_source=self.labels_source,
        )

    def record(self) -> dict:
        """How the data was read, as the store records it (``source`` and ``labels_file.source`` are
        locations, not compared when a store is reopened)."""
        return {
            "pixel_range": [float(v) for v in self.pixel_range],
            "pixel_dtype": self.pixel_dtype,
            "classes": self.classes,
            "labels_file": {"source": self.labels_source} if self.labels_source else None,
        }

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


def images_from_array(
    array: np.ndarray, source: str = "array", pixel_range: tuple[float, float] | str | None = None
) -> Tensor:
    """Convert an image array to ``(N, C, H, W)`` float32 in ``[-1, 1]``.

    Args:
        array: ``uint8``, ``uint16`` or float images.
        source: named in messages.
        pixel_range: ``(lo, hi)`` of the values (default: ``[0, 255]`` / ``[0, 65535]`` for integers,
            ``[-1, 1]`` for floats, with a :class:`PixelRangeWarning` when float values never go below 0).
    """
    array = np.asarray(array)
    given = parse_pixel_range(pixel_range)
    if array.dtype.name not in INTEGER_RANGES and not np.issubdtype(array.dtype, np.floating):
        raise DataError(
            f"{source}: images of dtype {array.dtype} are not supported; use uint8, uint16 or float "
            "(with --pixel-range when not in [-1, 1])."
        )
    if given is not None and given == INTEGER_RANGES.get(array.dtype.name):
        given = None  # the integer default, with its exact arithmetic (same pixels, same fingerprint)
    if given == DEFAULT_FLOAT_RANGE and np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)  # said to be in [-1, 1]: as it is, no warning
    elif given is None and array.dtype == np.uint8:
        array = array.astype(np.float32) / 127.5 - 1.0
    elif given is None and array.dtype == np.uint16:
        array = (array.astype(np.float64) / 32767.5 - 1.0).astype(np.float32)
    elif given is None:
        array = array.astype(np.float32)
        if array.size and float(array.min()) >= 0.0 and 0.0 < float(array.max()) <= 1.001:
            warnings.warn(
                f"{source}: float pixels never go below 0 (range [{float(array.min()):.3g}, {float(array.max()):.3g}]) "
                "but are read as [-1, 1]; if they are in [0, 1] (torchvision's ToTensor), pass --pixel-range 0,1 "
                "(Python: pixel_range=(0, 1)), else the attributions are wrong.",
                PixelRangeWarning,
                stacklevel=3,
            )
    else:  # 2 (x - lo) / (hi - lo) - 1
        lo, hi = given
        array = (2.0 * (array.astype(np.float64) - lo) / (hi - lo) - 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(_to_nchw(array, source)))


def _range_of(dtype, pixel_range) -> tuple[tuple[float, float], str]:
    """The range a source's values were mapped from, and its dtype name (what the store records)."""
    given = parse_pixel_range(pixel_range)
    name = np.dtype(dtype).name
    return given or INTEGER_RANGES.get(name, DEFAULT_FLOAT_RANGE), name


def _integer_labels(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        if array.ndim == 1 and array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0):
            return array.astype(np.int64)
        raise DataError(
            f"labels from {source} have shape {array.shape} and dtype {array.dtype}; give one integer class "
            "label per image."
        )
    return array.astype(np.int64)


def read_labels(path: str | Path, ids: list[str]) -> np.ndarray:
    """Class labels from a file, in the order of ``ids``: ``.npy`` ``(N,)`` integers, ``.txt`` one integer a
    line, ``.json`` a list or ``{id: label}``.

    Raises:
        DataError: another format, a count other than ``len(ids)``, an id without a label, non-integers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {str(path)!r} does not exist.")
    if path.suffix not in LABEL_SUFFIXES:
        raise DataError(
            f"labels file {str(path)!r}: give .npy (N,) integers, .txt one integer a line, or .json (a list or "
            "an object {id: label})."
        )
    try:
        if path.suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        elif path.suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            labels = np.array([int(line) for line in lines], dtype=np.int64)
        else:
            content = json.loads(path.read_text())
            if isinstance(content, dict):
                missing = [i for i in ids if i not in content]
                if missing:
                    raise DataError(
                        f"labels file {str(path)!r} has no label for {len(missing)} sample(s), first {missing[0]!r}; "
                        "give one per sample id."
                    )
                content = [content[i] for i in ids]
            labels = np.asarray(content)
    except DataError:
        raise
    except (ValueError, OSError) as exc:
        raise DataError(f"labels file {str(path)!r} cannot be read ({exc}).") from None
    labels = _integer_labels(labels, str(path))
    if len(labels) != len(ids):
        raise DataError(
            f"labels file {str(path)!r} has {len(labels)} labels for {len(ids)} images; give one per image, in "
            "the data's order."
        )
    return labels


def _read_image_files(
    files: list[Path], source: str, pixel_range=None, ids: list[str] | None = None
) -> ImageDataset:
    from PIL import Image

    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arrays.append(_pixels(img))
        except Exception as exc:
            raise DataError(f"image {str(file)!r} cannot be read: {exc}") from exc
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:  # 8-bit and 16-bit files in one folder: scale each
        arrays = [images_from_array(a[None], source, pixel_range)[0].numpy() for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(
            f"images in {source!r} have different sizes {sorted(shapes)}; resize them to one size."
        )
    # the range of these files' values: 8- or 16-bit; a folder of both scales each file by its own
    dtype = arrays[0].dtype.name if len(dtypes) == 1 else "uint8+uint16"
    used = parse_pixel_range(pixel_range) or INTEGER_RANGES.get(dtype, DEFAULT_FLOAT_RANGE)
    return ImageDataset(
        images_from_array(np.stack(arrays), source, pixel_range),
        ids or [f.name for f in files],
        source=source,
        pixel_range=used,
        pixel_dtype=dtype,
    )


def _pixels(img) -> np.ndarray:
    """One image file's pixels: ``(H, W)`` for grayscale modes (8 or 16 bit), ``(H, W, 3)`` otherwise."""
    if img.mode in GRAY_MODES:
        if img.mode.startswith("I;16"):
            return np.asarray(img, dtype=np.uint16)  # 16-bit grayscale: keep all 16 bits
        if img.mode == "I":  # 32-bit integers: older Pillow opens 16-bit PNGs so; values above 2^16 clip
            return np.clip(np.asarray(img, dtype=np.float64), 0, 65535).astype(np.uint16)
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))


def _class_folders(folder: Path) -> list[Path]:
    """The class subfolders of an ``ImageFolder``-style folder (no images at its top level), sorted."""
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def _load_class_folders(folder: Path, classes: list[Path], pixel_range=None) -> ImageDataset:
    """``folder/CLASS/*.png`` as torchvision's ``ImageFolder`` reads it: label = index of CLASS in sorted order."""
    class_to_idx = {c.name: i for i, c in enumerate(classes)}
    files, ids, labels = [], [], []
    for c in classes:
        found = sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        ids += [f"{c.name}/{p.name}" for p in found]
        labels += [class_to_idx[c.name]] * len(found)
    if not files:
        raise DataError(
            f"folder {str(folder)!r} has class subfolders ({', '.join(class_to_idx)}) but no PNG or JPEG image in "
            "them; give folder/CLASS/*.png."
        )
    data = _read_image_files(files, str(folder), pixel_range, ids)
    data.labels = torch.tensor(labels, dtype=torch.int64)
    data.classes = class_to_idx
    return data


def _load_folder(folder: Path, caption_column: str = CAPTION_COLUMN, pixel_range=None) -> ImageDataset:
    classes = _class_folders(folder)
    if classes:
        return _load_class_folders(folder, classes, pixel_range)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"folder {str(folder)!r} holds no PNG or JPEG image; give a folder of images, a folder of class "
            "subfolders of images, or an array file."
        )
    data = _read_image_files(files, str(folder), pixel_range)
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


def load_dataset(
    path: str | Path,
    caption_column: str = CAPTION_COLUMN,
    pixel_range: tuple[float, float] | str | None = None,
    labels: str | Path | None = None,
) -> ImageDataset:
    """Load a data set from ``.npy``, ``.npz``, a folder of PNG/JPEG images or of class subfolders.

    Args:
        path: the file or folder.
        caption_column: the key of a folder's ``metadata.jsonl`` that holds the captions.
        pixel_range: ``(lo, hi)`` or ``"lo,hi"`` of the values, mapped to ``[-1, 1]`` (default: ``0,255``
            for 8-bit data, ``-1,1`` for floats).
        labels: a labels file (``.npy``, ``.txt``, ``.json``) replacing any labels the data holds.

    Raises:
        DataError: missing path, unknown format, empty data, NaN or out-of-range pixels, a caption
            missing for an image, labels that do not fit.
    """
    data = _load(Path(path), caption_column, pixel_range)
    if labels is not None:
        data.labels = torch.from_numpy(read_labels(labels, data.ids))
        data.labels_source = str(Path(labels).absolute())
        data.classes = None
    return data


def _load(path: Path, caption_column: str, pixel_range) -> ImageDataset:
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist.")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved_dataset(path, caption_column, pixel_range)
        return _load_folder(path, caption_column, pixel_range)
    source = str(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            used, dtype = _range_of(array.dtype, pixel_range)
            return ImageDataset(
                images_from_array(array, source, pixel_range),
                [str(i) for i in range(len(array))],
                source=source,
                pixel_range=used,
                pixel_dtype=dtype,
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
            used, dtype = _range_of(array.dtype, pixel_range)
            return ImageDataset(
                images_from_array(array, source, pixel_range),
                ids,
                labels,
                source=source,
                captions=captions,
                pixel_range=used,
                pixel_dtype=dtype,
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data file {source!r} cannot be read ({type(exc).__name__}: {exc}).") from exc
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image_files([path], source, pixel_range)
    raise DataError(f"data path {source!r} is not a .npy, .npz, image file or folder of images.")


def _load_saved_dataset(path: Path, caption_column: str = CAPTION_COLUMN, pixel_range=None) -> ImageDataset:
    """A ``datasets`` dataset saved with ``save_to_disk``: images, captions, class labels and ids.

    Raises:
        DataError: ``datasets`` not installed, a ``DatasetDict`` (give one split's folder), no image
            column, images of different sizes, unreadable files.
    """
    source = str(path)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file()) or ["train"]
        raise DataError(
            f"{source!r} holds a DatasetDict with splits {splits}; give one split's folder, e.g. {source}/{splits[0]}."
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is a datasets dataset saved to disk; install the datasets package to read it "
            "(pip install datasets)."
        ) from None
    try:
        table = datasets.load_from_disk(source)
    except Exception as exc:
        raise DataError(f"datasets folder {source!r} cannot be read ({type(exc).__name__}: {exc}).") from exc
    features = table.features
    columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise DataError(
            f"{source!r} has no Image column (columns: {list(features)}); give a dataset of images."
        )
    arrays = [_pixels(image) for image in table[columns[0]]]
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"images in {source!r} have different sizes; resize them to one size.")
    if len({a.dtype for a in arrays}) > 1:  # 8-bit and 16-bit images in one dataset: scale each
        arrays = [images_from_array(a[None], source, pixel_range)[0].numpy() for a in arrays]
    ids = [str(i) for i in table["id"]] if "id" in features else [str(i) for i in range(len(arrays))]
    classes = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    labels = torch.as_tensor(table[classes[0]], dtype=torch.int64) if classes else None
    captions = list(table[caption_column]) if caption_column in features else None
    images = images_from_array(np.stack(arrays), source, pixel_range)
    return ImageDataset(images, ids, labels, source=source, captions=captions)
