"""Index answers are whole and index files are what was built.

* No padding: an approximate index that cannot fill ``k`` (HNSW, IVF at ``k = N``) is widened or
  answered exactly; every returned row is real and the scores equal Flat's.
* Tampering: the manifest records sha256 digests of ``index.faiss`` and ``kernel.npz``, checked at
  load; the method is re-derived from the vectors, not trusted from the manifest.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrac.errors import ConfigError
from retrac.query.index import SearchIndex, build_index

N, DIM = 300, 24


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, DIM)) * np.exp(0.8 * rng.standard_normal((N, 1)))  # unequal norms
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((6, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def flat(vectors):
    return build_index([vectors], N, DIM, "flat")


def _approximate(vectors, kind: str) -> SearchIndex:
    # hnsw_m=8: a sparse graph, from which an HNSW search at k = N reaches fewer than N rows
    return build_index([vectors[:100], vectors[100:]], N, DIM, kind, hnsw_m=8, target_recall=None, seed=2)


def _assert_real_and_exact(found, reference, k: int) -> None:
    """``k`` distinct real rows per query whose scores are the exact scores of those rows."""
    scores, indices = found
    assert indices.shape == scores.shape == reference[0].shape
    assert (indices >= 0).all() and (indices < N).all()
    assert all(len(set(row)) == k for row in indices.tolist())
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, reference[0], rtol=1e-5, atol=1e-4)  # same scores, same order


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "IVF8,SQ8"])
@pytest.mark.parametrize("opponents", [False, True])
def test_k_equal_n_returns_every_row_with_flats_scores(vectors, queries, flat, kind, opponents):
    index = _approximate(vectors, kind)
    raw_scores, raw_ids = index.search_as_built(queries, N, opponents=opponents)
    assert (raw_ids < 0).any(), "the index must be short at k = N for this test to mean anything"
    assert np.isnan(raw_scores[raw_ids < 0]).all()
    result = index.find(queries, N, opponents=opponents)
    reference = flat.search(queries, N, opponents=opponents)
    if kind == "IVF8,SQ8":  # SQ8 codes: the scores of decoded vectors, close to but not Flat's
        assert (result.indices >= 0).all()
        assert all(sorted(row) == list(range(N)) for row in result.indices.tolist())
        np.testing.assert_allclose(
            result.scores, reference[0], rtol=0.05, atol=0.05 * np.abs(reference[0]).max()
        )
    else:
        _assert_real_and_exact((result.scores, result.indices), reference, N)
        assert all(sorted(row) == list(range(N)) for row in result.indices.tolist())
    assert result.short == int((raw_ids < 0).any(axis=1).sum())
    assert result.note and f"k={N}" in result.note
    scores, indices = index.search(queries, N, opponents=opponents)  # the plain API returns the same
    np.testing.assert_array_equal(indices, result.indices)
    np.testing.assert_array_equal(scores, result.scores)


def test_ivf_is_filled_by_widening_nprobe_hnsw_by_the_exact_fallback(vectors, queries):
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    result = ivf.find(queries, N)
    assert result.widened == {"nprobe": nlist} and result.exact_fallback == 0  # every list scanned
    assert "nprobe" in result.note and "exact" not in result.note
    hnsw = _approximate(vectors, "hnsw")
    result = hnsw.find(queries, N)
    assert result.exact_fallback == result.short > 0  # efSearch >= k = N already: nothing to widen
    assert result.widened is None
    assert "exact search" in result.note


def test_widening_stops_as_soon_as_the_queries_are_full(vectors, queries, flat):
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    k = 40
    raw_scores, raw_ids = ivf.search_as_built(queries, k, nprobe=1)
    short = (raw_ids < 0).any(axis=1)
    assert short.any()
    result = ivf.find(queries, k, nprobe=1)
    assert result.short == int(short.sum())
    assert result.widened is not None and result.widened["nprobe"] <= nlist
    assert (result.indices >= 0).all()
    full = ~short  # queries that were full keep the answer of the asked setting
    np.testing.assert_array_equal(result.indices[full], raw_ids[full])
    scores, rows = result.scores, result.indices
    exact = (vectors[rows] * queries[:, None, :]).sum(axis=2)  # each returned score is its row's score
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-4)


def test_a_full_answer_carries_no_note(vectors, queries, flat):
    result = flat.find(queries, N)
    assert result.short == 0 and result.note is None and result.widened is None
    ivf = _approximate(vectors, "ivf")
    nlist = faiss.extract_index_ivf(ivf.index).nlist
    assert ivf.find(queries, 5, nprobe=nlist).note is None


def test_k_above_n_is_an_error_not_clipped(vectors, queries, flat):
    for index in (flat, _approximate(vectors, "hnsw")):
        with pytest.raises(ConfigError, match=rf"k={N + 1} must be an integer in \[1, {N}\].*ask for fewer"):
            index.search(queries, N + 1)
        with pytest.raises(ConfigError, match="k=0"):
            index.find(queries, 0)


def _idmap_hnsw(vectors) -> faiss.Index:
    """An index FAISS cannot reconstruct (``IDMap`` over HNSW), short at large ``k``."""
    index = faiss.index_factory(DIM, "IDMap,HNSW16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vectors, np.arange(N, dtype=np.int64))
    return index


def test_an_index_that_cannot_reconstruct_falls_back_to_its_vector_source(vectors, queries, flat):
    built = SearchIndex(
        _idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM, vector_source=lambda: iter([vectors])
    )
    result = built.find(queries, N, opponents=True)
    _assert_real_and_exact((result.scores, result.indices), flat.search(queries, N, opponents=True), N)
    assert result.exact_fallback > 0
    without = SearchIndex(_idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM)
    with pytest.raises(ConfigError, match="cannot reconstruct its vectors.*smaller k"):
        without.search(queries, N)
    wrong = SearchIndex(
        _idmap_hnsw(vectors), "factory", "IDMap,HNSW16,Flat", DIM, vector_source=lambda: iter([vectors[:10]])
    )
    with pytest.raises(ConfigError, match="read 10 vectors, the index holds 300"):
        wrong.search(queries, N)


# ---------------------------------------------------------------------------------------------------
# Tampering: digests checked at load, the method re-derived from what was built


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny store (2 checkpoints, 3 shards) and its tracin, retrac and trak indexes."""
    import torch

    from conftest import make_scheduler, make_tiny_unet
    from retrac.checkpoints import save_checkpoint
    from retrac.data import ImageDataset
    from retrac.indexer import IndexConfig, featurize_dataset
    from retrac.query.attribution import build_attribution_index

    root = tmp_path_factory.mktemp("tamper")
    checkpoints = [
        str(save_checkpoint(make_tiny_unet(seed=k), make_scheduler(), root / f"ckpt-{k}", 0.5, 10 * (k + 1)))
        for k in range(2)
    ]
    generator = torch.Generator().manual_seed(4)
    train = ImageDataset(torch.rand(10, 1, 8, 8, generator=generator) * 2 - 1, [f"z{i}" for i in range(10)])
    train.save_npz(root / "train.npz")
    config = IndexConfig(events="stratified:2", projector="dense", dim=16, shard_rows=4)
    store = featurize_dataset(checkpoints, root / "train.npz", root / "store", config, progress=False)
    for method in ("tracin", "retrac", "trak"):
        build_attribution_index(store, root / method, method, index="flat", progress=False)
    build_attribution_index(store, root / "retrac-hnsw", "retrac", index="hnsw", progress=False)
    queries = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    return {"root": root, "store": store.path, "queries": queries}


