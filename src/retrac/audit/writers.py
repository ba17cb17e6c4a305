"""The files of an audit: ``audit.jsonl``, ``summary.json``, ``self_influence.jsonl``, ``index.html``.

The audit folder is published whole (``retrac._io.publish_directory``): every file is written into a
temporary sibling, which then takes the place of ``--out`` in one step, so a rerun into an existing
folder that is killed midway leaves the previous audit whole, never new records beside an old summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrac._io import atomic_write_text, publish_directory
from retrac.audit.pixel_index import PIXEL_INDEX_FOLDER
from retrac.audit.records import AuditResult
from retrac.audit.training import self_influence_ranking
from retrac.data import ImageDataset
from retrac.report.audit import write_audit_report


def write_audit(
    result: AuditResult,
    out: str | Path,
    train: ImageDataset,
    title: str = "retrac audit",
    generated: ImageDataset | None = None,
    pixel_index=None,
) -> dict:
    """Write ``audit.jsonl``, ``self_influence.jsonl`` (when computed), ``index.html`` and, last,
    ``summary.json``: the ``retrac.audit`` document with every written file under ``files``.

    Args:
        result: the audit.
        out: the audit folder (replaced whole when it exists).
        train: the training data (thumbnails, self-influence ids).
        title: the page title.
        generated: images sampled for the audit, saved as ``generated.npz``.
        pixel_index: the audit's :class:`~retrac.audit.pixel_index.PixelIndex`, saved in ``pixel-index/``.

    Returns:
        The written paths (under ``out``) by name.
    """
    out = Path(out)
    names = {"records": "audit.jsonl", "summary": "summary.json"}
    with publish_directory(out) as staging:
        if generated is not None:
            names["generated"] = generated.save_npz(staging / "generated.npz").name
        atomic_write_text(staging / names["records"], "".join(json.dumps(r) + "\n" for r in result.records))
        if result.self_influence is not None:
            names["self_influence"] = "self_influence.jsonl"
            ranking = self_influence_ranking(result.self_influence, train.ids)
            atomic_write_text(
                staging / names["self_influence"], "".join(json.dumps(r) + "\n" for r in ranking)
            )
        if pixel_index is not None:
            pixel_index.save(staging / PIXEL_INDEX_FOLDER)
        page = write_audit_report(staging, result, train, title)
        names["report"] = str(Path(page).relative_to(staging))
        files = {k: str(out / v) for k, v in names.items()}
        result.summary["files"] = files
        atomic_write_text(staging / names["summary"], json.dumps(result.summary, indent=2) + "\n")
    return files
