"""One record per audited image (pixel neighbours, verdict, proponents) and the summary over all."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrac.audit.config import (
    DISTANCE_MEANING,
    RELATIVE_MEANING,
    SELF_INFLUENCE_MEANING,
    VERDICTS,
    AuditConfig,
)
from retrac.audit.metrics import relative_distances, verdicts
from retrac.audit.pixel_index import PixelIndex
from retrac.data import ImageDataset
from retrac.errors import DataError, StoreMismatchError
from retrac.schema import AUDIT_SCHEMA, header


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

    def to_dict(self) -> dict:
        """The ``retrac.audit`` document (docs/design.md section 10): what ``summary.json`` holds."""
        return dict(self.summary)


def audit_images(
    images: Tensor,
    pixel_index: PixelIndex,
    attributor=None,
    config: AuditConfig | None = None,
    image_ids: Sequence[str] | None = None,
    class_labels: Tensor | None = None,
    self_influences: np.ndarray | None = None,
    prompts: Sequence[str] | None = None,
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
        prompts: for a text model, one prompt per image (its attribution queries are conditioned on it).

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
            m: attributor.attribute(images, k, m, class_labels=class_labels, prompts=prompts)
            for m in attributor.methods
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
        **header(AUDIT_SCHEMA),
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