def _copy(world, name: str, tmp_path):
    import shutil

    target = tmp_path / name
    shutil.copytree(world["root"] / name, target)
    return target


def _edit_manifest(directory, reseal: bool, **changes) -> None:
    """Edit manifest entries; with ``reseal``, also recompute the seal (a deliberate forgery)."""
    import json

    from retrac.query.index import manifest_seal

    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        manifest[key] = value
    if reseal:
        manifest["seal"] = manifest_seal(manifest)
    path.write_text(json.dumps(manifest))


def _attributor(directory, **kwargs):
    from retrac.query.attribution import Attributor

    return Attributor(directory, progress=False, **kwargs)


def test_the_manifest_records_digests_and_a_seal(world):
    import json

    from retrac._io import file_sha256
    from retrac.query.index import INDEX_FORMAT_VERSION, manifest_seal

    for name, files in (("tracin", ["index.faiss"]), ("trak", ["index.faiss", "kernel.npz"])):
        directory = world["root"] / name
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["format_version"] == INDEX_FORMAT_VERSION == 2
        assert sorted(manifest["digests"]) == sorted(files)
        for file in files:
            assert manifest["digests"][file]["sha256"] == file_sha256(directory / file)
            assert manifest["digests"][file]["bytes"] == (directory / file).stat().st_size
        assert manifest["seal"] == manifest_seal(manifest)
        assert sorted(p.name for p in directory.iterdir()) == sorted([*files, "manifest.json"])
    with np.load(world["root"] / "trak" / "kernel.npz") as kernel:
        assert float(kernel["c"]) == 0.1  # the kernel file says which kernel it is


