"""Bias measurements on hand-made matrices and stores; the bias report and ``retrac report`` on a tiny store."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from by_hand import scores_by_hand
from conftest import make_scheduler, make_tiny_unet
from retrac.bias import (
    general_threshold,
    influence_spearman,
    load_outlier_ids,
    measure_bias,
    norm_timestep_profile,
    norm_timestep_profiles,
    sample_event_norms,
    sample_event_timesteps,
    score_matrix,
    spearman,
    topk_bias,
    topk_frequency,
)
from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset, load_dataset
from retrac.errors import ConfigError, DataError
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
from retrac.report.bias import write_bias_report

# ---------------------------------------------------------------------- top-k statistics by hand
TOPK = np.array([[0, 1, 2], [0, 3, 4], [0, 1, 5], [6, 7, 0]])  # Q = 4 queries, k = 3, N = 10


def test_topk_counts_by_hand():
    stats = topk_bias(
        TOPK, 10, outlier_rows=[0, 9], query_is_outlier=[False, False, False, True], fraction=0.5
    )
    # frequencies: row 0 in 4 lists, row 1 in 2, rows 2-7 in 1 each
    assert stats.frequency.tolist() == [4, 2, 1, 1, 1, 1, 1, 1, 0, 0]
    assert stats.unique == 8
    assert stats.threshold == 2  # max(2, ceil(0.5 * 4))
    assert stats.general_influential == 2 and stats.general_rows == [0, 1]
    assert stats.max_frequency_share == 1.0
    # ordinary queries 0-2: 9 slots, the outlier row 0 fills 3 of them; row 9 never appears
    assert stats.num_outliers == 2
    assert stats.outlier_share == pytest.approx(3 / 9)
    assert stats.outlier_base_rate == pytest.approx(2 / 10)
    assert stats.outlier_query_share == 1.0
    assert stats.general_outliers == 1


def test_topk_counts_default_threshold_and_no_outliers():
    stats = topk_bias(TOPK, 10)  # fraction 0.1 of 4 queries -> ceil(0.4) = 1, but at least 2
    assert stats.threshold == 2 and stats.general_influential == 2
    assert np.isnan(stats.outlier_share) and stats.num_outliers == 0
    assert json.dumps(stats.to_dict())  # JSON-ready, nan -> null


def test_topk_frequency_counts_a_sample_once_per_list_and_skips_missing():
    assert topk_frequency(np.array([[1, 1, 2], [2, -1, -1]]), 4).tolist() == [0, 1, 2, 0]


def test_topk_bias_equals_a_plain_count_on_random_lists():
    """Every statistic of ``topk_bias`` against sets and loops over a random top-k matrix with gaps."""
    rng = np.random.default_rng(3)
    q, k, n = 9, 4, 15
    indices = np.stack([rng.choice(n, size=k, replace=False) for _ in range(q)])
    indices[rng.random((q, k)) < 0.15] = -1  # FAISS's "no result"
    outliers = {2, 11, 14}
    query_is_outlier = [i in (0, 5) for i in range(q)]
    stats = topk_bias(indices, n, sorted(outliers), query_is_outlier, fraction=0.3, min_queries=2)

    lists = [{int(z) for z in row if z >= 0} for row in indices]
    frequency = [sum(z in found for found in lists) for z in range(n)]
    threshold = max(2, int(np.ceil(0.3 * q)))  # ceil(2.7) = 3
    general = sorted((z for z in range(n) if frequency[z] >= threshold), key=lambda z: (-frequency[z], z))
    ordinary = [row for row, flag in zip(indices, query_is_outlier, strict=True) if not flag]
    slots = [int(z) for row in ordinary for z in row if z >= 0]
    assert stats.frequency.tolist() == frequency
    assert stats.unique == sum(f > 0 for f in frequency)
    assert stats.threshold == threshold and stats.general_rows == general
    assert stats.general_influential == len(general) and general  # the draw has some
    assert stats.max_frequency_share == pytest.approx(max(frequency) / q)
    assert stats.num_outliers == 3 and stats.outlier_base_rate == pytest.approx(3 / n)
    assert stats.outlier_share == pytest.approx(sum(z in outliers for z in slots) / len(slots))
    hit = [any(int(z) in outliers for z in row) for row in ordinary]
    assert stats.outlier_query_share == pytest.approx(sum(hit) / len(ordinary))
    assert stats.general_outliers == len(outliers & set(general))
    assert 0 < stats.outlier_share < 1 and 0 < stats.outlier_query_share < 1  # not a trivial case


def test_norm_profile_equals_numpy_on_random_events():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(4)
    T, bins = 60, 4
    timesteps = rng.integers(0, T, size=(12, 3))
    norms = 1 + timesteps / T + 0.3 * rng.random((12, 3))
    valid = rng.random((12, 3)) < 0.8
    profile = norm_timestep_profile(norms, timesteps, T, valid, num_bins=bins)
    n, t = norms[valid], timesteps[valid]
    assert profile.num_events == valid.sum()
    assert profile.bin_edges.tolist() == [0, 15, 30, 45, 60]
    for b in range(bins):
        inside = n[(t >= 15 * b) & (t < 15 * (b + 1))]
        assert profile.count[b] == inside.size > 0
        assert profile.mean[b] == pytest.approx(inside.mean())
        assert profile.std[b] == pytest.approx(inside.std())
        assert profile.q10[b] == pytest.approx(np.percentile(inside, 10))
        assert profile.q90[b] == pytest.approx(np.percentile(inside, 90))
    assert profile.spearman == pytest.approx(spearmanr(n, t).statistic)
    assert profile.max_over_min == pytest.approx(profile.mean.max() / profile.mean.min())


@pytest.mark.parametrize(
    ("queries", "fraction", "expected"), [(20, 0.1, 2), (25, 0.1, 3), (5, 0.1, 2), (100, 0.1, 10)]
)
def test_general_threshold(queries, fraction, expected):
    assert general_threshold(queries, fraction) == expected


def test_bad_inputs_raise():
    with pytest.raises(ConfigError):
        general_threshold(10, 0.0)
    with pytest.raises(ConfigError):
        general_threshold(10, 0.1, min_queries=0)
    with pytest.raises(ConfigError):
        topk_frequency(np.array([[0, 5]]), 5)
    with pytest.raises(ConfigError):
        topk_frequency(np.array([0, 1]), 5)
    with pytest.raises(ConfigError):
        norm_timestep_profile(np.ones((2, 2)), np.zeros((2, 3)), 10)
    with pytest.raises(ConfigError):
        norm_timestep_profile(np.ones((1, 1)), np.array([[10]]), 10)
    with pytest.raises(ConfigError):
        influence_spearman(np.ones(3), np.ones(3))


# ---------------------------------------------------------------------- correlations and norm profiles
def test_spearman_by_hand_and_against_scipy():
    from scipy.stats import spearmanr

    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.integers(0, 5, size=50)  # ties in y
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_influence_spearman_uses_the_mean_over_queries():
    scores = np.array([[1.0, 5.0, 3.0], [1.0, 1.0, 5.0]])  # means 1, 3, 4
    assert influence_spearman(scores, np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert influence_spearman(scores, np.array([30.0, 20.0, 10.0])) == pytest.approx(-1.0)


def test_norm_profile_by_hand():
    norms = np.array([[1.0, 2.0], [3.0, 0.0]])
    timesteps = np.array([[0, 6], [4, -1]])
    valid = np.array([[True, True], [True, False]])
    profile = norm_timestep_profile(norms, timesteps, 10, valid, num_bins=2)
    assert profile.bin_edges.tolist() == [0, 5, 10]
    assert profile.count.tolist() == [2, 1]
    assert profile.mean.tolist() == [2.0, 2.0] and profile.std.tolist() == [1.0, 0.0]
    assert profile.spearman == pytest.approx(0.5)  # ranks of n (1, 2, 3) vs t (1, 3, 2)
    assert profile.max_over_min == 1.0 and profile.num_events == 3
    empty = norm_timestep_profile(norms, timesteps, 10, valid, num_bins=5)
    assert np.isnan(empty.mean[4]) and empty.count[4] == 0  # [8, 10) holds no event


class HandStore:
    """Store-like input: two checkpoints, three samples, two event slots (one padded)."""

    num_checkpoints = 2
    attrs = {"task": {"num_train_timesteps": 100}}
    _norms = [np.array([[1.0, 3.0], [2.0, 0.0], [4.0, 4.0]]), np.array([[5.0, 7.0], [6.0, 0.0], [8.0, 8.0]])]
    _timesteps = [np.array([[10, 90], [50, -1], [20, 30]]), np.array([[10, 90], [60, -1], [20, 30]])]
    _valid = np.array([[True, True], [True, False], [True, True]])

    def norms(self, k):
        return self._norms[k]

    def timesteps(self, k):
        return self._timesteps[k]

    def valid(self, k):
        return self._valid


def test_profiles_and_per_sample_statistics_of_a_store():
    store = HandStore()
    profiles = norm_timestep_profiles(store, num_bins=4)
    assert [p.checkpoint for p in profiles] == [0, 1] and all(p.num_events == 5 for p in profiles)
    assert profiles[1].mean[0] == pytest.approx((5 + 8) / 2)  # t in [0, 25): 10 and 20
    # sample 1 has one valid event per checkpoint: (2 + 6) / 2; sample 0: (1 + 3 + 5 + 7) / 4
    assert sample_event_norms(store).tolist() == [4.0, 4.0, 6.0]
    assert sample_event_timesteps(store).tolist() == [50.0, 55.0, 25.0]


# ---------------------------------------------------------------------- report from a tiny store
N = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny store (2 checkpoints, stratified:2, d = 32), TracIn and ReTrac flat indexes, 3 queries."""
    root = tmp_path_factory.mktemp("bias")
    checkpoints = [
        resolve_checkpoint(
            save_checkpoint(
                make_tiny_unet(seed=k), make_scheduler(), root / f"checkpoint-{k}", 0.1, 5 * (k + 1)
            )
        )
        for k in range(2)
    ]
    generator = torch.Generator().manual_seed(0)
    ids = [f"img-{i:02d}" for i in range(N - 2)] + ["outlier-000", "outlier-001"]
    ImageDataset(torch.rand((N, 1, 8, 8), generator=generator) * 2 - 1, ids, source="test").save_npz(
        root / "train.npz"
    )
    config = IndexConfig(events="stratified:2", dim=32, shard_rows=5, batch_size=5)
    store = featurize_dataset(checkpoints, root / "train.npz", root / "store", config, progress=False)
    indexes = []
    for method in ("tracin", "retrac"):
        build_attribution_index(store, root / f"index-{method}", method, index="flat", progress=False)
        indexes.append(root / f"index-{method}")
    queries = torch.rand((3, 1, 8, 8), generator=generator) * 2 - 1
    np.save(root / "queries.npy", queries.numpy())
    (root / "planted.json").write_text(
        json.dumps({"outliers": ["outlier-000", "outlier-001"], "duplicated": {}})
    )
    attributor = Attributor(indexes, query_events=QueryEvents(2, 1), progress=False)
    return {"root": root, "store": store, "indexes": indexes, "queries": queries, "attributor": attributor}


