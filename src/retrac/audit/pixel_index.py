"""Exact nearest training images in pixel space, over the distinct images, kept in the audit folder.

``retrac audit --out OUT`` writes the pixel index to ``OUT/pixel-index/`` (never beside the attribution
index); a later audit with ``--out OUT --overwrite`` reuses it when it was built from the same training
data (its manifest is checked), and ``retrac serve --audit OUT`` reads it from there.

Exact duplicates: the neighbourhood of the relative distance is made of distinct images. A training
image duplicated ``m >= n`` times would otherwise fill all ``n`` neighbour slots with copies at the
same distance, giving ``r = 1`` (``novel``) for an exact copy of the most duplicated image. Each
distinct image is reported by its first training row and its number of exact duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from torch import Tensor

from retrac._io import atomic_save_npz, atomic_write_text, atomic_write_via, read_json, record_differences
from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError, StoreMismatchError

PIXEL_INDEX_FORMAT = "retrac-pixel-index"
PIXEL_INDEX_FORMAT_VERSION = 1
PIXEL_INDEX_FILE = "pixels.faiss"
PIXEL_MANIFEST = "manifest.json"
PIXEL_INDEX_FOLDER = "pixel-index"  # inside the audit folder


def _distinct_rows(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row of every distinct image and, per row, the index of its distinct image."""
    first: dict[bytes, int] = {}
    group = np.empty(len(flat), dtype=np.int64)
    representatives: list[int] = []
    for row in range(len(flat)):
        key = flat[row].tobytes()
        if key not in first:
            first[key] = len(representatives)
            representatives.append(row)
        group[row] = first[key]
    return np.asarray(representatives, dtype=np.int64), group


