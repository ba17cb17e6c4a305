"""Index parts: ``retrac build --part I/N``, one ``Attributor`` over N parts (local folders or part servers).

Relations, not numbers: Flat parts merged equal one Flat index over the whole store (same rows, same
scores, bit for bit), for proponents and opponents, with and without the kernel, local or served by
``retrac serve --search-only`` servers started on free ports; parts that miss or overlap rows are
refused naming the part; bad ``retrac query`` input is one line and exit 2.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from conftest import free_port, uvicorn_in_thread, weighted_store
from retrac.cli import main
from retrac.errors import ConfigError, IndexDamagedError
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
from retrac.query.index import read_manifest
from retrac.query.parts import PartedIndex

N_TRAIN, SHARD_ROWS, PARTS = 23, 4, 3  # parts of 7, 8, 8 rows: boundaries inside shards
QUERY_EVENTS = QueryEvents(num_timesteps=2, num_noise=1, seed=3)
METHODS = {"tracin": None, "trak": 0.1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of 23 samples, a whole Flat index per method and its 3 Flat parts, 3 query images."""
    root = tmp_path_factory.mktemp("parts")
    store, data, generator = weighted_store(root, N_TRAIN, SHARD_ROWS, model_seed=20, data_seed=4)
    whole, parts = {}, {}
    for method, kernel in METHODS.items():
        whole[method] = root / f"whole-{method}"
        build_attribution_index(store, whole[method], method, kernel=kernel, index="flat", progress=False)
        parts[method] = [root / f"parts-{method}" / f"part-{i}" for i in range(PARTS)]
        for i, out in enumerate(parts[method]):
            build_attribution_index(
                store, out, method, kernel=kernel, index="flat", progress=False, part=f"{i}/{PARTS}"
            )
    queries = torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1
    np.save(root / "queries.npy", queries.numpy())
    return {"root": root, "store": store, "whole": whole, "parts": parts, "queries": queries, "data": data}


def _attributor(indexes) -> Attributor:
    return Attributor(indexes, query_events=QUERY_EVENTS, progress=False)


def _same(got, expected) -> None:
    assert np.array_equal(got.indices, expected.indices)
    assert np.array_equal(got.scores, expected.scores)  # bit for bit
    assert got.ids == expected.ids and got.method == expected.method


@pytest.fixture(scope="module")
def reference(world):
    return _attributor(list(world["whole"].values()))


def test_part_manifest_records_rows_and_store(world):
    manifest = read_manifest(world["parts"]["tracin"][1])
    assert manifest["part"] == {"number": 1, "count": PARTS, "start": 7, "stop": 15}
    assert manifest["num_vectors"] == 8
    assert manifest["store"]["fingerprint"] == world["store"].fingerprint
    assert manifest["store"]["num_samples"] == N_TRAIN
    kernels = [read_manifest(p)["kernel"]["lambdas"] for p in world["parts"]["trak"]]
    assert (
        kernels[0] == kernels[1] == kernels[2] == read_manifest(world["whole"]["trak"])["kernel"]["lambdas"]
    )


def test_a_part_streams_the_store_s_rows_bit_for_bit(world):
    store = world["store"]
    full = np.concatenate([u for _, u in store.vector_blocks(0, "tracin", 5)])
    starts, blocks = zip(*store.vector_blocks(0, "tracin", 5, rows=(6, 19)), strict=True)
    assert starts == (6, 11, 16)
    assert np.array_equal(np.concatenate(blocks), full[6:19])


@pytest.mark.parametrize("opponents", [False, True])
def test_flat_parts_equal_one_flat_index(world, reference, opponents):
    folders = [p for method in METHODS for p in world["parts"][method]]
    for merged in (_attributor(folders), _attributor([world["root"] / f"parts-{m}" for m in METHODS])):
        for method in METHODS:
            assert isinstance(merged._method(method).index, PartedIndex)
            for k in (5, N_TRAIN):
                got = merged.attribute(world["queries"], k, method, opponents=opponents)
                _same(got, reference.attribute(world["queries"], k, method, opponents=opponents))
    got = merged.attribute(world["queries"], 4, "tracin", opponents=opponents, rerank=10)
    _same(got, reference.attribute(world["queries"], 4, "tracin", opponents=opponents, rerank=10))


def test_parts_that_miss_or_overlap_rows_are_refused(world, tmp_path):
    parts = world["parts"]["tracin"]
    with pytest.raises(ConfigError, match=r"part 1/3 \(rows 7-15\) of the tracin index is missing"):
        _attributor([parts[0], parts[2]])
    with pytest.raises(ConfigError, match="part 0/3 .* is given twice"):
        _attributor([parts[0], parts[0], parts[1], parts[2]])
    with pytest.raises(ConfigError, match="different splits"):
        _attributor([world["whole"]["tracin"], parts[1]])
    halves = [tmp_path / f"half-{i}" for i in range(2)]
    for i, out in enumerate(halves):
        build_attribution_index(world["store"], out, "tracin", index="flat", progress=False, part=(i, 2))
    with pytest.raises(ConfigError, match="different splits"):
        _attributor([halves[0], parts[1], parts[2]])
    with pytest.raises(ConfigError, match="--part 3/3 is out of range"):
        build_attribution_index(world["store"], tmp_path / "x", "tracin", part="3/3", progress=False)
    with pytest.raises(ConfigError, match="fewer than 24 parts"):
        build_attribution_index(world["store"], tmp_path / "x", "tracin", part="0/24", progress=False)