def test_score_matrix_agrees_with_the_formula_and_the_index(tiny):
    attributor, queries = tiny["attributor"], tiny["queries"]
    for method in ("tracin", "retrac"):
        scores = score_matrix(attributor, queries, method)
        assert scores.shape == (3, N)
        expected = scores_by_hand(tiny["store"], attributor.query_features(queries), method)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        result = attributor.attribute(queries, 4, method)
        np.testing.assert_allclose(
            np.sort(scores, axis=1)[:, ::-1][:, :4], result.scores, rtol=1e-4, atol=1e-6
        )


def test_measure_bias_and_report_render(tiny):
    root = tiny["root"]
    measurement = measure_bias(
        tiny["attributor"], tiny["queries"], k=3, outlier_ids=["outlier-000", "outlier-001", "not-there"]
    )
    assert set(measurement.topk) == {"tracin", "retrac"}
    assert measurement.outlier_ids == ["outlier-000", "outlier-001"]
    check_measurement_by_hand(tiny, measurement, k=3, outlier_rows={N - 2, N - 1})
    record = json.loads(json.dumps(measurement.to_dict()))
    assert record["num_outliers"] == 2
    for method, stats in measurement.topk.items():
        assert record["topk"][method]["unique"] == stats.unique
        assert record["topk"][method]["general_rows"] == stats.general_rows
        value = measurement.influence_norm_spearman[method]
        assert record["influence_norm_spearman"][method] == pytest.approx(value, abs=1e-6)
    assert record["norm_timestep_spearman"] == pytest.approx(measurement.norm_timestep_spearman, abs=1e-6)

    train = load_dataset(root / "train.npz")
    captions = [f"query {i}" for i in range(3)]
    page = write_bias_report(
        root / "report", measurement, list(zip(captions, tiny["queries"], strict=True)), train
    )
    text = page.read_text()
    for needle in ("Gradient norm against timestep", "generally influential", "tracin", "retrac", "query 2"):
        assert needle in text
    sources = re.findall(r'src="([^"]+)"', text)
    assert any(s.endswith("norm-timestep.png") for s in sources)
    assert any(s.endswith("topk-frequency.png") for s in sources)
    assert len(sources) >= 2 + 3 + 2 * 3 * 3  # figures, queries, top-3 of 3 queries under 2 methods
    for source in sources:
        assert (page.parent / source).is_file(), source


