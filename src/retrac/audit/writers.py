"""The files of an audit: ``audit.jsonl``, ``summary.json``, ``self_influence.jsonl``, ``index.html``."""

from __future__ import annotations

import json
from pathlib import Path

from retrac._io import atomic_write_text
from retrac.audit.records import AuditResult
from retrac.audit.training import self_influence_ranking
from retrac.data import ImageDataset
from retrac.report.audit import write_audit_report


def write_audit(
    result: AuditResult, out: str | Path, train: ImageDataset, title: str = "retrac audit"
) -> dict:
    """Write ``audit.jsonl``, ``self_influence.jsonl`` (when computed), ``index.html`` and, last,
    ``summary.json``: the ``retrac.audit`` document with every written file under ``files``.

    Returns:
        The written paths by name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": out / "audit.jsonl", "summary": out / "summary.json"}
    atomic_write_text(paths["records"], "".join(json.dumps(r) + "\n" for r in result.records))
    if result.self_influence is not None:
        paths["self_influence"] = out / "self_influence.jsonl"
        ranking = self_influence_ranking(result.self_influence, train.ids)
        atomic_write_text(paths["self_influence"], "".join(json.dumps(r) + "\n" for r in ranking))
    paths["report"] = write_audit_report(out, result, train, title)
    files = {k: str(v) for k, v in paths.items()}
    result.summary["files"] = files
    atomic_write_text(paths["summary"], json.dumps(result.summary, indent=2) + "\n")
    return files
