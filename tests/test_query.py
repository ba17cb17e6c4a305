"""Query side: TracIn / ReTrac / kernel scores from raw gradients equal docs/design.md section 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac import DiffusionTask
from retrac.checkpoints import save_checkpoint
from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError, StoreMismatchError
from retrac.events import event_noise_seed, noise_from_seed
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index, train_vector_blocks
from retrac.query.index import recall_at_k
from retrac.query.vectors import Method

INCLUDE = ("conv_out.*", "up_blocks.1.resnets.0.conv2.*")  # 657 parameters: exact gradients stay small
N_TRAIN, S, SEED = 24, 2, 7
QUERY_EVENTS = QueryEvents(num_timesteps=3, num_noise=2, seed=1)
WEIGHTS = (0.5, 1.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    paths = [
        str(save_checkpoint(make_tiny_unet(seed=10 + k), make_scheduler(), root / f"ckpt-{k}", weight=w))
        for k, w in enumerate(WEIGHTS)
    ]
    generator = torch.Generator().manual_seed(0)
    data = ImageDataset(
        torch.rand(N_TRAIN, 1, 8, 8, generator=generator) * 2 - 1, [f"z{i}" for i in range(N_TRAIN)]
    )
    config = IndexConfig(
        events=f"stratified:{S}", projector="exact", seed=SEED, include=INCLUDE, shard_rows=8
    )
    store = featurize_dataset(paths, data, root / "store", config, progress=False)
    queries = torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1
    indexes = {}
    for method, kernel in [("tracin", None), ("retrac", None), ("trak", None), ("retrac", 0.2)]:
        name = method if kernel is None else f"{method}+kernel"
        indexes[name] = root / f"index-{name}"
        build_attribution_index(store, indexes[name], method, kernel=kernel, index="flat", progress=False)
    return {
        "root": root,
        "paths": paths,
        "data": data,
        "store": store,
        "queries": queries,
        "indexes": indexes,
    }


def _gradient(task: DiffusionTask, image, t: int, noise) -> np.ndarray:
    """One per-sample gradient with plain autograd, flattened in the task's parameter order."""
    params = task.selected_parameters()
    loss = task.per_sample_objective(image[None], torch.tensor([t]), noise[None])[0]
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double().numpy()


@pytest.fixture(scope="module")
def raw_gradients(setup):
    """Per-event gradients with plain autograd: per checkpoint, train ``(N, S, P)`` and query ``(n, T_q, M, P)``."""
    from retrac.checkpoints import load_scheduler, load_unet

    data, queries, store = setup["data"], setup["queries"], setup["store"]
    train, query = [], []
    for k, path in enumerate(setup["paths"]):
        task = DiffusionTask(load_unet(path), load_scheduler(path), include=INCLUDE)
        timesteps = store.timesteps(k)
        train.append(
            np.stack(
                [
                    [
                        _gradient(
                            task,
                            data.images[i],
                            int(timesteps[i, e]),
                            noise_from_seed(event_noise_seed(SEED, k, sid, e), (1, 8, 8)),
                        )
                        for e in range(S)
                    ]
                    for i, sid in enumerate(data.ids)
                ]
            )
        )
        taus, noise = QUERY_EVENTS.timesteps(100), QUERY_EVENTS.noise(k, (1, 8, 8))
        query.append(
            np.stack(
                [
                    [
                        [_gradient(task, image, int(tau), noise[j, m]) for m in range(QUERY_EVENTS.num_noise)]
                        for j, tau in enumerate(taus)
                    ]
                    for image in queries
                ]
            )
        )
    return train, query


def _reference(raw_gradients, kind: str):
    """u_k for every train sample and q_k for every query, from raw gradients (docs/design.md section 1)."""
    u_all, q_all = [], []
    for train, query in zip(*raw_gradients, strict=True):
        if kind == "retrac":
            train = train / np.linalg.norm(train, axis=-1, keepdims=True)  # phi / n_k
        u_all.append(train.mean(axis=1))  # mean over events
        g = query.mean(axis=2)  # g_kj = mean_m grad
        if kind == "retrac":
            g = g / np.linalg.norm(g, axis=-1, keepdims=True)  # g_kj / ||g_kj||
        q_all.append(g.mean(axis=1))  # mean over timesteps
    return u_all, q_all


