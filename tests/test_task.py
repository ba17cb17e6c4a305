"""DiffusionTask: the per-sample objective equals a hand-written computation."""

from __future__ import annotations

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac import DiffusionTask
from retrac.errors import ConfigError, DataError, RetracError


def _events(n: int, shape, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, 100, (n,), generator=generator)
    noise = torch.randn((n, *shape), generator=generator)
    return timesteps, noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("objective", ["loss", "l1", "sqnorm"])
def test_objective_matches_hand_written_computation(prediction_type, objective, images):
    model, scheduler = make_tiny_unet(), make_scheduler(prediction_type)
    task = DiffusionTask(model, scheduler, objective=objective)
    timesteps, noise = _events(len(images), images.shape[1:])

    got = task.per_sample_objective(images, timesteps, noise)

    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
    assert torch.allclose(x_t, scheduler.add_noise(images, noise, timesteps), atol=1e-6)
    with torch.no_grad():
        out = model(x_t, timesteps).sample
    target = {
        "epsilon": noise,
        "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * images,
        "sample": images,
    }[prediction_type]
    expected = {
        "loss": ((out - target) ** 2).mean(dim=(1, 2, 3)),
        "l1": (out - target).abs().mean(dim=(1, 2, 3)),
        "sqnorm": (out**2).mean(dim=(1, 2, 3)),
    }[objective]
    assert got.shape == (len(images),)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_rows_are_independent(images):
    task = DiffusionTask(make_tiny_unet(), make_scheduler())
    timesteps, noise = _events(len(images), images.shape[1:])
    batched = task.per_sample_objective(images, timesteps, noise).detach()
    single = torch.cat(
        [
            task.per_sample_objective(images[i : i + 1], timesteps[i : i + 1], noise[i : i + 1])
            for i in range(len(images))
        ]
    )
    torch.testing.assert_close(batched, single.detach(), rtol=1e-5, atol=1e-6)


LABELS = torch.tensor([0, 1, 2, 2, 1, 0])  # one label per image of the ``images`` fixture


def _direct_loss(model, scheduler, images, timesteps, noise, labels) -> torch.Tensor:
    """The reference: ``x_t`` from ``alpha_bar`` by hand, the UNet called directly with ``class_labels``."""
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        out = model(x_t, timesteps, class_labels=labels).sample
    return ((out - noise) ** 2).mean(dim=(1, 2, 3))


def test_class_conditional_labels_change_the_objective(images):
    task = DiffusionTask(make_tiny_unet(num_class_embeds=3), make_scheduler())
    assert task.is_class_conditional
    timesteps, noise = _events(len(images), images.shape[1:])
    shuffled = LABELS.roll(1)  # [0, 0, 1, 2, 2, 1]: rows 1, 2, 4, 5 get another label
    changed = shuffled != LABELS
    with torch.no_grad():
        got = task.per_sample_objective(images, timesteps, noise, LABELS)
        got_shuffled = task.per_sample_objective(images, timesteps, noise, shuffled)
    # each row is scored with its own label: equal to the UNet called directly, row by row
    torch.testing.assert_close(
        got, _direct_loss(task.model, task.scheduler, images, timesteps, noise, LABELS), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        got_shuffled,
        _direct_loss(task.model, task.scheduler, images, timesteps, noise, shuffled),
        rtol=1e-5,
        atol=1e-6,
    )
    # and the labels matter: rows whose label moved differ, the others do not
    assert ((got - got_shuffled).abs()[changed] > 1e-4 * got[changed].abs()).all()
    torch.testing.assert_close(got[~changed], got_shuffled[~changed], rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="class-conditional"):
        task.per_sample_objective(images, timesteps, noise)
    with pytest.raises(DataError, match="class labels must lie"):
        task.per_sample_objective(images, timesteps, noise, torch.full((len(images),), 7))


def test_parameter_selection_counts_parameters():
    model = make_tiny_unet()
    everything = DiffusionTask(model, make_scheduler())
    assert everything.num_parameters == sum(p.numel() for p in model.parameters())
    attention = DiffusionTask(model, make_scheduler(), include=["*attentions*"])
    assert all("attentions" in name for name in attention.parameter_names)
    assert 0 < attention.num_parameters < everything.num_parameters
    no_bias = DiffusionTask(model, make_scheduler(), exclude=["*.bias"])
    assert not any(name.endswith(".bias") for name in no_bias.parameter_names)
    assert f"{no_bias.num_parameters:,}" in no_bias.describe()
    with pytest.raises(ConfigError, match="select no trainable parameter"):
        DiffusionTask(model, make_scheduler(), include=["no.such.*"])


def test_bad_objective_and_prediction_type():
    with pytest.raises(ConfigError, match="objective='mse'"):
        DiffusionTask(make_tiny_unet(), make_scheduler(), objective="mse")
    scheduler = make_scheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ConfigError, match="prediction_type='flow'"):
        DiffusionTask(make_tiny_unet(), scheduler)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(2, 3, 8, 8), "has shape"),  # wrong channel count
        (torch.zeros(2, 1, 16, 16), "has shape"),  # wrong size
        (torch.zeros(0, 1, 8, 8), "empty"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), 5.0), "outside \\[-1, 1\\]"),
    ],
)
def test_bad_images_raise(bad, message):
    task = DiffusionTask(make_tiny_unet(), make_scheduler())
    n = bad.shape[0]
    with pytest.raises(DataError, match=message):
        task.per_sample_objective(bad, torch.zeros(n, dtype=torch.long), torch.zeros_like(bad))


def test_bad_timesteps_raise(images):
    task = DiffusionTask(make_tiny_unet(), make_scheduler())
    noise = torch.zeros_like(images)
    with pytest.raises(DataError, match="timesteps must be integers"):
        task.per_sample_objective(images, torch.full((len(images),), 100), noise)
    with pytest.raises(DataError, match="one timestep and one noise"):
        task.per_sample_objective(images, torch.zeros(2, dtype=torch.long), noise)
    assert issubclass(DataError, RetracError) and issubclass(RetracError, ValueError)
