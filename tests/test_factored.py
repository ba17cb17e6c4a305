"""The factored projector: full-size factors equal the exact gradients; seeds, batching, store round trip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import load_scheduler, load_unet, resolve_checkpoint, save_checkpoint
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.errors import ConfigError
from retrac.events import event_noise_seed, noise_from_seed
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.projection import (
    FactoredProjector,
    flat_per_sample_gradients,
    make_projector,
    projected_gradients,
)
from retrac.projection.factored import layer_features
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
from retrac.task import DiffusionTask


def rows_of(task: DiffusionTask, count: int = 6, seed: int = 0, labels: bool = False):
    """``count`` rows of model inputs ``(x_t, t, target, labels)`` for the tiny UNet."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((count, 1, 8, 8), generator=generator) * 2 - 1
    timesteps = torch.randint(0, 100, (count,), generator=generator)
    noise = torch.randn((count, 1, 8, 8), generator=generator)
    x_t, target = task.noisy_inputs(images, timesteps, noise)
    class_labels = torch.arange(count) % 3 if labels else None
    return x_t, timesteps, target, class_labels


def reordered_exact(task: DiffusionTask, projector: FactoredProjector, grads: torch.Tensor) -> torch.Tensor:
    """Exact per-sample gradients ``(R, P)`` rearranged into the factored stage-1 layout.

    Per linear / conv layer: ``[G_w | g_b]`` (``O x (I + 1)``, row-major); per GroupNorm ``[w, b]``.
    """
    spans, start = {}, 0
    for name, param in task.selected_parameters().items():
        spans[name] = (start, param.numel(), param.shape[0])
        start += param.numel()
    rows = grads.shape[0]
    blocks = []
    for layer in projector.layers:
        parts = []
        for name in (layer.weight, layer.bias):
            if name is None:
                continue
            first, size, out = spans[name]
            part = grads[:, first : first + size]
            parts.append(part if layer.kind == "groupnorm" else part.reshape(rows, out, -1))
        blocks.append(torch.cat(parts, dim=1 if layer.kind == "groupnorm" else 2).reshape(rows, -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize(
    "exclude", [[], ["*conv1.bias", "*to_q.weight", "*norm1.weight"]], ids=["all", "partial-layers"]
)
def test_full_size_factors_equal_exact_gradients_reordered(tiny_unet, scheduler, exclude):
    task = DiffusionTask(tiny_unet, scheduler, exclude=exclude)
    projector = FactoredProjector(task, None, seed=3, layer_dim=None, second_stage="none")
    assert projector.stage1_dim == task.num_parameters == projector.dim and projector.uncovered == []
    assert projector.norm_kind == "exact"
    x_t, t, target, _ = rows_of(task)
    features, norms = projector.featurize_rows(task, x_t, t, target)
    grads = flat_per_sample_gradients(task, x_t, t, target)
    expected = reordered_exact(task, projector, grads)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(grads, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["l1", "sqnorm"])
def test_full_size_factors_follow_the_objective(tiny_unet, scheduler, objective):
    task = DiffusionTask(tiny_unet, scheduler, objective=objective)
    projector = FactoredProjector(task, None, seed=0, layer_dim=None, second_stage="none")
    x_t, t, target, _ = rows_of(task, count=3)
    features, _ = projector.featurize_rows(task, x_t, t, target)
    expected = reordered_exact(task, projector, flat_per_sample_gradients(task, x_t, t, target))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=2e-6)


def test_uncovered_parameters_are_reported_and_left_out(scheduler):
    model = make_tiny_unet(num_class_embeds=3)
    task = DiffusionTask(model, scheduler)
    projector = FactoredProjector(task, None, seed=0, layer_dim=None, second_stage="none")
    record = projector.to_dict()
    assert projector.uncovered == ["class_embedding.weight"] and projector.norm_kind == "mixed"
    share = model.class_embedding.weight.numel() / task.num_parameters
    assert record["uncovered_parameters"] == model.class_embedding.weight.numel()
    assert record["uncovered_share"] == pytest.approx(share) and "left out" in record["norm_detail"]
    # the covered part equals the exact gradients of the covered parameters
    covered = DiffusionTask(model, scheduler, exclude=["class_embedding.*"])
    x_t, t, target, labels = rows_of(task, count=3, labels=True)
    features, norms = projector.featurize_rows(task, x_t, t, target, labels)
    grads = flat_per_sample_gradients(covered, x_t, t, target, labels)
    torch.testing.assert_close(features, reordered_exact(covered, projector, grads), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(grads, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second_stage", ["sparse", "dense"])
def test_fixed_seed_gives_identical_bits(tiny_unet, scheduler, second_stage):
    task = DiffusionTask(tiny_unet, scheduler)
    x_t, t, target, _ = rows_of(task)
    one = FactoredProjector(task, 64, seed=7, layer_dim=4, second_stage=second_stage, norms="exact")
    two = FactoredProjector(task, 64, seed=7, layer_dim=4, second_stage=second_stage, norms="exact")
    other = FactoredProjector(task, 64, seed=8, layer_dim=4, second_stage=second_stage, norms="exact")
    f1, n1 = one.featurize_rows(task, x_t, t, target)
    f2, n2 = two.featurize_rows(task, x_t, t, target)
    assert torch.equal(f1, f2) and torch.equal(n1, n2) and f1.shape == (6, 64)
    f3, n3 = other.featurize_rows(task, x_t, t, target)
    assert not torch.allclose(f1, f3) and torch.equal(n1, n3)  # norms are exact: seed-free


def test_projection_preserves_inner_products_on_average(tiny_unet, scheduler):
    """``E <P g, P g'> = <g, g'>``: the mean over seeds approaches the exact Gram matrix."""
    task = DiffusionTask(tiny_unet, scheduler)
    x_t, t, target, _ = rows_of(task, count=4)
    grads = flat_per_sample_gradients(task, x_t, t, target)
    exact = grads @ grads.T
    mean = torch.zeros_like(exact)
    seeds = 12
    for seed in range(seeds):
        features, _ = FactoredProjector(task, 512, seed=seed, layer_dim=8).featurize_rows(
            task, x_t, t, target
        )
        mean += features @ features.T / seeds
    assert (mean - exact).abs().max() < 0.15 * exact.diagonal().max()


def test_batch_size_and_event_grouping_do_not_change_results(tiny_unet, scheduler, images):
    task = DiffusionTask(tiny_unet, scheduler)
    projector = make_projector("factored", task, dim=48, seed=1)
    generator = torch.Generator().manual_seed(5)
    timesteps = torch.randint(0, 100, (6, 3), generator=generator)
    noise = torch.randn((6, 3, 1, 8, 8), generator=generator)
    whole, whole_norms = projected_gradients(task, projector, images, timesteps, noise)  # 18 rows, one pass
    chunked, chunked_norms = projected_gradients(task, projector, images, timesteps, noise, max_rows=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked_norms, whole_norms, rtol=1e-5, atol=1e-6)
    for s in range(3):  # one event at a time, two samples at a time
        for b in range(0, 6, 2):
            part, part_norms = projected_gradients(
                task,
                projector,
                images[b : b + 2],
                timesteps[b : b + 2, s : s + 1],
                noise[b : b + 2, s : s + 1],
            )
            torch.testing.assert_close(part[:, 0], whole[b : b + 2, s], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(part_norms[:, 0], whole_norms[b : b + 2, s], rtol=1e-5, atol=1e-6)


def test_norm_modes(tiny_unet, scheduler):
    """exact = ||grad|| with compressed factors; auto estimates it; projected = ||phi||."""
    task = DiffusionTask(tiny_unet, scheduler)
    x_t, t, target, _ = rows_of(task, count=3)
    true = torch.linalg.vector_norm(flat_per_sample_gradients(task, x_t, t, target), dim=1)
    exact = FactoredProjector(task, 256, seed=0, layer_dim=4, norms="exact")
    torch.testing.assert_close(exact.featurize_rows(task, x_t, t, target)[1], true, rtol=1e-5, atol=1e-6)
    auto = FactoredProjector(task, 256, seed=0, layer_dim=4, norms="auto")
    assert auto.norm_kind == "mixed" and "stage-1 estimate" in auto.to_dict()["norm_detail"]
    torch.testing.assert_close(auto.featurize_rows(task, x_t, t, target)[1], true, rtol=0.3, atol=0)
    projected = FactoredProjector(task, 256, seed=0, norms="projected")
    features, norms = projected.featurize_rows(task, x_t, t, target)
    assert projected.to_dict()["norm_kind"] == "projected"
    torch.testing.assert_close(norms, torch.linalg.vector_norm(features, dim=1))


def test_record_round_trips_through_make_projector(tiny_unet, scheduler):
    task = DiffusionTask(tiny_unet, scheduler)
    settings = {"layer_dim": 6, "second_stage": "dense", "norms": "projected"}
    built = make_projector("factored", task, dim=100, seed=4, checkpoint_index=1, settings=settings)
    record = built.to_dict()
    assert {k: record[k] for k in settings} == settings
    rebuilt = make_projector("factored", task, dim=record["dim"], seed=4, checkpoint_index=1, settings=record)
    assert rebuilt.to_dict() == record
    x_t, t, target, _ = rows_of(task, count=2)
    assert torch.equal(
        built.featurize_rows(task, x_t, t, target)[0], rebuilt.featurize_rows(task, x_t, t, target)[0]
    )
    other_checkpoint = make_projector("factored", task, dim=100, seed=4, checkpoint_index=0, settings=record)
    assert other_checkpoint.seed != record["seed"]


def test_bad_settings_raise(tiny_unet, scheduler):
    task = DiffusionTask(tiny_unet, scheduler)
    with pytest.raises(ConfigError, match="second_stage"):
        FactoredProjector(task, 64, 0, second_stage="gaussian")
    with pytest.raises(ConfigError, match="norms"):
        FactoredProjector(task, 64, 0, norms="approximate")
    with pytest.raises(ConfigError, match="layer_dim"):
        FactoredProjector(task, 64, 0, layer_dim=0)
    with pytest.raises(ConfigError, match="must lie in"):
        FactoredProjector(task, 10**7, 0)
    with pytest.raises(ConfigError, match="must lie in"):
        make_projector("factored", task, dim=None)
    with pytest.raises(ConfigError, match="without a second stage"):
        FactoredProjector(task, 64, 0, layer_dim=None, second_stage="none")
    only_embedding = DiffusionTask(
        make_tiny_unet(num_class_embeds=3), scheduler, include=["class_embedding.*"]
    )
    with pytest.raises(ConfigError, match="selects none"):
        FactoredProjector(only_embedding, 64, 0)
    assert IndexConfig(projector="factored").dim == 1024
    with pytest.raises(ConfigError, match="projector"):
        IndexConfig(projector="logra")


@dataclass(frozen=True)
class StoreEvents(QueryEvents):
    """Query events that reuse one stored sample's training noise (to compare both sides)."""

    fixed_noise: torch.Tensor | None = None

    def noise(self, checkpoint, shape):
        return self.fixed_noise


def test_store_and_query_side_give_identical_features(tmp_path, capsys):
    checkpoint = resolve_checkpoint(
        save_checkpoint(make_tiny_unet(seed=2), make_scheduler(), tmp_path / "ckpt")
    )
    generator = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand((5, 1, 8, 8), generator=generator) * 2 - 1, [f"img-{i}" for i in range(5)])
    data.save_npz(tmp_path / "train.npz")
    # explicit events 25, 75 = the query timesteps of T_q = 2 at T = 100
    config = IndexConfig(events="25,75", projector="factored", dim=40, batch_size=2, shard_rows=3)
    store = featurize_dataset(
        [checkpoint], tmp_path / "train.npz", tmp_path / "store", config, progress=False
    )
    record = store.attrs["projectors"][0]
    assert record["kind"] == "factored" and record["second_stage"] == "sparse" and store.norm_kind == "mixed"
    assert store.features(0).shape == (5, 2, 40) and (store.norms(0) > 0).all()
    task = DiffusionTask(load_unet(checkpoint.path), load_scheduler(checkpoint.path))
    assert store.projector(0, task).to_dict() == record

    build_attribution_index(store, tmp_path / "tracin", "tracin", index="flat", progress=False)
    for row in (0, 4):
        noise = torch.stack(
            [noise_from_seed(event_noise_seed(0, 0, data.ids[row], e), (1, 8, 8)) for e in range(2)]
        )
        events = StoreEvents(num_timesteps=2, num_noise=1, fixed_noise=noise[:, None])
        attributor = Attributor(tmp_path / "tracin", query_events=events, progress=False)
        (query,) = attributor.query_features(data.images[row : row + 1])
        np.testing.assert_allclose(query[0, :, 0], store.features(0)[row], rtol=1e-4, atol=1e-5)

    # the CLI offers the factored projector
    code = main(
        [
            "index",
            "--checkpoint",
            str(checkpoint.path),
            "--data",
            str(tmp_path / "train.npz"),
            "--out",
            str(tmp_path / "cli"),
            "--projector",
            "factored",
            "--dim",
            "32",
            "--events",
            "stratified:1",
            "--no-progress",
        ]
    )
    assert code == 0 and "factored" in capsys.readouterr().out
    assert FeatureStore.open(tmp_path / "cli").attrs["projectors"][0]["kind"] == "factored"


def test_forming_g_equals_factored_order(tiny_unet, scheduler, monkeypatch):
    """Both orders, sum_p (B g_p)(A x_p)^T and B (sum_p g_p x_p^T) A^T, give the same features."""
    task = DiffusionTask(tiny_unet, scheduler)
    x_t, t, target, _ = rows_of(task, count=3)
    projector = FactoredProjector(task, 128, seed=2, layer_dim=6, norms="exact")
    results = {}
    for formed in (False, True):
        monkeypatch.setattr(layer_features, "forms_gradient", lambda *args, f=formed: f)
        results[formed] = projector.featurize_rows(task, x_t, t, target)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