def test_an_edited_part_entry_breaks_the_seal(world, tmp_path):
    import shutil

    copy = tmp_path / "part-1"
    shutil.copytree(world["parts"]["tracin"][1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["part"]["start"], manifest["part"]["stop"] = 8, 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexDamagedError, match="edited"):
        _attributor([world["parts"]["tracin"][0], copy, world["parts"]["tracin"][2]])


# ---------------------------------------------------------------------------------- part servers
@contextlib.contextmanager
def _part_server(indexes):
    """``retrac serve --search-only`` over ``indexes`` on a free port, in a thread; its URL."""
    from retrac.serve.parts import PartService, create_part_app

    with uvicorn_in_thread(create_part_app(PartService.load(indexes))) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(world):
    """Part 0 of both methods on one server, parts 1 and 2 on one server each."""
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(
                _part_server(
                    [world["parts"][m][i] for m in METHODS]
                    if i == 0
                    else [world["parts"]["tracin"][i], world["parts"]["trak"][i]]
                )
            )
            for i in range(PARTS)
        ]
        yield urls


def test_remote_parts_equal_one_flat_index(world, reference, servers):
    remote = _attributor(servers)
    mixed = _attributor([world["parts"]["tracin"][0], servers[1], servers[2], world["parts"]["trak"][0]])
    for merged in (remote, mixed):
        for method in METHODS:
            for opponents in (False, True):
                got = merged.attribute(world["queries"], 6, method, opponents=opponents)
                _same(got, reference.attribute(world["queries"], 6, method, opponents=opponents))


def test_part_server_refuses_bad_searches(world, servers):
    import httpx

    good = {"method": "tracin", "queries": [[0.0] * reference_dim(world)], "k": 3}
    assert httpx.post(f"{servers[1]}/search", json=good).status_code == 200
    for change, status, words in [
        ({"method": "retrac"}, 404, "no 'retrac' index part here"),
        ({"k": 9}, 422, "k=9 must lie in [1, 8]"),
        ({"queries": [[0.0, 1.0]]}, 422, "dimension"),
        ({"queries": []}, 422, "query vectors in one request"),
    ]:
        answer = httpx.post(f"{servers[1]}/search", json={**good, **change})
        assert answer.status_code == status and words in answer.json()["detail"], answer.text


def reference_dim(world) -> int:
    return world["store"].dim * world["store"].num_checkpoints


def test_query_cli_over_part_servers_equals_the_whole_index(world, servers, capsys):
    common = ["query", "--images", str(world["root"] / "queries.npy"), "--k", "4", "--json", "--no-progress"]
    common += ["--query-events", "fast", "--threads", "1"]
    assert main([*common, "--index", str(world["whole"]["tracin"])]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                *common,
                "--index",
                servers[0],
                "--index",
                servers[1],
                "--index",
                servers[2],
                "--method",
                "tracin",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["results"]["tracin"] == expected["results"]["tracin"]


def test_serve_front_over_part_servers_equals_the_whole_index(world, reference, servers):
    """``retrac serve --index URL ...``: the web service's answers come from the merged parts."""
    import io

    from fastapi.testclient import TestClient

    from retrac.serve import AttributionService, ServeConfig, create_app

    service = AttributionService.load(
        servers, data=world["data"], query_events=QUERY_EVENTS, config=ServeConfig(max_k=N_TRAIN)
    )
    assert set(service.methods) == set(METHODS) and service.num_samples == N_TRAIN
    buffer = io.BytesIO()
    np.save(buffer, world["queries"].numpy())
    with TestClient(create_app(service)) as client:
        response = client.post("/attribute", files={"files": ("q.npy", buffer.getvalue())}, data={"k": 5})
    assert response.status_code == 200, response.text
    for method in METHODS:
        got = response.json()["results"][method]
        expected = reference.attribute(world["queries"], 5, method)
        assert got["ids"] == expected.ids
        assert np.array_equal(np.asarray(got["scores"], dtype=np.float32), expected.scores)


def test_query_cli_bad_parts_are_one_line_and_exit_2(world, servers, capsys):
    common = ["query", "--images", str(world["root"] / "queries.npy"), "--no-progress"]
    assert main([*common, "--index", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be reached" in err and len(err.splitlines()) == 1
    assert main([*common, "--index", servers[0], "--index", servers[2]]) == 2
    err = capsys.readouterr().err.strip()
    assert "part 1/3 (rows 7-15)" in err and "missing" in err and len(err.splitlines()) == 1


def test_build_cli_writes_a_part(world, tmp_path, capsys):
    out = tmp_path / "p"
    assert (
        main(
            [
                "build",
                "--store",
                str(world["store"].path),
                "--method",
                "tracin",
                "--kind",
                "flat",
                "--out",
                str(out),
                "--part",
                "2/3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "part 2/3 (rows 15-23) of the store" in capsys.readouterr().out
    assert (
        main(["build", "--store", str(world["store"].path), "--out", str(tmp_path / "q"), "--part", "1of3"])
        == 2
    )
    assert "--part '1of3' is not I/N" in capsys.readouterr().err