@pytest.fixture(scope="module")
def attributor(setup):
    return Attributor(list(setup["indexes"].values()), query_events=QUERY_EVENTS, progress=False)


def _all_scores(result, n_train: int) -> np.ndarray:
    scores = np.zeros((result.indices.shape[0], n_train))
    np.put_along_axis(scores, result.indices, result.scores, axis=1)
    return scores


@pytest.mark.parametrize("kind", ["tracin", "retrac"])
def test_exact_flat_scores_equal_design_formulas(setup, attributor, raw_gradients, kind):
    u_all, q_all = _reference(raw_gradients, kind)
    expected = sum(w * q @ u.T for w, u, q in zip(WEIGHTS, u_all, q_all, strict=True))  # sum_k w_k <u_k, q_k>
    result = attributor.attribute(setup["queries"], k=N_TRAIN, method=kind)
    got = _all_scores(result, N_TRAIN)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    assert result.indices.shape == result.scores.shape == (3, N_TRAIN)
    assert (np.diff(result.scores, axis=1) <= 0).all()  # best first
    assert result.ids[0][0] == setup["data"].ids[result.indices[0, 0]]


@pytest.mark.parametrize(("method", "kind", "c"), [("trak", "tracin", 0.1), ("retrac+kernel", "retrac", 0.2)])
def test_kernel_scores_equal_sample_space_push_through(setup, attributor, raw_gradients, method, kind, c):
    u_all, q_all = _reference(raw_gradients, kind)
    expected = 0
    for w, phi, q in zip(WEIGHTS, u_all, q_all, strict=True):
        lam = c * np.mean((phi**2).sum(axis=1))  # lambda_k = c * mean_z ||u_k(z)||^2
        # sample space: Q Phi^T (Phi Phi^T + lambda I)^-1   (N x N instead of d x d)
        expected = expected + w * q @ phi.T @ np.linalg.inv(phi @ phi.T + lam * np.eye(len(phi)))
    got = _all_scores(attributor.attribute(setup["queries"], k=N_TRAIN, method=method), N_TRAIN)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_flat_scores_equal_brute_force_over_store_vectors(setup, attributor):
    for method in ("tracin", "retrac"):
        train = np.concatenate(list(train_vector_blocks(setup["store"], Method.named(method), block_rows=5)))
        queries = attributor.query_vectors(setup["queries"], method)
        brute = queries @ train.T
        result = attributor.attribute(setup["queries"], k=10, method=method)
        np.testing.assert_array_equal(result.indices, np.argsort(-brute, axis=1)[:, :10])
        np.testing.assert_allclose(
            result.scores, np.take_along_axis(brute, result.indices, axis=1), rtol=1e-5
        )


def test_retrac_scores_are_bounded_by_the_weights(setup, attributor):
    bound = sum(WEIGHTS)
    for opponents in (False, True):
        scores = attributor.attribute(
            setup["queries"], k=N_TRAIN, method="retrac", opponents=opponents
        ).scores
        assert np.abs(scores).max() <= bound + 1e-5


def test_opponents_are_the_most_negative_scores(setup, attributor):
    everything = attributor.attribute(setup["queries"], k=N_TRAIN, method="tracin")
    opponents = attributor.attribute(setup["queries"], k=5, method="tracin", opponents=True)
    assert opponents.opponents
    np.testing.assert_allclose(opponents.scores, everything.scores[:, ::-1][:, :5], rtol=1e-6)
    assert (np.diff(opponents.scores, axis=1) >= 0).all()


