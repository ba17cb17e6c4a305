"""Memorization audit: which outputs copy training data, and which training samples they come from.

For every audited image ``x`` (a generated image, say) the audit reports:

* its nearest training images in pixel space, found exactly by a FAISS ``IndexFlatL2`` over the
  *distinct* training images (exact pixel duplicates are one entry, see below) and re-measured in
  float64. ``d_1`` is the L2 distance (square root of the sum of squared differences over all
  ``C * H * W`` pixel values in ``[-1, 1]``) to the nearest one.
* the relative distance of Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
  section 5): ``r(x) = d_1 / mean_{j <= n} d_j``, the distance to the nearest training image divided
  by the mean distance to its ``n`` nearest (``n = 50`` by default). A copy sits much closer to one
  training image than to the rest of its neighbourhood (``r`` near 0); an image of a dense region
  has ``r`` near 1. Carlini et al. call an output extracted when ``d_1 / (alpha * mean d_j) <= delta``
  with ``alpha = 0.5``; our ``r`` is that ratio without ``alpha``.
* the verdict: ``copy`` when ``r < copy_threshold`` (default ``1/6``: the nearest training image is
  more than six times closer than the mean of the neighbourhood; ``ell <= 1/3`` in Carlini et al.'s
  ``alpha = 0.5`` scaling), ``near`` when ``r < near_threshold`` (default ``1/2``: less than half as
  far), else ``novel``. The thresholds are in every record. On the planted-duplicates demo (8x8
  digits, DDPM sampled in 100 steps, ``benchmarks/audit.py``) 73 of the 79 outputs nearest a
  duplicated digit have ``r < 1/2`` (median 0.28) and only one ``r < 1/6``, while outputs nearest
  other digits have ``r >= 0.46`` (median 0.79): tiny images sampled in few steps keep some noise, so
  there ``near`` is the verdict that catches the reproductions.
* its top-k proponents under each loaded attribution index (ReTrac, TracIn, ...) and
  ``nn_rank``: the 1-based rank of the first proponent whose pixels equal the nearest training
  image (the image itself or any exact duplicate of it), or ``None``.

Exact duplicates: the neighbourhood of the relative distance is made of distinct images. A training
image duplicated ``m >= n`` times would otherwise fill all ``n`` neighbour slots with copies at the
same distance, giving ``r = 1`` (``novel``) for an exact copy of the most duplicated image. Each
distinct image is reported by its first training row and its number of exact duplicates.

Across all images: hot spots (training images that are the nearest neighbour or a top-1 proponent
of the most outputs, with counts) and the self-influence ranking of every training sample,
``SI(z) = sum_k w_k ||u_k(z)||^2`` with ``u_k`` the TracIn train vector of the store: the TracIn
score ``I(z, z)`` of the sample on itself with its training events as query events, that is
the inner product of its TracIn vector with itself in the score's metric. It needs no generated image.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, ConfigError, DataError, StoreMismatchError

__all__ = [
    "AuditConfig",
    "AuditResult",
    "PixelIndex",
    "audit_images",
    "check_can_sample",
    "load_training_data",
    "relative_distances",
    "run_audit",
    "self_influence",
    "verdicts",
]

PIXEL_INDEX_FORMAT = "retrac-pixel-index"
PIXEL_INDEX_FORMAT_VERSION = 1
PIXEL_INDEX_FILE = "pixels.faiss"
PIXEL_MANIFEST = "manifest.json"
VERDICTS = ("copy", "near", "novel")
DISTANCE_MEANING = (
    "L2 distance over all C*H*W pixel values in [-1, 1] (sqrt of the sum of squared differences)"
)
RELATIVE_MEANING = "r = d_1 / mean_{j<=n} d_j over the n nearest distinct training images (Carlini et al. 2023, without alpha)"
SELF_INFLUENCE_MEANING = "SI(z) = sum_k w_k ||u_k(z)||^2, u_k the TracIn train vector of checkpoint k: the TracIn score of z on itself"


@dataclass
class AuditConfig:
    """Settings of an audit.

    Attributes:
        k: top proponents per method and image.
        num_neighbours: ``n`` of the relative distance (distinct training images; at least 2).
        copy_threshold: verdict ``copy`` when the relative distance is below it (default ``1/6``,
            ``ell <= 1/3`` in Carlini et al.'s ``alpha = 0.5`` scaling).
        near_threshold: verdict ``near`` when below it and not a copy (default ``1/2``).
        shown_neighbours: nearest training images kept per image in the records and the report.
        num_hot_spots: hot spots listed in the summary and the report.
        report_images: audited images shown in the HTML page (flagged ones first); all are in the JSONL.
    """

    k: int = 10
    num_neighbours: int = 50
    copy_threshold: float = 1 / 6
    near_threshold: float = 0.5
    shown_neighbours: int = 5
    num_hot_spots: int = 20
    report_images: int = 300

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}: ask for at least one proponent.")
        if self.num_neighbours < 2:
            raise ConfigError(
                f"num_neighbours n={self.num_neighbours}: the relative distance needs n >= 2 (default 50)."
            )
        if not 0 < self.copy_threshold <= self.near_threshold:
            raise ConfigError(
                f"thresholds copy={self.copy_threshold}, near={self.near_threshold}: need 0 < copy <= near."
            )
        if self.shown_neighbours < 1 or self.num_hot_spots < 1 or self.report_images < 0:
            raise ConfigError("shown_neighbours and num_hot_spots must be >= 1, report_images >= 0.")

    @property
    def thresholds(self) -> dict[str, float]:
        return {"copy": self.copy_threshold, "near": self.near_threshold}

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- pixel space
def relative_distances(distances: np.ndarray) -> np.ndarray:
    """``r = d_1 / mean_j d_j`` per row of ``(n_query, n)`` ascending distances (Carlini et al. 2023).

    A row whose distances are all 0 cannot occur for distinct neighbours (n >= 2); it gives ``r = 0``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    mean = distances.mean(axis=1)
    return np.divide(distances[:, 0], mean, out=np.zeros_like(mean), where=mean > 0)


def verdicts(relative: np.ndarray, config: AuditConfig) -> list[str]:
    """``copy`` (``r < copy_threshold``), ``near`` (``r < near_threshold``) or ``novel`` per image."""
    return [
        "copy" if r < config.copy_threshold else "near" if r < config.near_threshold else "novel"
        for r in np.asarray(relative, dtype=np.float64)
    ]


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
        manifest_path = directory / PIXEL_MANIFEST
        expected = cls._manifest(train)
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            diffs = [
                f"{key}: cached {manifest.get(key)!r}, given {value!r}"
                for key, value in expected.items()
                if key != "num_distinct" and manifest.get(key) != value
            ]
            if diffs:
                raise StoreMismatchError(
                    f"pixel index {str(directory)!r} was built from other training data ({'; '.join(diffs)}); "
                    "remove it or give the data it was built from."
                )
            index = faiss.read_index(str(directory / PIXEL_INDEX_FILE))
            with np.load(directory / "rows.npz") as rows:
                built = cls(train, rows["representatives"], rows["groups"], index)
            if index.ntotal != manifest["num_distinct"] or index.d != expected["dim"]:
                raise DataError(
                    f"{str(directory)!r}: FAISS file does not match its manifest; remove the folder."
                )
            return built
        built = cls.build(train)
        directory.mkdir(parents=True, exist_ok=True)
        tmp_index = directory / f".{PIXEL_INDEX_FILE}.tmp-{os.getpid()}"
        faiss.write_index(built.index, str(tmp_index))
        os.replace(tmp_index, directory / PIXEL_INDEX_FILE)
        tmp_rows = directory / f".rows.tmp-{os.getpid()}.npz"
        np.savez(tmp_rows, representatives=built.representatives, groups=built.groups)
        os.replace(tmp_rows, directory / "rows.npz")
        tmp_manifest = directory / f".{PIXEL_MANIFEST}.tmp-{os.getpid()}"
        tmp_manifest.write_text(json.dumps({**expected, "num_distinct": built.num_distinct}, indent=2) + "\n")
        os.replace(tmp_manifest, manifest_path)  # written last: a torn build has no manifest
        return built

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


# ---------------------------------------------------------------------------------- training side
def self_influence(store) -> np.ndarray:
    """``SI(z) = sum_k w_k ||u_k(z)||^2`` of every training row, ``(N,)`` float64 (TracIn vectors ``u_k``).

    The TracIn score ``I(z, z)`` of each training sample on itself, its training events serving as
    query events: large values mark samples whose loss gradients stay large across checkpoints.
    """
    from retrac.query.attribution import train_vector_blocks
    from retrac.query.vectors import Method

    weights = np.asarray(store.weights, dtype=np.float64)
    total = np.zeros(store.num_samples, dtype=np.float64)
    start = 0
    # train_vector_blocks streams U(z) = concat_k(w_k u_k(z)): ||w_k u_k||^2 / w_k = w_k ||u_k||^2
    for block in train_vector_blocks(store, Method.named("tracin")):
        per_checkpoint = (
            (block.astype(np.float64) ** 2).reshape(len(block), len(weights), store.dim).sum(axis=2)
        )
        total[start : start + len(block)] = per_checkpoint @ (1.0 / weights)
        start += len(block)
    return total


def load_training_data(store, data: str | Path | ImageDataset | None = None) -> ImageDataset:
    """The training set of ``store``: ``data`` when given, else the source the store recorded.

    Raises:
        StoreMismatchError: the data's fingerprint differs from the one the store was built from.
        DataError: no ``data`` given and the recorded source cannot be read.
    """
    recorded = store.attrs.get("dataset", {})
    if data is None:
        source = recorded.get("source")
        if not source or not Path(source).exists():
            raise DataError(
                f"the store {str(store.path)!r} records training data {source!r}, which cannot be read here; "
                "give the training data with --data."
            )
        data = source
    train = data if isinstance(data, ImageDataset) else load_dataset(data)
    if train.fingerprint != recorded.get("fingerprint"):
        raise StoreMismatchError(
            f"training data {train.source or 'given'!r} has fingerprint {train.fingerprint[:16]}..., but the store "
            f"{str(store.path)!r} was built from {recorded.get('source')!r} with fingerprint "
            f"{str(recorded.get('fingerprint'))[:16]}...; give the data the store was built from."
        )
    return train


def check_can_sample(task) -> None:
    """Raise ``CheckpointError`` unless ``retrac.sampling.generate_images`` can sample ``task``'s model.

    Sampling needs an unconditional model (a class-conditional one needs labels: audit given images
    instead) and a scheduler with a reverse process (``set_timesteps`` and ``step``).
    """
    scheduler = task.scheduler
    if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
        raise CheckpointError(
            f"the last checkpoint's scheduler {type(scheduler).__name__} has no reverse process (set_timesteps / "
            "step): it cannot sample; audit existing images with --images."
        )
    if task.is_class_conditional:
        raise CheckpointError(
            "the last checkpoint is class-conditional: --generate cannot choose its labels; sample images "
            "yourself and audit them with --images (an .npz with labels)."
        )
    if getattr(task.model.config, "sample_size", None) is None:
        raise CheckpointError("the last checkpoint's model has no sample_size: it cannot sample.")


# ---------------------------------------------------------------------------------- the audit
@dataclass
class AuditResult:
    """An audit of ``n`` images.

    Attributes:
        records: one dict per image (the lines of ``audit.jsonl``; see :func:`audit_images`).
        summary: counts, rates, thresholds, hot spots, self-influence top (``summary.json``).
        self_influence: ``(N,)`` ``SI(z)`` of every training row, or ``None``.
        images: ``(n, C, H, W)`` the audited images.
    """

    records: list[dict]
    summary: dict
    self_influence: np.ndarray | None
    images: Tensor


def audit_images(
    images: Tensor,
    pixel_index: PixelIndex,
    attributor=None,
    config: AuditConfig | None = None,
    image_ids: Sequence[str] | None = None,
    class_labels: Tensor | None = None,
    self_influences: np.ndarray | None = None,
) -> AuditResult:
    """Audit images against the training set (pixel neighbours) and, given an attributor, its indexes.

    Args:
        images: ``(n, C, H, W)`` in ``[-1, 1]``, shaped as the training images.
        pixel_index: the exact L2 index over the training set.
        attributor: a :class:`retrac.query.attribution.Attributor` over that training set, or ``None``
            (no proponents).
        config: thresholds, ``k``, ``n``.
        image_ids: one name per image (default ``image-NNNN``).
        class_labels: ``(n,)`` labels for a class-conditional model.
        self_influences: ``(N,)`` ``SI(z)`` (see :func:`self_influence`) to rank in the summary.

    Returns:
        An :class:`AuditResult`. Each record has: ``image``, ``id``, ``verdict``,
        ``relative_distance``, ``nn_distance`` (``d_1``), ``mean_neighbour_distance``,
        ``num_neighbours``, ``thresholds``, ``nearest_row``, ``nearest_id``, ``nearest_duplicates``,
        ``nearest`` (the ``shown_neighbours`` nearest: row, id, distance, duplicates) and
        ``proponents`` (method -> rows, ids, scores best first, ``nn_rank`` 1-based or ``None``).
    """
    config = config or AuditConfig()
    images = torch.as_tensor(images, dtype=torch.float32)
    if not torch.isfinite(images).all() or (images.numel() and images.abs().max() > 1.001):
        raise DataError(
            "audited images must be finite and lie in [-1, 1]; scale uint8 images by x / 127.5 - 1."
        )
    n_images = images.shape[0] if images.ndim == 4 else 0
    if n_images == 0:
        raise DataError(f"audited images have shape {tuple(images.shape)}; give (n, C, H, W) with n >= 1.")
    ids = list(image_ids) if image_ids is not None else [f"image-{i:04d}" for i in range(n_images)]
    if len(ids) != n_images:
        raise DataError(f"{len(ids)} image ids for {n_images} images; give one id per image.")
    train = pixel_index.train
    distances, rows = pixel_index.search(images, config.num_neighbours)
    relative = relative_distances(distances)
    labels = verdicts(relative, config)
    results = {}
    if attributor is not None:
        if attributor.train_ids != train.ids:
            raise StoreMismatchError(
                "the attributor's store and the pixel index hold different training samples; build both from one data set."
            )
        k = min(config.k, len(train))
        results = {
            m: attributor.attribute(images, k, m, class_labels=class_labels) for m in attributor.methods
        }
    groups = pixel_index.groups
    records = []
    for i in range(n_images):
        nn_row = int(rows[i, 0])
        shown = min(config.shown_neighbours, rows.shape[1])
        record = {
            "image": i,
            "id": ids[i],
            "verdict": labels[i],
            "relative_distance": float(relative[i]),
            "nn_distance": float(distances[i, 0]),
            "mean_neighbour_distance": float(distances[i].mean()),
            "num_neighbours": config.num_neighbours,
            "thresholds": config.thresholds,
            "nearest_row": nn_row,
            "nearest_id": train.ids[nn_row],
            "nearest_duplicates": pixel_index.duplicates(nn_row),
            "nearest": [
                {
                    "row": int(rows[i, j]),
                    "id": train.ids[int(rows[i, j])],
                    "distance": float(distances[i, j]),
                    "duplicates": pixel_index.duplicates(int(rows[i, j])),
                }
                for j in range(shown)
            ],
            "proponents": {},
        }
        for method, result in results.items():
            prop_rows = [int(r) for r in result.indices[i]]
            same = [groups[r] == groups[nn_row] for r in prop_rows]
            record["proponents"][method] = {
                "rows": prop_rows,
                "ids": list(result.ids[i]),
                "scores": [float(s) for s in result.scores[i]],
                "nn_rank": same.index(True) + 1 if any(same) else None,
            }
        records.append(record)
    summary = summarize(records, train, pixel_index, config, self_influences)
    return AuditResult(records, summary, self_influences, images)


def summarize(
    records: list[dict],
    train: ImageDataset,
    pixel_index: PixelIndex,
    config: AuditConfig,
    self_influences: np.ndarray | None = None,
) -> dict:
    """Counts, hot spots and the self-influence top of an audit (the content of ``summary.json``)."""
    n = len(records)
    counts = Counter(r["verdict"] for r in records)
    methods = sorted({m for r in records for m in r["proponents"]})
    # Hot spots, by distinct image: outputs for which it is the nearest or some method's top-1 proponent.
    as_nearest: Counter = Counter()
    as_top1: dict[str, Counter] = {m: Counter() for m in methods}
    outputs: Counter = Counter()
    groups = pixel_index.groups
    for r in records:
        hit = {int(groups[r["nearest_row"]])}
        as_nearest[int(groups[r["nearest_row"]])] += 1
        for m, p in r["proponents"].items():
            g = int(groups[p["rows"][0]])
            as_top1[m][g] += 1
            hit.add(g)
        outputs.update(hit)
    hot_spots = []
    for g, count in sorted(outputs.items(), key=lambda item: (-item[1], item[0]))[: config.num_hot_spots]:
        row = int(pixel_index.representatives[g])
        hot_spots.append(
            {
                "row": row,
                "id": train.ids[row],
                "duplicates": pixel_index.duplicates(row),
                "outputs": count,
                "as_nearest": as_nearest[g],
                "as_top1": {m: as_top1[m][g] for m in methods},
            }
        )
    summary: dict[str, Any] = {
        "num_images": n,
        "verdict_counts": {v: counts.get(v, 0) for v in VERDICTS},
        "copy_rate": counts.get("copy", 0) / n,
        "flagged_rate": (counts.get("copy", 0) + counts.get("near", 0)) / n,
        "thresholds": config.thresholds,
        "num_neighbours": config.num_neighbours,
        "k": config.k,
        "report_images": config.report_images,
        "methods": methods,
        "nn_in_top_k": {
            m: sum(r["proponents"][m]["nn_rank"] is not None for r in records) / n for m in methods
        },
        "nn_is_top1": {m: sum(r["proponents"][m]["nn_rank"] == 1 for r in records) / n for m in methods},
        "hot_spots": hot_spots,
        "training_data": {
            "source": train.source,
            "fingerprint": train.fingerprint,
            "num_samples": len(train),
            "num_distinct": pixel_index.num_distinct,
        },
        "meaning": {
            "distance": DISTANCE_MEANING,
            "relative_distance": RELATIVE_MEANING,
            "verdict": f"copy if r < {config.copy_threshold:.4g}, near if r < {config.near_threshold:.4g}, else novel",
            "nn_rank": "1-based rank of the first top-k proponent whose pixels equal the nearest training image",
            "score": "I(z, z') = sum_k w_k <u_k(z), q_k(z')>; positive = proponent",
            "self_influence": SELF_INFLUENCE_MEANING,
        },
    }
    if self_influences is not None:
        order = np.argsort(-self_influences, kind="stable")
        top = max(1, len(order) // 100)
        summary["self_influence_top"] = [
            {
                "rank": rank + 1,
                "row": int(row),
                "id": train.ids[row],
                "self_influence": float(self_influences[row]),
            }
            for rank, row in enumerate(order[: max(top, 20)])
        ]
        summary["self_influence_top_1_percent"] = top
    return summary


def self_influence_ranking(self_influences: np.ndarray, ids: Sequence[str]) -> list[dict]:
    """Every training row, highest ``SI(z)`` first: rank (1-based), row, id, self_influence."""
    order = np.argsort(-self_influences, kind="stable")
    return [
        {"rank": rank + 1, "row": int(row), "id": ids[row], "self_influence": float(self_influences[row])}
        for rank, row in enumerate(order)
    ]


def write_audit(
    result: AuditResult, out: str | Path, train: ImageDataset, title: str = "retrac audit"
) -> dict:
    """Write ``audit.jsonl``, ``summary.json``, ``self_influence.jsonl`` (when computed) and ``index.html``.

    Returns:
        The written paths by name.
    """
    from retrac.report.audit import write_audit_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": out / "audit.jsonl", "summary": out / "summary.json"}
    _atomic_text(paths["records"], "".join(json.dumps(r) + "\n" for r in result.records))
    _atomic_text(paths["summary"], json.dumps(result.summary, indent=2) + "\n")
    if result.self_influence is not None:
        paths["self_influence"] = out / "self_influence.jsonl"
        ranking = self_influence_ranking(result.self_influence, train.ids)
        _atomic_text(paths["self_influence"], "".join(json.dumps(r) + "\n" for r in ranking))
    paths["report"] = write_audit_report(out, result, train, title)
    return {k: str(v) for k, v in paths.items()}


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pixel_index_dir(index_dir: str | Path, train: ImageDataset) -> Path:
    """Where the pixel index of ``train`` is cached: beside the attribution index, named by its fingerprint."""
    return Path(index_dir).resolve().parent / f"pixel-index-{train.fingerprint[:16]}"


def run_audit(
    indexes: Sequence[str | Path] | str | Path,
    out: str | Path,
    images: ImageDataset | str | Path | None = None,
    generate: int | None = None,
    seed: int = 0,
    sampling_steps: int | None = None,
    data: str | Path | ImageDataset | None = None,
    config: AuditConfig | None = None,
    query_events=None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """``retrac audit``: audit given or freshly generated images against an attribution index.

    Args:
        indexes: attribution index folders built from one store (e.g. ReTrac and TracIn).
        out: output folder: ``audit.jsonl``, ``summary.json``, ``self_influence.jsonl``, ``index.html``
            (and ``generated.npz`` with ``generate``).
        images: the images to audit (an :class:`ImageDataset` or a path ``load_dataset`` reads).
        generate: instead of ``images``, sample this many images from the last checkpoint.
        seed: seed of the sampling.
        sampling_steps: reverse steps of the sampling (default: the scheduler's ``T``).
        data: the training data (default: the source the store recorded); must match its fingerprint.
        query_events: :class:`retrac.query.attribution.QueryEvents` of the attribution queries.

    Returns:
        The summary (also in ``summary.json``) with the written paths under ``"files"``.
    """
    from retrac.query.attribution import Attributor, QueryEvents

    if (images is None) == (generate is None):
        raise ConfigError(
            "give either images to audit (--images) or a number of images to generate (--generate)."
        )
    config = config or AuditConfig()
    dirs = [indexes] if isinstance(indexes, (str, Path)) else list(indexes)
    attributor = Attributor(
        dirs, query_events=query_events or QueryEvents(), device=device, progress=progress
    )
    store = attributor.feature_store
    train = load_training_data(store, data)
    if config.num_neighbours > len(train):
        raise ConfigError(
            f"n={config.num_neighbours} nearest neighbours asked for, but the training set has {len(train)} samples; "
            f"use n <= {len(train)}."
        )
    pixel_index = PixelIndex.load_or_build(pixel_index_dir(dirs[0], train), train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = None
    if generate is not None:
        from retrac.sampling import generate_images

        task = attributor.task
        check_can_sample(task)
        generated = generate_images(
            task.model,
            task.scheduler,
            generate,
            seed=seed,
            num_inference_steps=sampling_steps,
            progress=progress,
        )
        audited = ImageDataset(generated, [f"generated-{i:04d}" for i in range(generate)], source="generated")
        audited.save_npz(out / "generated.npz")
    else:
        audited = images if isinstance(images, ImageDataset) else load_dataset(images)
        attributor.task.check_images(audited.images, f"images {audited.source!r}")
        labels = audited.labels if attributor.task.is_class_conditional else None
    result = audit_images(
        audited.images,
        pixel_index,
        attributor,
        config,
        audited.ids,
        class_labels=labels,
        self_influences=self_influence(store),
    )
    result.summary["indexes"] = [str(Path(d).resolve()) for d in dirs]
    result.summary["pixel_index"] = str(pixel_index_dir(dirs[0], train))
    result.summary["audited"] = {
        "source": audited.source,
        "generated": generate,
        "seed": seed,
        "steps": sampling_steps,
    }
    files = write_audit(result, out, train)
    return {**result.summary, "files": files}
