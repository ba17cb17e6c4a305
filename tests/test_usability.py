"""Defaults that respect time and no silent overwrite (issue 13, items 8 and 9), on the quick demo:
audit samples with 100 steps by default and says how long it will take first; an existing non-empty
--out is refused without --overwrite; the audit's pixel index lives in its own folder, never beside
the index; its summary and records fit the documented schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrac.cli import main
from retrac.schema.models import validate_document


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def audited(quick_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("usability") / "audit"
    before = _snapshot(quick_demo)
    argv = ["audit", "--index", str(quick_demo / "index-retrac"), "--index", str(quick_demo / "index-tracin")]
    argv += [
        "--generate",
        "4",
        "--out",
        str(out),
        "--query-events",
        "fast",
        "--threads",
        "1",
        "--no-progress",
    ]
    return {"argv": argv, "out": out, "before": before}


def test_audit_default_steps_estimate_schema_and_own_folder(quick_demo, audited, capsys):
    capsys.readouterr()
    assert main([*audited["argv"], "--json"]) == 0
    captured = capsys.readouterr()
    assert "retrac audit: sampling 4 images x 100 steps: about" in captured.err  # said before the work
    printed = json.loads(captured.out)
    validate_document(printed)
    out = audited["out"]
    assert json.loads((out / "summary.json").read_text()) == printed  # the CLI prints what the file holds
    assert printed["audited"]["steps"] == 100  # not the scheduler's 1000
    for line in (out / "audit.jsonl").read_text().splitlines():
        validate_document(json.loads(line), "retrac.audit.record")
    assert printed["pixel_index"] == "pixel-index" and (out / "pixel-index" / "manifest.json").is_file()
    assert set(printed["files"]) >= {"records", "summary", "report", "generated"}
    assert all((out / name).is_file() for name in printed["files"].values())
    assert _snapshot(quick_demo) == audited["before"]  # nothing written beside the indexes


def test_existing_out_needs_overwrite(quick_demo, audited, tmp_path, capsys):
    out = audited["out"]
    if not (out / "summary.json").is_file():
        assert main(audited["argv"]) == 0
    capsys.readouterr()
    assert main(audited["argv"]) == 2
    assert "exists and is not empty; give --overwrite" in capsys.readouterr().err
    # build: an existing index is not replaced by another method's without --overwrite
    store = str(quick_demo / "store")
    index = tmp_path / "index"
    assert main(["build", "--store", store, "--method", "retrac", "--out", str(index), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["build", "--store", store, "--method", "tracin", "--out", str(index), "--no-progress"]) == 2
    assert json.loads((index / "manifest.json").read_text())["method"]["name"] == "retrac"
    argv = [
        "build",
        "--store",
        store,
        "--method",
        "tracin",
        "--out",
        str(index),
        "--no-progress",
        "--overwrite",
    ]
    assert main(argv) == 0
    assert json.loads((index / "manifest.json").read_text())["method"]["name"] == "tracin"
    for verb in (["demo", "--quick"], ["report", "--index", str(index), "--images", "x"]):
        capsys.readouterr()
        assert main([*verb, "--out", str(index)]) == 2
        assert "give --overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert main(["build", "--store", store, "--out", str(tmp_path / "empty"), "--no-progress"]) == 0