def check_measurement_by_hand(tiny, measurement, k: int, outlier_rows: set[int]) -> None:
    """Every figure of ``measure_bias`` recomputed in numpy / scipy from the store and the query gradients."""
    from scipy.stats import spearmanr

    store, attributor, queries = tiny["store"], tiny["attributor"], tiny["queries"]
    T = store.attrs["task"]["num_train_timesteps"]
    # per-sample means over checkpoints and valid events
    valid = np.stack([store.valid(c) for c in range(store.num_checkpoints)])
    norms = np.stack([store.norms(c) for c in range(store.num_checkpoints)]).astype(np.float64)
    timesteps = np.stack([store.timesteps(c) for c in range(store.num_checkpoints)]).astype(np.float64)
    mean_norm = (norms * valid).sum(axis=(0, 2)) / valid.sum(axis=(0, 2))
    mean_t = (timesteps * valid).sum(axis=(0, 2)) / valid.sum(axis=(0, 2))
    per_checkpoint = []
    for c, profile in enumerate(measurement.profiles):
        n, t = norms[c][valid[c]], timesteps[c][valid[c]]
        assert profile.num_events == valid[c].sum() == 2 * N
        assert profile.spearman == pytest.approx(spearmanr(n, t).statistic)
        edges = profile.bin_edges
        assert edges[0] == 0 and edges[-1] == T
        assert profile.count.tolist() == [
            int(((t >= a) & (t < b)).sum()) for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        per_checkpoint.append(spearmanr(n, t).statistic)
    assert measurement.norm_timestep_spearman == pytest.approx(np.mean(per_checkpoint))
    for method, stats in measurement.topk.items():
        scores = scores_by_hand(store, attributor.query_features(queries), method)
        top = np.argsort(-scores, axis=1)[:, :k]
        assert [set(row) for row in measurement.results[method].indices.tolist()] == [
            set(row) for row in top.tolist()
        ]
        frequency = np.zeros(N, dtype=int)
        for row in top:
            frequency[row] += 1
        assert stats.frequency.tolist() == frequency.tolist()
        assert stats.unique == int((frequency > 0).sum())
        assert stats.general_rows == sorted(
            np.flatnonzero(frequency >= 2).tolist(), key=lambda z: (-frequency[z], z)
        )
        assert stats.outlier_share == pytest.approx(np.isin(top, list(outlier_rows)).mean())
        influence = scores.mean(axis=0)
        assert measurement.influence_norm_spearman[method] == pytest.approx(
            spearmanr(influence, mean_norm).statistic
        )
        assert measurement.influence_timestep_spearman[method] == pytest.approx(
            spearmanr(influence, mean_t).statistic
        )


def test_report_cli(tiny, capsys):
    root = tiny["root"]
    out = root / "cli-report"
    argv = ["report", "--images", str(root / "queries.npy"), "--out", str(out), "--k", "3"]
    argv += ["--outliers", str(root / "planted.json"), "--events", "fast", "--no-progress"]
    for index in tiny["indexes"]:
        argv += ["--index", str(index)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tracin:" in printed and "retrac:" in printed and "bias.html" in printed
    record = json.loads((out / "bias.json").read_text())
    assert record["topk"]["tracin"]["num_queries"] == 3 and record["num_outliers"] == 2
    assert (out / "bias.html").is_file()


def test_report_cli_refuses_other_training_data(tiny, tmp_path, capsys):
    other = ImageDataset(torch.zeros((N, 1, 8, 8)), [f"x-{i}" for i in range(N)], source="other")
    other.save_npz(tmp_path / "other.npz")
    argv = ["report", "--images", str(tiny["root"] / "queries.npy"), "--out", str(tmp_path / "r")]
    argv += ["--index", str(tiny["indexes"][0]), "--data", str(tmp_path / "other.npz"), "--no-progress"]
    assert main(argv) == 2
    assert "ids differ" in capsys.readouterr().err


def test_load_outlier_ids(tmp_path):
    (tmp_path / "planted.json").write_text(json.dumps({"outliers": ["a", "b"], "duplicated": {}}))
    (tmp_path / "list.json").write_text(json.dumps(["c"]))
    (tmp_path / "ids.txt").write_text("d\n\ne\n")
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    assert load_outlier_ids(tmp_path / "planted.json") == ["a", "b"]
    assert load_outlier_ids(tmp_path / "list.json") == ["c"]
    assert load_outlier_ids(tmp_path / "ids.txt") == ["d", "e"]
    with pytest.raises(DataError):
        load_outlier_ids(tmp_path / "bad.json")
    with pytest.raises(DataError):
        load_outlier_ids(tmp_path / "missing.txt")
