"""projected_gradients: the one path from (samples, events) to per-sample gradient features and norms."""

from __future__ import annotations

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.errors import DataError, GradientError
from retrac.projection import make_projector, projected_gradients, vmap_friendly_attention
from retrac.task import DiffusionTask


def autograd_gradient(task: DiffusionTask, image, t, noise, label=None) -> torch.Tensor:
    """The reference: one sample, one event, plain autograd, flattened in parameter order."""
    task.model.zero_grad(set_to_none=True)
    labels = None if label is None else torch.tensor([label])
    task.per_sample_objective(image[None], torch.tensor([t]), noise[None], labels).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in task.selected_parameters().values()])


def events(batch: int, num_events: int, seed: int = 0, T: int = 100):
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, T, (batch, num_events), generator=generator)
    noise = torch.randn((batch, num_events, 1, 8, 8), generator=generator)
    return timesteps, noise


@pytest.mark.parametrize("objective", ["loss", "l1", "sqnorm"])
def test_exact_features_equal_autograd_one_sample_at_a_time(images, objective):
    task = DiffusionTask(make_tiny_unet(), make_scheduler(), objective=objective)
    projector = make_projector("exact", task)
    timesteps, noise = events(4, 2)
    features, norms = projected_gradients(task, projector, images[:4], timesteps, noise)
    assert features.shape == (4, 2, task.num_parameters) and norms.shape == (4, 2)
    for b in range(4):
        for s in range(2):
            reference = autograd_gradient(task, images[b], int(timesteps[b, s]), noise[b, s])
            torch.testing.assert_close(features[b, s], reference, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(norms[b, s], reference.norm(), rtol=1e-5, atol=1e-7)


def direct_gradient(model, scheduler, names, image, t: int, noise, label: int) -> torch.Tensor:
    """The class-conditional reference without retrac: ``x_t`` and the v target by hand, the UNet called
    directly with ``class_labels``, the mean squared error, plain autograd over ``names`` (model order)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * image + (1 - alpha_bar).sqrt() * noise
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * image
    out = model(x_t[None], torch.tensor([t]), class_labels=torch.tensor([label])).sample[0]
    params = [p for name, p in model.named_parameters() if name in names]
    grads = torch.autograd.grad(((out - v) ** 2).mean(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_class_conditional_v_prediction_and_parameter_subset(images):
    task = DiffusionTask(
        make_tiny_unet(num_class_embeds=3),
        make_scheduler("v_prediction"),
        include=["down_blocks.*", "class_embedding.*"],
    )
    names = set(task.parameter_names)
    assert "class_embedding.weight" in names
    labels = torch.tensor([0, 2, 1])
    timesteps, noise = events(3, 2, seed=3)
    features, _ = projected_gradients(
        task, make_projector("exact", task), images[:3], timesteps, noise, labels
    )
    assert features.shape[-1] == task.num_parameters < sum(p.numel() for p in task.model.parameters())
    for b in range(3):
        for s in range(2):
            args = (task.model, task.scheduler, names, images[b], int(timesteps[b, s]), noise[b, s])
            reference = direct_gradient(*args, int(labels[b]))
            torch.testing.assert_close(features[b, s], reference, rtol=1e-4, atol=1e-6)
            # another label gives another gradient: the comparison above can see a wrong label
            other = direct_gradient(*args, (int(labels[b]) + 1) % 3)
            assert (features[b, s] - other).norm() > 1e-2 * reference.norm()


def test_chunking_and_batch_composition_do_not_change_results(tiny_unet, scheduler, images):
    task = DiffusionTask(tiny_unet, scheduler)
    projector = make_projector("dense", task, dim=64, seed=1)
    timesteps, noise = events(6, 3)
    whole, whole_norms = projected_gradients(task, projector, images, timesteps, noise)
    chunked, chunked_norms = projected_gradients(task, projector, images, timesteps, noise, max_rows=4)
    halves = [
        projected_gradients(task, projector, images[i : i + 3], timesteps[i : i + 3], noise[i : i + 3])
        for i in (0, 3)
    ]
    # float32 sums in another order: entries near zero differ by a few 1e-6 of the largest entry
    atol = 1e-5 * float(whole.abs().max())
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=atol)
    torch.testing.assert_close(chunked_norms, whole_norms)
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole, rtol=1e-4, atol=atol)


def test_invalid_slots_are_skipped_and_zero(tiny_unet, scheduler, images):
    task = DiffusionTask(tiny_unet, scheduler)
    projector = make_projector("exact", task)
    timesteps, noise = events(2, 3)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    padded = timesteps.clone()
    padded[~valid] = -1  # invalid slots may hold any timestep
    features, norms = projected_gradients(task, projector, images[:2], padded, noise, valid=valid)
    full, full_norms = projected_gradients(task, projector, images[:2], timesteps, noise)
    assert (features[~valid] == 0).all() and (norms[~valid] == 0).all()
    torch.testing.assert_close(features[valid], full[valid], rtol=1e-4, atol=1e-6)
    assert (norms[valid] > 0).all()


def test_attention_processors_are_restored(tiny_unet):
    from diffusers.models.attention_processor import Attention

    before = [m.processor for m in tiny_unet.modules() if isinstance(m, Attention)]
    with vmap_friendly_attention(tiny_unet):
        during = [m.processor for m in tiny_unet.modules() if isinstance(m, Attention)]
    after = [m.processor for m in tiny_unet.modules() if isinstance(m, Attention)]
    assert before and all(a is b for a, b in zip(before, after, strict=True))
    assert all(a is not b for a, b in zip(before, during, strict=True))


def test_nan_gradient_names_sample_and_event(tiny_unet, scheduler, images):
    task = DiffusionTask(tiny_unet, scheduler)
    timesteps, noise = events(2, 2)
    noise[1, 1, 0, 0, 0] = float("nan")
    with pytest.raises(GradientError, match=r"sample 'b'.*event 1"):
        projected_gradients(
            task, make_projector("exact", task), images[:2], timesteps, noise, sample_ids=["a", "b"]
        )


def test_bad_shapes_raise(tiny_unet, scheduler, images):
    task = DiffusionTask(tiny_unet, scheduler)
    projector = make_projector("exact", task)
    timesteps, noise = events(2, 2)
    with pytest.raises(DataError, match="timesteps have shape"):
        projected_gradients(task, projector, images[:2], timesteps[:, 0], noise)
    with pytest.raises(DataError, match="noise has shape"):
        projected_gradients(task, projector, images[:2], timesteps, noise[:, :1])
    with pytest.raises(DataError, match="sample ids"):
        projected_gradients(task, projector, images[:2], timesteps, noise, sample_ids=["a"])
    with pytest.raises(DataError, match=r"\[0, 100\)"):
        projected_gradients(task, projector, images[:2], timesteps + 100, noise)
