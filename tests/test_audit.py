"""The memorization audit: distances, relative distances and verdicts against numpy; outputs; bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from by_hand import scores_by_hand
from conftest import make_scheduler, make_tiny_unet
from retrac.audit import (
    AuditConfig,
    PixelIndex,
    audit_images,
    check_can_sample,
    load_training_data,
    run_audit,
    self_influence,
)
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset, load_dataset
from retrac.errors import CheckpointError, ConfigError, DataError, StoreMismatchError
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
from retrac.task import DiffusionTask

N_DISTINCT, N_NEIGHBOURS = 20, 5
DUPLICATED_ROW, DUPLICATES = 2, 6  # row 2 appears 6 times in all: more than n, so copies must count once
QUERY_EVENTS = QueryEvents(num_timesteps=2, num_noise=1, seed=0)
RECORD_KEYS = {
    "image",
    "id",
    "verdict",
    "relative_distance",
    "nn_distance",
    "mean_neighbour_distance",
    "num_neighbours",
    "thresholds",
    "nearest_row",
    "nearest_id",
    "nearest_duplicates",
    "nearest",
    "proponents",
}


def _training_set() -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((N_DISTINCT, 1, 8, 8), generator=generator) * 2 - 1
    copies = images[DUPLICATED_ROW].expand(DUPLICATES - 1, 1, 8, 8)
    images = torch.cat([images, copies])
    ids = [f"z{i:02d}" for i in range(N_DISTINCT)] + [f"z02-copy-{c}" for c in range(1, DUPLICATES)]
    return ImageDataset(images, ids, source="hand-made")


def _queries(train: ImageDataset) -> tuple[torch.Tensor, list[str]]:
    """Exact copies, slightly perturbed copies and unrelated images."""
    generator = torch.Generator().manual_seed(5)
    exact = train.images[[DUPLICATED_ROW, 7]]
    perturbed = (train.images[[4, 11]] + 0.03 * torch.randn((2, 1, 8, 8), generator=generator)).clamp(-1, 1)
    unrelated = torch.rand((2, 1, 8, 8), generator=generator) * 2 - 1
    return torch.cat([exact, perturbed, unrelated]), [
        "exact-2",
        "exact-7",
        "pert-4",
        "pert-11",
        "new-0",
        "new-1",
    ]


def _by_hand(train: ImageDataset, queries: torch.Tensor, n: int, config: AuditConfig):
    """Distances to the n nearest distinct training images, r = d1 / mean, verdicts, in float64 numpy."""
    flat = train.images[:N_DISTINCT].reshape(N_DISTINCT, -1).double().numpy()  # the distinct images
    q = queries.reshape(len(queries), -1).double().numpy()
    all_distances = np.sqrt(((q[:, None, :] - flat[None]) ** 2).sum(-1))
    order = np.argsort(all_distances, axis=1)[:, :n]
    nearest = np.take_along_axis(all_distances, order, 1)
    relative = nearest[:, 0] / nearest.mean(1)
    labels = [
        "copy" if r < config.copy_threshold else "near" if r < config.near_threshold else "novel"
        for r in relative
    ]
    return nearest, order, relative, labels


def _first_equal_rows(train: ImageDataset) -> np.ndarray:
    """Per training row, the first row holding exactly the same pixels (numpy, not retrac's grouping)."""
    flat = train.images.reshape(len(train), -1).numpy()
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def test_pixel_audit_equals_numpy():
    train = _training_set()
    queries, names = _queries(train)
    config = AuditConfig(num_neighbours=N_NEIGHBOURS, shown_neighbours=3)
    pixel_index = PixelIndex.build(train)
    assert pixel_index.num_distinct == N_DISTINCT
    result = audit_images(queries, pixel_index, None, config, names)
    nearest, order, relative, labels = _by_hand(train, queries, N_NEIGHBOURS, config)

    got_r = np.array([r["relative_distance"] for r in result.records])
    np.testing.assert_allclose(got_r, relative, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        [r["nn_distance"] for r in result.records], nearest[:, 0], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        [r["mean_neighbour_distance"] for r in result.records], nearest.mean(1), rtol=1e-9
    )
    assert [r["verdict"] for r in result.records] == labels
    assert [r["nearest_row"] for r in result.records] == order[:, 0].tolist()
    for record, row_distances, rows in zip(result.records, nearest, order, strict=True):
        assert [n["row"] for n in record["nearest"]] == rows[:3].tolist()
        np.testing.assert_allclose([n["distance"] for n in record["nearest"]], row_distances[:3], rtol=1e-9)
    # the cases the data were made for
    assert labels[:4] == ["copy"] * 4 and labels[4:] == ["novel"] * 2
    for exact in result.records[:2]:  # planted exact copies: r = 0 and verdict copy
        assert (
            exact["nn_distance"] == 0.0 and exact["relative_distance"] == 0.0 and exact["verdict"] == "copy"
        )
    assert result.records[0]["nearest_row"] == DUPLICATED_ROW and result.records[1]["nearest_row"] == 7
    for far in result.records[4:]:  # unrelated images: r above the near threshold
        assert far["relative_distance"] > config.near_threshold and far["verdict"] == "novel"
    first = _first_equal_rows(train)
    for record in result.records:
        for shown in record["nearest"]:
            assert shown["duplicates"] == int((first == first[shown["row"]]).sum())
    assert (
        result.records[0]["nearest_duplicates"] == DUPLICATES and result.records[1]["nearest_duplicates"] == 1
    )
    assert result.summary["verdict_counts"] == {"copy": 4, "near": 0, "novel": 2}
    assert result.summary["copy_rate"] == pytest.approx(4 / 6)


def test_thresholds_decide_verdicts():
    """Moving the thresholds around the hand-computed r moves the verdicts accordingly."""
    train = _training_set()
    queries, names = _queries(train)
    pixel_index = PixelIndex.build(train)
    _, _, relative, _ = _by_hand(train, queries, N_NEIGHBOURS, AuditConfig())
    cut = float(relative[5]) + 1e-6  # novel image 5 becomes near, copies stay copies
    result = audit_images(
        queries, pixel_index, None, AuditConfig(num_neighbours=N_NEIGHBOURS, near_threshold=cut), names
    )
    assert result.records[5]["verdict"] == "near"
    assert result.records[5]["thresholds"] == {"copy": 1 / 6, "near": cut}


def test_pixel_index_cache_and_mismatch(tmp_path):
    train = _training_set()
    first = PixelIndex.load_or_build(tmp_path / "pixels", train)
    manifest = json.loads((tmp_path / "pixels" / "manifest.json").read_text())
    assert manifest["fingerprint"] == train.fingerprint and manifest["image_shape"] == [1, 8, 8]
    again = PixelIndex.load_or_build(tmp_path / "pixels", train)
    queries, _ = _queries(train)
    for a, b in zip(first.search(queries, 4), again.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    other = train.subset(range(N_DISTINCT))
    with pytest.raises(StoreMismatchError, match="other training data"):
        PixelIndex.load_or_build(tmp_path / "pixels", other)


def test_bad_shapes_and_n():
    train = _training_set()
    pixel_index = PixelIndex.build(train)
    with pytest.raises(DataError, match=r"shape \(2, 1, 4, 4\)"):
        audit_images(torch.zeros(2, 1, 4, 4), pixel_index, None, AuditConfig(num_neighbours=3))
    with pytest.raises(DataError, match=r"shape \(1, 3, 8, 8\)"):
        audit_images(torch.zeros(1, 3, 8, 8), pixel_index, None, AuditConfig(num_neighbours=3))
    with pytest.raises(ConfigError, match=f"n=21 .* {N_DISTINCT} distinct images"):
        audit_images(torch.zeros(1, 1, 8, 8), pixel_index, None, AuditConfig(num_neighbours=21))
    with pytest.raises(ConfigError, match="n >= 2"):
        AuditConfig(num_neighbours=1)
    with pytest.raises(ConfigError, match="copy <= near"):
        AuditConfig(copy_threshold=0.6, near_threshold=0.5)
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        audit_images(torch.full((1, 1, 8, 8), 3.0), pixel_index, None, AuditConfig(num_neighbours=3))


def test_cannot_sample():
    conditional = DiffusionTask(make_tiny_unet(num_class_embeds=3), make_scheduler())
    with pytest.raises(CheckpointError, match="class-conditional"):
        check_can_sample(conditional)

    class NoReverse:
        config = {"num_train_timesteps": 100}

    task = DiffusionTask(make_tiny_unet(), make_scheduler())
    task.scheduler = NoReverse()
    with pytest.raises(CheckpointError, match="no reverse process"):
        check_can_sample(task)


# ------------------------------------------------------------------ with a store and attribution indexes
@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    train = _training_set()
    data_path = train.save_npz(root / "train.npz")
    checkpoints = [
        str(save_checkpoint(make_tiny_unet(seed=3 + k), make_scheduler(), root / f"ckpt-{k}", weight=0.5 + k))
        for k in range(2)
    ]
    config = IndexConfig(events="stratified:1", projector="dense", dim=32, shard_rows=16, batch_size=13)
    store = featurize_dataset(checkpoints, str(data_path), root / "store", config, progress=False)
    indexes = []
    for method in ("retrac", "tracin"):
        indexes.append(root / f"index-{method}")
        build_attribution_index(store, indexes[-1], method, index="flat", progress=False)
    queries, names = _queries(load_dataset(data_path))
    query_path = root / "queries.npz"
    ImageDataset(queries, names).save_npz(query_path)
    return {"root": root, "data": data_path, "store": store, "indexes": indexes, "queries": query_path}


def test_self_influence_is_tracin_inner_product(indexed):
    store = indexed["store"]
    got = self_influence(store)
    # SI(z) = sum_k w_k ||u_k(z)||^2; with one event per sample (stratified:1) u_k(z) = phi_k(z, e)
    assert store.num_events == 1
    expected = sum(
        w * (store.features(k)[:, 0, :].astype(np.float64) ** 2).sum(1) for k, w in enumerate(store.weights)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.shape == (store.num_samples,) and (got > 0).all()


def test_run_audit_outputs(indexed, tmp_path):
    out = tmp_path / "audit"
    config = AuditConfig(k=4, num_neighbours=N_NEIGHBOURS)
    summary = run_audit(
        indexed["indexes"],
        out,
        images=indexed["queries"],
        config=config,
        query_events=QUERY_EVENTS,
        progress=False,
    )
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 6
    train = load_dataset(indexed["data"])
    queries = load_dataset(indexed["queries"])
    _, _, relative, labels = _by_hand(train, queries.images, N_NEIGHBOURS, config)
    first = _first_equal_rows(train)
    attributor = Attributor(indexed["indexes"], query_events=QUERY_EVENTS, progress=False)
    query_features = attributor.query_features(queries.images)
    scores = {m: scores_by_hand(indexed["store"], query_features, m) for m in ("retrac", "tracin")}
    for record, r, label in zip(records, relative, labels, strict=True):
        assert set(record) == RECORD_KEYS
        assert record["verdict"] == label and record["relative_distance"] == pytest.approx(
            r, rel=1e-9, abs=1e-12
        )
        assert set(record["proponents"]) == {"retrac", "tracin"}
        for method, p in record["proponents"].items():
            assert len(p["rows"]) == len(p["ids"]) == len(p["scores"]) == 4
            assert p["ids"] == [train.ids[row] for row in p["rows"]]
            # the top 4 of the scores written out from the stored features and the query gradients
            expected = scores[method][record["image"]]
            assert set(p["rows"]) == set(np.argsort(-expected)[:4].tolist())
            np.testing.assert_allclose(p["scores"], np.sort(expected)[::-1][:4], rtol=1e-4, atol=1e-7)
            same = [first[row] == first[record["nearest_row"]] for row in p["rows"]]
            assert p["nn_rank"] == (same.index(True) + 1 if any(same) else None)
        assert {n["id"] for n in record["nearest"]} <= set(train.ids)
    assert [r["id"] for r in records] == queries.ids
    saved = json.loads((out / "summary.json").read_text())
    assert saved["verdict_counts"] == summary["verdict_counts"] == {"copy": 4, "near": 0, "novel": 2}
    assert saved["training_data"]["fingerprint"] == train.fingerprint
    assert saved["hot_spots"] == hot_spots_by_hand(records, first, train.ids, ["retrac", "tracin"])
    assert sum(h["as_nearest"] for h in saved["hot_spots"]) == 6  # one nearest image per output
    ranking = [json.loads(line) for line in (out / "self_influence.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in ranking) == list(range(len(train)))
    values = [r["self_influence"] for r in ranking]
    assert values == sorted(values, reverse=True)
    store = indexed["store"]  # stratified:1: SI(z) = sum_k w_k ||phi_k(z, e)||^2
    expected = sum(
        w * (store.features(k)[:, 0].astype(np.float64) ** 2).sum(1) for k, w in enumerate(store.weights)
    )
    np.testing.assert_allclose([expected[r["row"]] for r in ranking], values, rtol=1e-5)
    assert (out / "pixel-index" / "manifest.json").is_file() and saved["pixel_index"] == "pixel-index"
    assert not list(Path(indexed["indexes"][0]).parent.glob("pixel-index*"))  # nothing beside the index
    # the report renders: flagged images first, every referenced PNG exists
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all((out / s).is_file() for s in sources)
    audited = re.findall(r"images/audited-(\d+)\.png", page)
    verdict_of = {str(r["image"]): r["verdict"] for r in records}
    order = [verdict_of[i] for i in audited]
    assert order == sorted(order, key=["copy", "near", "novel"].index)


def hot_spots_by_hand(
    records: list[dict], first: np.ndarray, ids: list[str], methods: list[str]
) -> list[dict]:
    """Per distinct training image (named by its first row): the outputs that have it as nearest image
    or as some method's top-1 proponent, most first (ties by row)."""
    outputs, nearest, top1 = {}, {}, {m: {} for m in methods}
    for record in records:
        near = int(first[record["nearest_row"]])
        hit = {near}
        nearest[near] = nearest.get(near, 0) + 1
        for m in methods:
            g = int(first[record["proponents"][m]["rows"][0]])
            top1[m][g] = top1[m].get(g, 0) + 1
            hit.add(g)
        for g in hit:
            outputs[g] = outputs.get(g, 0) + 1
    return [
        {
            "row": g,
            "id": ids[g],
            "duplicates": int((first == g).sum()),
            "outputs": outputs[g],
            "as_nearest": nearest.get(g, 0),
            "as_top1": {m: top1[m].get(g, 0) for m in methods},
        }
        for g in sorted(outputs, key=lambda g: (-outputs[g], g))
    ]


def test_fingerprint_mismatch_named(indexed, tmp_path):
    train = load_dataset(indexed["data"])
    changed = ImageDataset(train.images.flip(0), train.ids, source=str(tmp_path / "other.npz"))
    changed.save_npz(tmp_path / "other.npz")
    store = FeatureStore.open(indexed["store"].path)
    with pytest.raises(StoreMismatchError, match=r"other\.npz.*fingerprint.*train\.npz.*fingerprint"):
        load_training_data(store, tmp_path / "other.npz")
    code = main(
        [
            "audit",
            *[f"--index={p}" for p in indexed["indexes"]],
            "--images",
            str(indexed["queries"]),
            "--data",
            str(tmp_path / "other.npz"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2


def test_run_audit_bad_input(indexed, tmp_path):
    with pytest.raises(ConfigError, match="n=50 .* 25 samples"):
        run_audit(indexed["indexes"], tmp_path, images=indexed["queries"], progress=False)
    small = tmp_path / "small.npz"
    ImageDataset(torch.zeros(2, 1, 4, 4), ["a", "b"]).save_npz(small)
    with pytest.raises(DataError, match=r"small\.npz.*shape \(2, 1, 4, 4\)"):
        run_audit(
            indexed["indexes"], tmp_path, images=small, config=AuditConfig(num_neighbours=3), progress=False
        )
    with pytest.raises(ConfigError, match="either images"):
        run_audit(indexed["indexes"], tmp_path, progress=False)


def test_cli_generate(indexed, tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(
        [
            "audit",
            "--index",
            str(indexed["indexes"][0]),
            "--generate",
            "3",
            "--sampling-steps",
            "4",
            "--neighbours",
            "4",
            "--k",
            "2",
            "--query-events",
            "fast",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["generated-0000", "generated-0001", "generated-0002"]
    assert set(records[0]["proponents"]) == {"retrac"}
    assert load_dataset(out / "generated.npz").images.shape == (3, 1, 8, 8)
    assert "copy" in capsys.readouterr().out
    assert Path(out / "index.html").is_file()