def test_batch_size_of_queries_does_not_change_scores(setup):
    one = Attributor(setup["indexes"]["tracin"], query_events=QUERY_EVENTS, batch_size=1, progress=False)
    many = Attributor(setup["indexes"]["tracin"], query_events=QUERY_EVENTS, batch_size=3, progress=False)
    a, b = one.attribute(setup["queries"], k=5), many.attribute(setup["queries"], k=5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_approximate_indexes_reach_recall_on_store_vectors(setup, tmp_path):
    exact = Attributor(setup["indexes"]["retrac"], query_events=QUERY_EVENTS, progress=False)
    queries = exact.query_vectors(setup["data"].images[:16], "retrac")
    train = np.concatenate(list(train_vector_blocks(setup["store"], Method.named("retrac"))))
    truth = np.argsort(-(queries @ train.T), axis=1)[:, :10]
    for kind in ("hnsw", "ivf"):
        built = build_attribution_index(setup["store"], tmp_path / kind, "retrac", index=kind, progress=False)
        from retrac.query.index import search

        _, found = search(built, queries, 10)
        assert recall_at_k(found, truth, 10) >= 0.95


def test_method_presets_and_objective_checks(setup, tmp_path):
    assert Method.named("trak") == Method("trak", "tracin", 0.1)
    assert Method.named("dtrak", kernel=0.5).kernel_c == 0.5
    assert Method.named("retrac", kernel=0.3).name == "retrac+kernel"
    with pytest.raises(ConfigError, match="method 'bogus' is unknown"):
        Method.named("bogus")
    with pytest.raises(StoreMismatchError, match="--objective sqnorm"):
        build_attribution_index(setup["store"], tmp_path / "d", "dtrak", progress=False)
    with pytest.raises(ConfigError):
        build_attribution_index(
            setup["store"], tmp_path / "f", "tracin", index="NotAFactory,Foo", progress=False
        )


def test_bad_queries_raise(setup, attributor):
    with pytest.raises(DataError, match="has shape"):
        attributor.attribute(torch.zeros(2, 3, 8, 8), method="tracin")
    nan = setup["queries"].clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        attributor.attribute(nan, method="tracin")
    with pytest.raises(ConfigError, match="k=25"):
        attributor.attribute(setup["queries"], k=N_TRAIN + 1, method="tracin")
    with pytest.raises(ConfigError, match="name the method"):
        attributor.attribute(setup["queries"])
    with pytest.raises(ConfigError, match="no index of method 'dtrak'"):
        attributor.attribute(setup["queries"], method="dtrak")


def test_index_of_another_store_is_refused(setup, tmp_path):
    other_data = setup["data"].subset(range(N_TRAIN - 1))
    config = IndexConfig(
        events=f"stratified:{S}", projector="exact", seed=SEED, include=INCLUDE, shard_rows=8
    )
    other = featurize_dataset(setup["paths"], other_data, tmp_path / "other", config, progress=False)
    with pytest.raises(StoreMismatchError):
        Attributor(setup["indexes"]["tracin"], store=other.path, progress=False)
    # a manifest whose method was edited no longer matches its index
    edited = tmp_path / "edited"
    build_attribution_index(setup["store"], edited, "tracin", index="flat", progress=False)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["checkpoints"][0]["weight"] = 99.0
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatchError, match="weight"):
        Attributor(edited, progress=False)
    with pytest.raises(DataError, match="not a retrac index"):
        Attributor(tmp_path, progress=False)


def test_changed_checkpoint_weights_are_refused(setup, tmp_path):
    import shutil

    moved = tmp_path / "ckpt"
    shutil.copytree(setup["paths"][0], moved)
    store_copy = tmp_path / "store"
    shutil.copytree(setup["store"].path, store_copy)
    attrs_file = store_copy / "zarr.json"
    attrs = json.loads(attrs_file.read_text())
    attrs["attributes"]["checkpoints"][0]["path"] = str(moved)
    attrs_file.write_text(json.dumps(attrs))
    build_attribution_index(store_copy, tmp_path / "index", "tracin", index="flat", progress=False)
    save_checkpoint(make_tiny_unet(seed=99), make_scheduler(), moved)  # overwrite the weights
    with pytest.raises(StoreMismatchError, match="not the checkpoint that was indexed"):
        Attributor(tmp_path / "index", progress=False)
    assert FeatureStore.open(store_copy).checkpoints[0].path == str(moved)
