"""``retrac demo --text --quick``: captioned digits, a tiny text model, index, build, query by prompt and step."""

from __future__ import annotations

import json

from retrac.cli import main
from retrac.demo_text import caption_of


def test_text_demo_runs_every_stage_and_its_index_answers_prompts(tmp_path, capsys):
    out = tmp_path / "text-demo"
    assert main(["demo", "--text", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "share of the top 5 proponents whose caption names the query's digit" in printed
    summary = json.loads((out / "text-demo.json").read_text())
    shares = summary["top_k_caption_share"]
    assert set(shares["own_caption"]) == {"tracin", "retrac"}
    assert set(shares["steps"]["retrac"]) == {"900", "500", "100"}
    assert all(0 <= v <= 1 for v in shares["own_caption"].values())
    assert summary["train"].endswith("train.npz") and summary["config"]["max_train"] == 128
    assert sum(summary["audit"]["verdict_counts"].values()) == 2
    assert (out / "audit" / "summary.json").is_file() and (out / "report" / "bias.html").is_file()
    # the demo's index answers the CLI as a user would ask it
    query = ["query", "--index", summary["indexes"][1], "--prompt", caption_of(7), "--k", "3", "--json"]
    assert main([*query, "--query-steps", "900,100", "--sampling-steps", "10", "--no-progress"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query_ids"] == ["sample-0@t=900", "sample-0@t=100"]
    # --overwrite replaces it in one step
    assert main(["demo", "--text", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 2
    assert "give --overwrite" in capsys.readouterr().err
