"""One documented, versioned JSON schema for query, audit and report (issue 13, item 6).

Every document is validated against its documented form (retrac.schema.models, whose fields
docs/design.md section 10 lists), for one index and for several; the CLI prints exactly what the
Python objects' ``to_dict()`` give; ids keep their type.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrac.cli import main
from retrac.data import load_dataset
from retrac.query.attribution import AttributionResult, Attributor, QueryEvents
from retrac.schema import SCHEMA_VERSION
from retrac.schema.models import MODELS, json_schema, validate_document

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


@pytest.fixture(scope="module")
def queries(quick_demo, tmp_path_factory):
    """Three held-out digits as .npz with integer ids, .npy and a folder of PNG files."""
    root = tmp_path_factory.mktemp("schema-queries")
    heldout = load_dataset(quick_demo / "heldout.npz").subset(range(3))
    np.savez(root / "int-ids.npz", images=heldout.images.numpy(), ids=np.array([7, 3, 11]))
    np.save(root / "rows.npy", heldout.images.numpy())
    (root / "pngs").mkdir()
    for name, image in zip(["b.png", "a.png", "c.png"], heldout.images, strict=True):
        Image.fromarray(((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(root / "pngs" / name)
    return {"root": root, "images": heldout.images}


def _query(quick_demo, images, *methods, extra=()):
    argv = [
        "query",
        "--images",
        str(images),
        "--k",
        "4",
        "--query-events",
        "fast",
        "--json",
        "--threads",
        "1",
    ]
    for method in methods:
        argv += ["--index", str(quick_demo / f"index-{method}")]
    return [*argv, *extra]


def test_query_document_for_one_and_several_indexes(quick_demo, queries, capsys):
    capsys.readouterr()
    assert main(_query(quick_demo, queries["root"] / "int-ids.npz", "retrac")) == 0
    one = json.loads(capsys.readouterr().out)
    validate_document(one)
    assert (one["schema"], one["schema_version"]) == ("retrac.query", SCHEMA_VERSION)
    assert list(one["results"]) == ["retrac"]
    assert one["query_ids"] == [7, 3, 11]  # integer ids stay integers
    assert main(_query(quick_demo, queries["root"] / "int-ids.npz", "tracin", "retrac")) == 0
    several = json.loads(capsys.readouterr().out)
    validate_document(several)
    assert set(several["results"]) == {"tracin", "retrac"}
    assert several["results"]["retrac"] == one["results"]["retrac"]  # the same shape either way
    assert {k: v for k, v in several.items() if k != "results"} == {
        k: v for k, v in one.items() if k != "results"
    }
    with pytest.raises(Exception, match="results"):
        validate_document({**one, "results": {}})
    with pytest.raises(Exception, match="unknown|Extra|extra"):
        validate_document({**one, "surprise": 1})


def test_query_ids_keep_the_input_type(quick_demo, queries, capsys):
    capsys.readouterr()
    assert main(_query(quick_demo, queries["root"] / "rows.npy", "retrac")) == 0
    assert json.loads(capsys.readouterr().out)["query_ids"] == [0, 1, 2]
    assert main(_query(quick_demo, queries["root"] / "pngs", "retrac")) == 0
    assert json.loads(capsys.readouterr().out)["query_ids"] == ["a.png", "b.png", "c.png"]


def test_cli_json_equals_to_dict_and_round_trips(quick_demo, queries, capsys):
    capsys.readouterr()
    assert main(_query(quick_demo, queries["root"] / "int-ids.npz", "retrac")) == 0
    cli = json.loads(capsys.readouterr().out)
    attributor = Attributor(
        [quick_demo / "index-retrac"], query_events=QueryEvents.preset("fast"), progress=False
    )
    data = load_dataset(queries["root"] / "int-ids.npz")
    result = attributor.attribute(data.images, 4, query_ids=[7, 3, 11])
    api = json.loads(json.dumps(result.to_dict()))
    assert api["query_ids"] == cli["query_ids"] and api["results"].keys() == cli["results"].keys()
    ours, theirs = api["results"]["retrac"], cli["results"]["retrac"]
    assert ours["indices"] == theirs["indices"] and ours["ids"] == theirs["ids"]
    np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-5)
    back = AttributionResult.from_dict(cli)
    assert back.query_ids == [7, 3, 11] and back.ids == result.ids
    np.testing.assert_array_equal(back.indices, result.indices)
    assert json.loads(json.dumps(back.to_dict())) == cli


def test_report_document(quick_demo, queries, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "report"
    argv = [
        "report",
        "--index",
        str(quick_demo / "index-tracin"),
        "--index",
        str(quick_demo / "index-retrac"),
    ]
    argv += ["--images", str(queries["root"] / "rows.npy"), "--out", str(out), "--k", "3"]
    assert main([*argv, "--query-events", "fast", "--threads", "1", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    validate_document(printed)
    assert printed["schema"] == "retrac.report"
    assert json.loads((out / "bias.json").read_text()) == printed


def test_every_documented_field_is_in_the_design_doc():
    text = DESIGN.read_text()
    section = text[text.index("## 10.") :]
    for name in MODELS:
        assert f"`{name}`" in section, name
        schema = json_schema(name)
        properties = [
            *schema["properties"],
            *(f for d in schema.get("$defs", {}).values() for f in d["properties"]),
        ]
        missing = [field for field in properties if not re.search(rf"`{re.escape(field)}`", section)]
        assert not missing, f"{name}: fields not documented in docs/design.md section 10: {missing}"