@dataclass
class PixelIndex:
    """Exact L2 nearest neighbours over the distinct training images (FAISS ``IndexFlatL2``).

    Attributes:
        train: the training set (``(N, C, H, W)`` in ``[-1, 1]``).
        representatives: ``(G,)`` first training row of each distinct image, the index's rows.
        groups: ``(N,)`` distinct-image index of every training row.
        index: the FAISS index over the ``G`` distinct images, flattened to ``C * H * W``.
    """

    train: ImageDataset
    representatives: np.ndarray
    groups: np.ndarray
    index: faiss.Index
    _flat: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._flat = self.train.images.reshape(len(self.train), -1).numpy().astype(np.float32)

    @classmethod
    def build(cls, train: ImageDataset) -> PixelIndex:
        flat = np.ascontiguousarray(train.images.reshape(len(train), -1).numpy(), dtype=np.float32)
        representatives, groups = _distinct_rows(flat)
        index = faiss.IndexFlatL2(flat.shape[1])
        index.add(flat[representatives])
        return cls(train, representatives, groups, index)

    @classmethod
    def load_or_build(cls, directory: str | Path, train: ImageDataset) -> PixelIndex:
        """Load the cached index in ``directory``, or build and save it there (atomically).

        Raises:
            StoreMismatchError: the cached manifest names other training data or shapes.
        """
        directory = Path(directory)
        if (directory / PIXEL_MANIFEST).is_file():
            return cls.load(directory, train)
        built = cls.build(train)
        built.save(directory)
        return built

    @classmethod
    def load(cls, directory: str | Path, train: ImageDataset) -> PixelIndex:
        """The index saved in ``directory``, refused unless it was built from ``train``.

        Raises:
            StoreMismatchError: the manifest names other training data or shapes.
            DataError: a missing, unreadable or damaged file.
        """
        directory = Path(directory)
        manifest_path = directory / PIXEL_MANIFEST
        expected = cls._manifest(train)
        if not manifest_path.is_file():
            raise DataError(f"{str(directory)!r} holds no pixel index ({PIXEL_MANIFEST} is missing).")
        manifest = read_json(manifest_path, "pixel index manifest", DataError)
        cached = {key: manifest.get(key) for key in expected}
        diffs = record_differences(cached, expected, expected_name="cached", actual_name="given")
        if diffs:
            raise StoreMismatchError(
                f"pixel index {str(directory)!r} was built from other training data ({'; '.join(diffs)}); "
                "remove it or give the data it was built from."
            )
        try:
            index = faiss.read_index(str(directory / PIXEL_INDEX_FILE))
            with np.load(directory / "rows.npz") as rows:
                built = cls(train, rows["representatives"], rows["groups"], index)
        except Exception as exc:  # a truncated or corrupt cache file
            raise DataError(
                f"pixel index cache {str(directory)!r} is damaged ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); remove the folder, "
                "the next audit rebuilds it."
            ) from None
        if index.ntotal != manifest.get("num_distinct") or index.d != expected["dim"]:
            raise DataError(f"{str(directory)!r}: FAISS file does not match its manifest; remove the folder.")
        return built

    def save(self, directory: str | Path) -> Path:
        """Write ``pixels.faiss``, ``rows.npz`` and, last, ``manifest.json`` (a torn save has no manifest)."""
        directory = Path(directory)
        atomic_write_via(directory / PIXEL_INDEX_FILE, lambda path: faiss.write_index(self.index, path))
        atomic_save_npz(directory / "rows.npz", representatives=self.representatives, groups=self.groups)
        manifest = {**self._manifest(self.train), "num_distinct": self.num_distinct}
        atomic_write_text(directory / PIXEL_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return directory

    @staticmethod
    def _manifest(train: ImageDataset) -> dict[str, Any]:
        return {
            "format": PIXEL_INDEX_FORMAT,
            "format_version": PIXEL_INDEX_FORMAT_VERSION,
            "metric": "l2",
            "fingerprint": train.fingerprint,
            "num_samples": len(train),
            "image_shape": list(train.images.shape[1:]),
            "dim": int(np.prod(train.images.shape[1:])),
            "faiss_version": faiss.__version__,
        }

    @property
    def num_distinct(self) -> int:
        return int(self.index.ntotal)

    def duplicates(self, row: int) -> int:
        """How many training rows hold exactly the pixels of training row ``row`` (itself included)."""
        return int((self.groups == self.groups[row]).sum())

    def search(self, images: Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest distinct training images of each image, exact.

        Args:
            images: ``(n_query, C, H, W)`` in ``[-1, 1]``, shaped as the training images.
            n: neighbours per image, at most :attr:`num_distinct`.

        Returns:
            ``(distances, rows)``, both ``(n_query, n)``, ascending: float64 L2 distances recomputed
            exactly from the pixels (FAISS' float32 ``|x|^2 + |y|^2 - 2<x, y>`` loses the zeros of exact
            copies) and the first training row of each distinct image.
        """
        shape = tuple(self.train.images.shape[1:])
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise DataError(
                f"audited images have shape {tuple(images.shape)}, the training images are (N, {', '.join(map(str, shape))}); "
                "give images of the training images' size and channels."
            )
        if not 2 <= n <= self.num_distinct:
            raise ConfigError(
                f"n={n} nearest neighbours asked for, but the training set has {self.num_distinct} distinct images "
                f"({len(self.train)} samples); use n between 2 and {self.num_distinct}."
            )
        queries = np.ascontiguousarray(images.reshape(len(images), -1).numpy(), dtype=np.float32)
        _, candidates = self.index.search(queries, n)
        rows = self.representatives[candidates]
        diff = queries[:, None, :].astype(np.float64) - self._flat[rows].astype(np.float64)
        distances = np.sqrt((diff**2).sum(axis=2))
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(rows, order, 1)


def audit_pixel_index(out: str | Path, train: ImageDataset) -> PixelIndex:
    """The pixel index of an audit into ``out``: ``out/pixel-index/`` of a previous audit there when it was
    built from ``train`` (checked; a damaged or foreign one is an error naming it), else built anew. The
    audit writes it into its folder (:func:`retrac.audit.writers.write_audit`)."""
    previous = Path(out) / PIXEL_INDEX_FOLDER
    if (previous / PIXEL_MANIFEST).is_file():
        return PixelIndex.load(previous, train)
    return PixelIndex.build(train)
