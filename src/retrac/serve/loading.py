"""What ``retrac serve`` loads besides the ``Attributor``: the audit's pixel index and the page's examples.

Nothing here builds or writes a file: ``--audit DIR`` must name a ``retrac audit`` output or an
existing pixel index folder; ``--audit memory`` builds the exact pixel index in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from retrac.data import ImageDataset, load_dataset
from retrac.errors import ConfigError, DataError

AUDIT_IN_MEMORY = "memory"


def load_audit(audit: str | Path | None, train: ImageDataset):
    """``(pixel_index, audit_config, source)`` for ``--audit``; nothing is built on disk."""
    from retrac.audit import PIXEL_INDEX_FORMAT, PIXEL_MANIFEST, AuditConfig, PixelIndex

    if audit is None:
        return None, AuditConfig(), None
    if str(audit) == AUDIT_IN_MEMORY:
        return PixelIndex.build(train), AuditConfig(), AUDIT_IN_MEMORY
    folder = Path(audit)
    config = AuditConfig()
    summary_path = folder / "summary.json"
    if summary_path.is_file():  # a `retrac audit` output: its pixel index and thresholds
        summary = json.loads(summary_path.read_text())
        thresholds = summary.get("thresholds", {})
        config = AuditConfig(
            num_neighbours=int(summary.get("num_neighbours", config.num_neighbours)),
            copy_threshold=float(thresholds.get("copy", config.copy_threshold)),
            near_threshold=float(thresholds.get("near", config.near_threshold)),
        )
        if not summary.get("pixel_index"):
            raise ConfigError(
                f"{str(summary_path)!r} names no pixel index; give the pixel index folder itself."
            )
        folder = summary_path.parent / summary["pixel_index"]  # relative to the audit folder (or absolute)
    manifest_path = folder / PIXEL_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("format") != PIXEL_INDEX_FORMAT:
        raise ConfigError(
            f"--audit {str(audit)!r} is neither a `retrac audit` output folder nor a pixel index folder; give one, "
            "or --audit memory to build the pixel index in memory."
        )
    return PixelIndex.load_or_build(folder, train), config, str(folder.resolve())


def load_examples(paths: Sequence[str | Path], limit: int, task) -> ImageDataset | None:
    """The first ``limit`` images of each file, ids ``<file stem>/<id>``, checked against the model."""
    parts = []
    for path in paths:
        data = load_dataset(path)
        data = data.subset(range(min(limit, len(data))))
        task.check_images(data.images, f"examples {str(path)!r}")
        if task.is_class_conditional and data.labels is None:
            raise DataError(f"examples {str(path)!r} carry no labels, and the model is class-conditional.")
        parts.append(data)
    if not parts:
        return None
    stems = [Path(p).stem for p in paths]
    ids = [f"{stem}/{i}" for stem, part in zip(stems, parts, strict=True) for i in part.ids]
    labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
    return ImageDataset(torch.cat([p.images for p in parts]), ids, labels, source="examples")