def test_a_method_relabel_is_refused_even_with_a_recomputed_seal(world, tmp_path):
    from retrac.errors import IndexDamagedError

    relabelled = {"name": "retrac", "vectors": "retrac", "kernel_c": None}
    naive = _copy(world, "tracin", tmp_path / "naive")
    _edit_manifest(naive, reseal=False, method=relabelled)
    with pytest.raises(IndexDamagedError, match="was edited after the index was built.*retrac build"):
        _attributor(naive)
    forged = _copy(world, "tracin", tmp_path / "forged")
    _edit_manifest(forged, reseal=True, method=relabelled)
    with pytest.raises(
        IndexDamagedError, match=r"rows hold tracin vectors.*names method 'retrac'.*retrac build"
    ):
        _attributor(forged)
    hnsw = _copy(world, "retrac-hnsw", tmp_path / "hnsw")  # HNSW rows are checked the same way
    _edit_manifest(hnsw, reseal=True, method={"name": "tracin", "vectors": "tracin", "kernel_c": None})
    with pytest.raises(IndexDamagedError, match="rows hold retrac vectors"):
        _attributor(hnsw)


def test_a_kernel_relabel_or_a_stray_kernel_file_is_refused(world, tmp_path):
    import shutil

    from retrac.errors import IndexDamagedError

    trak = _copy(world, "trak", tmp_path)
    _edit_manifest(trak, reseal=True, method={"name": "trak", "vectors": "tracin", "kernel_c": 0.5})
    with pytest.raises(IndexDamagedError, match="kernel.npz with c=0.1"):
        _attributor(trak)
    dropped = _copy(world, "trak", tmp_path / "dropped")
    _edit_manifest(dropped, reseal=True, method={"name": "tracin", "vectors": "tracin", "kernel_c": None})
    with pytest.raises(IndexDamagedError, match="(not part of this index's build record|holds a kernel.npz)"):
        _attributor(dropped)
    stray = _copy(world, "tracin", tmp_path / "stray")
    shutil.copy(world["root"] / "trak" / "kernel.npz", stray / "kernel.npz")
    with pytest.raises(IndexDamagedError, match="not part of this index's build record"):
        _attributor(stray)


def _scale_row(index_file, row: np.ndarray, factor: float) -> None:
    """Scale one stored vector inside a Flat index file, in place (same size)."""
    data = index_file.read_bytes()
    raw = np.ascontiguousarray(row, dtype=np.float32).tobytes()
    assert data.count(raw) == 1
    index_file.write_bytes(data.replace(raw, (row.astype(np.float32) * factor).tobytes()))


def test_a_scaled_vector_or_a_changed_kernel_is_refused_at_load(world, tmp_path):
    import faiss

    from retrac.errors import IndexDamagedError
    from retrac.query.index import load_index

    scaled = _copy(world, "retrac", tmp_path / "scaled")
    row = faiss.read_index(str(scaled / "index.faiss")).reconstruct(3)
    _scale_row(scaled / "index.faiss", row, 50.0)
    for load in (lambda: load_index(scaled), lambda: _attributor(scaled)):
        with pytest.raises(
            IndexDamagedError, match=r"index.faiss has sha256 .*retrac build --store .* --method retrac"
        ):
            load()
    kernel = _copy(world, "trak", tmp_path / "kernel")
    with np.load(kernel / "kernel.npz") as arrays:
        changed = {name: arrays[name] for name in arrays.files}
    changed["preconditioners"] = changed["preconditioners"] * 2
    with open(kernel / "kernel.npz", "wb") as handle:
        np.savez(handle, **changed)
    with pytest.raises(IndexDamagedError, match="kernel.npz has (sha256|.* bytes)"):
        _attributor(kernel)
    missing = _copy(world, "trak", tmp_path / "missing")
    (missing / "kernel.npz").unlink()
    with pytest.raises(IndexDamagedError, match="kernel.npz is missing"):
        _attributor(missing)


def test_an_index_of_the_old_format_names_the_rebuild_command(world, tmp_path):
    from retrac.errors import StoreMismatchError

    old = _copy(world, "retrac", tmp_path)
    _edit_manifest(old, reseal=False, format_version=1)
    with pytest.raises(
        StoreMismatchError, match=r"version 1; this retrac reads .* version 2.*retrac build --store"
    ):
        _attributor(old)


def test_a_whole_index_answers_and_moves_freely(world, tmp_path):
    moved = _copy(world, "retrac", tmp_path / "elsewhere")  # locations are not sealed
    first = _attributor(world["root"] / "retrac").attribute(world["queries"], k=3)
    second = _attributor(moved).attribute(world["queries"], k=3)
    np.testing.assert_array_equal(first.indices, second.indices)
    assert first.search_note is None


