"""One flag vocabulary across verbs (issue 13, item 5): --device / --threads / --no-progress on every verb
that computes, --query-events for the query preset (--events kept as a warning alias), build --kind
(--index kept as a warning alias), retrac --version, a clear --device cuda message, errors on their own line."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import retrac
from retrac.cli import build_parser, main
from retrac.data import load_dataset

COMPUTING_VERBS = ("demo", "index", "build", "query", "audit", "report", "serve", "lds")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize("verb", COMPUTING_VERBS)
def test_every_computing_verb_has_device_threads_no_progress(verb):
    options = _options(_subparsers()[verb])
    assert {"--device", "--threads"} <= options
    if verb != "serve":  # the server draws no progress bars
        assert "--no-progress" in options


def test_events_means_the_training_schedule_only():
    verbs = _subparsers()
    assert "--events" in _options(verbs["index"])
    for verb in ("query", "report", "audit", "serve", "lds"):
        assert "--query-events" in _options(verbs[verb]), verb
        assert "--events" not in _options(verbs[verb]), verb  # only as a hidden, warning alias
    assert "--kind" in _options(verbs["build"]) and "--index" not in _options(verbs["build"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"retrac {retrac.__version__}"


def test_python_dash_m_retrac():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retrac", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"retrac {retrac.__version__}"


@pytest.fixture(scope="module")
def demo_queries(quick_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("queries") / "queries.npz"
    load_dataset(quick_demo / "heldout.npz").subset(range(3)).save_npz(path)
    return path


def test_old_query_preset_spelling_warns_and_gives_the_same_result(quick_demo, demo_queries, capsys):
    argv = ["query", "--index", str(quick_demo / "index-retrac"), "--images", str(demo_queries), "--k", "3"]
    assert main([*argv, "--query-events", "fast", "--json", "--threads", "1"]) == 0
    new = capsys.readouterr()
    assert "deprecated" not in new.err
    assert main([*argv, "--events", "fast", "--json", "--threads", "1"]) == 0
    old = capsys.readouterr()
    assert "--events is deprecated" in old.err and "--query-events" in old.err
    assert json.loads(old.out) == json.loads(new.out)


def test_build_kind_and_its_old_spelling(quick_demo, tmp_path, capsys):
    store = str(quick_demo / "store")
    assert (
        main(["build", "--store", store, "--kind", "flat", "--out", str(tmp_path / "a"), "--no-progress"])
        == 0
    )
    assert "deprecated" not in capsys.readouterr().err
    assert (
        main(["build", "--store", store, "--index", "flat", "--out", str(tmp_path / "b"), "--no-progress"])
        == 0
    )
    err = capsys.readouterr().err
    assert "--index is deprecated" in err and "--kind" in err
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in "ab"]
    assert manifests[0]["factory"] == manifests[1]["factory"] == "Flat"


@pytest.mark.parametrize("verb", ["index", "query", "audit", "report", "demo", "lds", "serve", "build"])
def test_device_cuda_on_cpu_only_torch_is_one_clear_line(verb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    x = str(tmp_path / "x")
    required = {
        "index": ["--checkpoint", x, "--data", x, "--out", x],
        "query": ["--index", x, "--images", x],
        "audit": ["--index", x, "--images", x, "--out", x],
        "report": ["--index", x, "--images", x, "--out", x],
        "demo": ["--out", x],
        "lds": ["--data", x, "--test", x, "--out", x],
        "serve": ["--index", x],
        "build": ["--store", x, "--out", x],
    }[verb]
    assert main([verb, *required, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"retrac {verb}: error: --device 'cuda'")
    assert "--device cpu" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_auto_device_and_unknown_device(tmp_path, monkeypatch, capsys):
    from retrac.cli.options import resolve_cli_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_cli_device("auto") == "cpu"
    assert resolve_cli_device("auto", "faiss") == "auto"
    assert main(["query", "--index", "i", "--images", "q", "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a torch device" in capsys.readouterr().err


def test_error_is_not_printed_onto_a_progress_bar_line(quick_demo, demo_queries, monkeypatch, capsys):
    import retrac.query.attribution as attribution
    from retrac.errors import DataError

    calls = []

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise DataError("query 1 has a NaN gradient")
        return real(*args, **kwargs)

    real = attribution.projected_gradients
    monkeypatch.setattr(attribution, "projected_gradients", fail_on_second_batch)
    monkeypatch.setattr(attribution.Attributor, "batch_size", 1)
    argv = ["query", "--index", str(quick_demo / "index-retrac"), "--images", str(demo_queries)]
    assert main([*argv, "--query-events", "fast", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "query gradients" in err  # the bar was drawn
    line = next(line for line in err.splitlines() if "error:" in line)
    assert line.startswith("retrac query: error: query 1 has a NaN gradient")
