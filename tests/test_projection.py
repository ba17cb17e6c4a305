"""Projectors: exact is the identity, dense is trak's seeded JL projection, one seed per checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from retrac.errors import ConfigError
from retrac.projection import (
    PROJECTOR_KINDS,
    PROJECTORS,
    DenseProjector,
    ExactProjector,
    FactoredProjector,
    GradientProjector,
    make_projector,
    projected_gradients,
    projector_from_dict,
    projector_seed,
    register_projector,
)
from retrac.task import DiffusionTask


@pytest.fixture
def exact_gradients(tiny_unet, scheduler, images):
    """Per-sample gradients ``(12, P)`` of the tiny UNet: 6 images x 2 events."""
    task = DiffusionTask(tiny_unet, scheduler)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, 100, (6, 2), generator=generator)
    noise = torch.randn((6, 2, 1, 8, 8), generator=generator)
    features, _ = projected_gradients(task, make_projector("exact", task), images, timesteps, noise)
    return features.reshape(12, -1)


def test_dense_inner_products_agree_with_exact_within_jl_tolerance(exact_gradients):
    grads = exact_gradients
    exact_gram = grads @ grads.T
    scale = grads.norm(dim=1)[:, None] * grads.norm(dim=1)[None, :]
    errors = {}
    for dim in (32, 1024):
        features = DenseProjector(grads.shape[1], dim, seed=projector_seed(0, 0)).project(grads)
        dense_gram = features @ features.T
        # JL: |<Pg, Pg'> - <g, g'>| has standard deviation <= sqrt(2 / d) ||g|| ||g'||; allow 5 sigma
        assert ((dense_gram - exact_gram).abs() <= 5 * math.sqrt(2 / dim) * scale).all()
        errors[dim] = float((dense_gram - exact_gram).norm() / exact_gram.norm())
    assert errors[1024] < errors[32]
    assert errors[1024] < 0.25


def test_dense_is_trak_basic_projector_scaled(exact_gradients):
    from trak.projectors import BasicProjector, ProjectionType

    grads = exact_gradients
    dim, seed = 250, projector_seed(3, 1)
    ours = DenseProjector(grads.shape[1], dim, seed).project(grads)
    trak = BasicProjector(
        grads.shape[1], dim, seed, ProjectionType.normal, torch.device("cpu"), block_size=100
    )
    torch.testing.assert_close(ours, trak.project(grads, model_id=0) / math.sqrt(dim), rtol=1e-4, atol=1e-5)


def test_dense_cached_and_streamed_blocks_give_identical_bits(exact_gradients):
    grads = exact_gradients
    cached = DenseProjector(grads.shape[1], 150, seed=7).project(grads)
    streamed = DenseProjector(grads.shape[1], 150, seed=7, cache_bytes=0).project(grads)
    assert torch.equal(cached, streamed)


def test_seed_per_checkpoint_is_recorded_and_changes_the_matrix(tiny_unet, scheduler):
    task = DiffusionTask(tiny_unet, scheduler)
    first, again = (make_projector("dense", task, dim=16, seed=5, checkpoint_index=0) for _ in range(2))
    second = make_projector("dense", task, dim=16, seed=5, checkpoint_index=1)
    assert first.to_dict() == again.to_dict()
    assert first.to_dict()["seed"] == projector_seed(5, 0) != second.to_dict()["seed"]
    assert first.to_dict()["norm_kind"] == "exact"
    grads = torch.randn(3, task.num_parameters, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.project(grads), again.project(grads))
    assert not torch.allclose(first.project(grads), second.project(grads))


def test_exact_projector_is_identity(tiny_unet, scheduler):
    task = DiffusionTask(tiny_unet, scheduler)
    projector = make_projector("exact", task)
    assert isinstance(projector, ExactProjector) and projector.dim == task.num_parameters
    grads = torch.randn(2, task.num_parameters)
    assert torch.equal(projector.project(grads), grads)
    assert projector.to_dict() == {
        "kind": "exact",
        "dim": task.num_parameters,
        "seed": None,
        "num_parameters": task.num_parameters,
        "norm_kind": "exact",
    }


def test_bad_projector_settings_raise(tiny_unet, scheduler):
    task = DiffusionTask(tiny_unet, scheduler)
    with pytest.raises(ConfigError, match="projector 'sparse' is unknown"):
        make_projector("sparse", task, dim=8)
    with pytest.raises(ConfigError, match="needs a dimension"):
        make_projector("dense", task)
    with pytest.raises(ConfigError, match=r"must lie in \[1, "):
        make_projector("dense", task, dim=task.num_parameters + 1)
    with pytest.raises(ConfigError, match="drop --dim"):
        make_projector("exact", task, dim=8)
    with pytest.raises(ConfigError, match="backend 'gauss' is unknown"):
        make_projector("dense", task, dim=8, backend="gauss")


def test_fast_jl_is_never_a_silent_fallback(tiny_unet, scheduler):
    pytest.importorskip("torch")
    try:
        import fast_jl  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("fast_jl and CUDA are present")
    except ImportError:
        pass
    task = DiffusionTask(tiny_unet, scheduler)
    with pytest.raises(ConfigError, match="fast_jl"):
        make_projector("dense", task, dim=512, backend="fast_jl")


def test_registry_lists_each_kind_once_in_order():
    assert PROJECTOR_KINDS == ("exact", "dense", "factored")
    assert dict(PROJECTORS) == {
        "exact": ExactProjector,
        "dense": DenseProjector,
        "factored": FactoredProjector,
    }
    assert all(cls.kind == kind for kind, cls in PROJECTORS.items())
    with pytest.raises(ValueError, match="already registered to DenseProjector"):
        register_projector("dense")(ExactProjector)
    assert PROJECTORS["dense"] is DenseProjector and ExactProjector.kind == "exact"


def test_a_registered_kind_is_built_and_rebuilt_through_the_factories(tiny_unet, scheduler):
    """A new projector is one class with ``@register_projector``: make_projector and
    projector_from_dict reach it with no other change."""

    class Negated(GradientProjector):
        def __init__(self, num_parameters: int, seed: int) -> None:
            super().__init__(num_parameters, num_parameters, seed)

        @classmethod
        def create(cls, task, dim, seed, backend, settings):
            return cls(task.num_parameters, seed)

        @classmethod
        def from_record(cls, record, task):
            return cls(task.num_parameters, int(record["seed"]))

        def project(self, grads):
            return -grads

    task = DiffusionTask(tiny_unet, scheduler)
    try:
        register_projector("negated")(Negated)
        built = make_projector("negated", task, seed=5, checkpoint_index=2)
        assert isinstance(built, Negated) and built.seed == projector_seed(5, 2)
        record = built.to_dict()
        assert record["kind"] == "negated"
        assert projector_from_dict(record, task).to_dict() == record
    finally:
        PROJECTORS.pop("negated", None)
    with pytest.raises(ConfigError, match="projector 'negated' is unknown"):
        make_projector("negated", task)
    with pytest.raises(ConfigError, match="unknown to this retrac"):
        projector_from_dict(record, task)
