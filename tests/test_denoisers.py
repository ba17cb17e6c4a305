"""Conditional denoisers: UNet2DConditionModel (text), DiT and PixArt-style transformers.

Exact-projector features equal per-sample gradients taken with plain autograd from the model called
directly (the forward call written out in the test, not retrac's); the factored projector covers
their Linear / Conv2d / norm layers (full-size factors equal the exact gradients reordered) and
reports the share it leaves out; the conditioning is per sample.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.errors import ConfigError, DataError
from retrac.projection import (
    FactoredProjector,
    flat_per_sample_gradients,
    make_projector,
    projected_gradients,
)
from retrac.projection.factored.planning import NORM_KINDS
from retrac.task import DiffusionTask
from t2i_models import (
    CONTEXT_DIM,
    MAX_TOKENS,
    make_cond_unet,
    make_dit,
    make_pixart,
    make_text_encoder,
    make_tokenizer,
)


def direct_call(model, x_t, t, c):
    """The forward call each class documents, written out here independently of retrac.denoisers."""
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return model(x_t, t, encoder_hidden_states=c).sample
    if name == "DiTTransformer2DModel":
        return model(x_t, timestep=t, class_labels=c).sample[:, :4]  # learned sigma: eps is the first half
    if name == "Transformer2DModel":
        kwargs = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        return model(x_t, timestep=t, encoder_hidden_states=c, **kwargs).sample
    raise AssertionError(name)


def autograd_gradient(model, scheduler, names, x, t: int, noise, c) -> torch.Tensor:
    """``x_t`` from ``alpha_bar`` by hand, the model called directly, MSE to eps, autograd over ``names``."""
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    out = direct_call(model, x_t[None], torch.tensor([t]), c[None])
    params = [p for name, p in model.named_parameters() if name in names]
    grads = torch.autograd.grad(((out[0] - noise) ** 2).mean(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def inputs(batch: int, events: int, conditioning: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    samples = torch.rand((batch, 4, 8, 8), generator=generator) * 2 - 1
    timesteps = torch.randint(0, 100, (batch, events), generator=generator)
    noise = torch.randn((batch, events, 4, 8, 8), generator=generator)
    if conditioning == "text":
        cond = torch.randn((batch, 5, CONTEXT_DIM), generator=generator)
    else:
        cond = torch.randint(0, 10, (batch,), generator=generator)
    return samples, timesteps, noise, cond


MODELS = {
    "unet-text": (make_cond_unet, "text"),
    "dit-class": (make_dit, "class"),
    "pixart-text": (make_pixart, "text"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_features_equal_autograd_of_the_direct_call(name):
    factory, kind = MODELS[name]
    model, scheduler = factory(), make_scheduler()
    task = DiffusionTask(
        model, scheduler, exclude=["*norm1.emb.class_embedder.*"] if kind == "class" else None
    )
    assert task.conditioning_kind == kind
    samples, timesteps, noise, cond = inputs(2, 2, kind)
    features, norms = projected_gradients(
        task, make_projector("exact", task), samples, timesteps, noise, cond
    )
    names = set(task.parameter_names)
    for b in range(2):
        for s in range(2):
            reference = autograd_gradient(
                model, scheduler, names, samples[b], int(timesteps[b, s]), noise[b, s], cond[b]
            )
            torch.testing.assert_close(features[b, s], reference, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(norms[b, s], reference.norm(), rtol=1e-5, atol=1e-7)


def reordered_exact(task: DiffusionTask, projector: FactoredProjector, grads: torch.Tensor) -> torch.Tensor:
    """Exact gradients ``(R, P)`` in the factored stage-1 layout: ``[G_w | g_b]`` per linear / conv layer
    (row-major), ``[w, b]`` per GroupNorm / LayerNorm."""
    spans, start = {}, 0
    for name, param in task.selected_parameters().items():
        spans[name] = (start, param.numel(), param.shape[0])
        start += param.numel()
    rows, blocks = grads.shape[0], []
    for layer in projector.layers:
        parts = []
        for name in (layer.weight, layer.bias):
            if name is not None:
                first, size, out = spans[name]
                part = grads[:, first : first + size]
                parts.append(part if layer.kind in NORM_KINDS else part.reshape(rows, out, -1))
        blocks.append(torch.cat(parts, dim=1 if layer.kind in NORM_KINDS else 2).reshape(rows, -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_factored_covers_their_layers_and_reports_the_share_left_out(name):
    factory, kind = MODELS[name]
    model, scheduler = factory(), make_scheduler()
    task = DiffusionTask(model, scheduler)
    projector = FactoredProjector(task, None, seed=1, layer_dim=None, second_stage="none", norms="exact")
    record = projector.to_dict()
    modules = dict(model.named_modules())
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    # left out: DiT's class-embedding tables, PixArt's bare scale_shift_table parameters
    others = [n for n, _ in model.named_parameters() if not isinstance(modules[n.rpartition(".")[0]], layers)]
    assert projector.uncovered == others
    share = sum(p.numel() for n, p in model.named_parameters() if n in others) / task.num_parameters
    assert record["uncovered_share"] == pytest.approx(share) and share < 0.05
    print(f"{name}: factored covers {1 - share:.2%} of {task.num_parameters} parameters")
    covered = DiffusionTask(model, scheduler, exclude=others) if others else task
    samples, timesteps, noise, cond = inputs(3, 1, kind, seed=4)
    x_t, target = task.noisy_inputs(samples, timesteps[:, 0], noise[:, 0])
    features, norms = projector.featurize_rows(task, x_t, timesteps[:, 0], target, cond)
    grads = flat_per_sample_gradients(covered, x_t, timesteps[:, 0], target, cond)
    torch.testing.assert_close(features, reordered_exact(covered, projector, grads), rtol=1e-4, atol=2e-6)
    # DiT runs block 0's conditioning embedding twice per forward pass: the norm covers both calls
    torch.testing.assert_close(norms, torch.linalg.vector_norm(grads, dim=1), rtol=1e-5, atol=1e-6)


def test_text_conditioning_is_per_sample():
    """Would fail if the states were ignored, or paired with the wrong sample inside a batch."""
    task = DiffusionTask(make_cond_unet(), make_scheduler())
    projector = make_projector("factored", task, dim=64, seed=0)
    samples, timesteps, noise, states = inputs(3, 2, "text", seed=7)
    together, _ = projected_gradients(task, projector, samples, timesteps, noise, states)
    for b in range(3):
        alone, _ = projected_gradients(
            task, projector, samples[b : b + 1], timesteps[b : b + 1], noise[b : b + 1], states[b : b + 1]
        )
        torch.testing.assert_close(together[b], alone[0], rtol=1e-4, atol=1e-6)
    swapped, _ = projected_gradients(task, projector, samples, timesteps, noise, states.flip(0))
    assert not torch.allclose(swapped[0], together[0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(
        swapped[1], together[1], rtol=1e-4, atol=1e-6
    )  # the middle row keeps its state


def test_prompts_through_the_text_encoder_change_the_gradient(tmp_path):
    task = DiffusionTask(
        make_cond_unet(),
        make_scheduler(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(tmp_path),
    )
    states = task.encode_prompts(["a handwritten seven", "a handwritten one", "a handwritten seven"])
    assert states.shape == (3, MAX_TOKENS, CONTEXT_DIM)
    torch.testing.assert_close(states[0], states[2])
    assert not torch.allclose(states[0], states[1])
    projector = make_projector("exact", task)
    samples, timesteps, noise, _ = inputs(1, 1, "text")
    seven, _ = projected_gradients(task, projector, samples, timesteps, noise, states[:1])
    one, _ = projected_gradients(task, projector, samples, timesteps, noise, states[1:2])
    assert not torch.allclose(seven, one, rtol=1e-3, atol=1e-6)


def test_unsupported_models_and_mismatched_parts_are_named(tmp_path):
    from diffusers import UNet2DConditionModel

    sdxl_like = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
        addition_embed_type="text",
    )
    with pytest.raises(ConfigError, match="addition_embed_type"):
        DiffusionTask(sdxl_like, make_scheduler())
    with pytest.raises(ConfigError, match="not a supported denoiser; retrac supports UNet2DModel"):
        DiffusionTask(torch.nn.Linear(2, 2), make_scheduler())
    tokenizer = make_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="takes no conditioning, not text"):
        DiffusionTask(
            make_tiny_unet(), make_scheduler(), text_encoder=make_text_encoder(), tokenizer=tokenizer
        )
    unconditional = DiffusionTask(make_tiny_unet(), make_scheduler())
    with pytest.raises(ConfigError, match="not text-conditioned"):
        unconditional.encode_prompts(["a prompt"])
    text = DiffusionTask(make_cond_unet(), make_scheduler())
    with pytest.raises(ConfigError, match="no text encoder"):
        text.encode_prompts(["a prompt"])
    samples, timesteps, noise, states = inputs(2, 1, "text")
    with pytest.raises(DataError, match="text-conditioned; give captions"):
        projected_gradients(text, make_projector("exact", text), samples, timesteps, noise)
    with pytest.raises(DataError, match=r"encoder_hidden_states have shape \(1, 5, 32\)"):
        projected_gradients(text, make_projector("exact", text), samples, timesteps, noise, states[:1])