def test_the_attributor_reports_how_a_short_search_was_filled(world):
    attributor = _attributor(world["root"] / "retrac-hnsw")
    reference = _attributor(world["root"] / "retrac").attribute(world["queries"], k=10)
    result = attributor.attribute(world["queries"], k=10)  # k = N
    assert (result.indices >= 0).all() and np.isfinite(result.scores).all()
    np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-5, atol=1e-6)
    assert [sorted(row) for row in result.ids] == [sorted(f"z{i}" for i in range(10))] * 2
    if result.search_note is not None:  # whether HNSW fills k = N by itself depends on the graph
        assert "k=10" in result.search_note


def test_retrac_verify_checks_an_index_folder(world, tmp_path, capsys):
    from retrac.cli import main
    from retrac.verify import verify_index

    whole = verify_index(world["root"] / "trak")
    assert whole.whole and whole.checked == 2 and not whole.notes, whole.lines()
    forged = _copy(world, "tracin", tmp_path / "forged")
    _edit_manifest(forged, reseal=True, method={"name": "retrac", "vectors": "retrac", "kernel_c": None})
    naive = _copy(world, "tracin", tmp_path / "naive")
    _edit_manifest(naive, reseal=False, kind="hnsw")
    scaled = _copy(world, "retrac", tmp_path / "scaled")
    import faiss

    _scale_row(scaled / "index.faiss", faiss.read_index(str(scaled / "index.faiss")).reconstruct(0), 9.0)
    for folder, where, phrase in (
        (forged, "method", "rows hold tracin vectors"),
        (naive, "manifest.json", "was edited after the index was built"),
        (scaled, "index.faiss", "sha256"),
    ):
        report = verify_index(folder)
        assert [p.where for p in report.problems] == [where], report.lines()
        assert phrase in report.problems[0].message
        assert report.remedy.startswith("rebuild it: retrac build --store")
        capsys.readouterr()
        assert main(["verify", str(folder), "--no-progress"]) == 2
        out = capsys.readouterr().out
        assert "is damaged" in out and "retrac build --store" in out
    moved_store = _copy(world, "retrac", tmp_path / "no-store")
    _edit_manifest(moved_store, reseal=True, store={"path": str(tmp_path / "gone"), "fingerprint": "x"})
    report = verify_index(moved_store)
    assert report.whole and any("not checked against the rows" in note for note in report.notes)


def test_retrac_query_at_k_equal_n_prints_strict_json_and_warns_how_it_filled(world, tmp_path, capsys):
    import json

    from retrac.cli import main
    from retrac.data import ImageDataset
    from retrac.query.attribution import build_attribution_index

    ivf = tmp_path / "ivf"
    with pytest.warns(UserWarning):  # faiss' training-size advice is turned into retrac's own warnings
        build_attribution_index(world["store"], ivf, "retrac", index="IVF2,Flat", progress=False)
    manifest = json.loads((ivf / "manifest.json").read_text())
    manifest["search_params"] = {"nprobe": 1, "opponents": {"nprobe": 1}}  # tunable: outside the seal
    (ivf / "manifest.json").write_text(json.dumps(manifest))
    ImageDataset(world["queries"], ["q0", "q1"]).save_npz(tmp_path / "queries.npz")
    answers = {}
    for name, index in (("ivf", ivf), ("flat", world["root"] / "retrac")):
        capsys.readouterr()
        argv = ["query", "--index", str(index), "--images", str(tmp_path / "queries.npz"), "--k", "10"]
        assert main([*argv, "--json", "--query-events", "fast", "--no-progress"]) == 0
        captured = capsys.readouterr()

        def no_constants(name):
            raise AssertionError(f"{name} in the JSON output")

        answers[name] = (json.loads(captured.out, parse_constant=no_constants), captured.err)
    (document, err), (reference, _) = answers["ivf"], answers["flat"]
    result = document["results"]["retrac"]
    assert all(sorted(row) == sorted(f"z{i}" for i in range(10)) for row in result["ids"])
    np.testing.assert_allclose(
        result["scores"], reference["results"]["retrac"]["scores"], rtol=1e-5, atol=1e-6
    )
    assert "nprobe up to 2" in result["search_note"]
    assert "retrac query: warning: retrac index: the approximate index found fewer than k=10" in err
    assert "search_note" not in reference["results"]["retrac"]
    main(
        [
            "query",
            "--index",
            str(ivf),
            "--images",
            str(tmp_path / "queries.npz"),
            "--k",
            "11",
            "--no-progress",
        ]
    )
    assert "k=11 must lie in [1, 10]" in capsys.readouterr().err
