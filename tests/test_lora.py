"""LoRA: gradients of the adapter's parameters only, loaded from diffusers' pytorch_lora_weights.safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_scheduler
from retrac.data import ImageDataset
from retrac.errors import CheckpointError
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.pipeline import ModelParts, load_denoiser
from retrac.projection import FactoredProjector, make_projector, projected_gradients
from retrac.query.attribution import Attributor, build_attribution_index
from retrac.task import DiffusionTask
from t2i_models import CONTEXT_DIM, make_cond_unet, make_text_encoder, make_tokenizer, make_vae, save_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def with_adapter(unet, seed: int, rank: int = 4):
    """``unet`` with a peft LoRA adapter as diffusers' LoRA training script adds it, B made non-zero."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return unet


def save_lora(unet, folder):
    """Save the adapter as diffusers' train_text_to_image_lora.py does."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_pipeline(
        root / "base",
        make_cond_unet(),
        make_scheduler(),
        vae=make_vae(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(root / "vocab"),
    )
    checkpoints = [
        save_lora(with_adapter(make_cond_unet(), seed), root / f"out/checkpoint-{seed}") for seed in (1, 2)
    ]
    return root, base, checkpoints


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((2, 4, 8, 8), generator=generator) * 2 - 1
    t = torch.randint(0, 100, (2, 2), generator=generator)
    noise = torch.randn((2, 2, 4, 8, 8), generator=generator)
    states = torch.randn((2, 6, CONTEXT_DIM), generator=generator)
    return x, t, noise, states


def full_gradient(model, scheduler, x, t: int, noise, states) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (base and adapter), plain autograd, the model called directly."""
    for param in model.parameters():
        param.requires_grad_(True)
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    out = model(x_t[None], torch.tensor([t]), encoder_hidden_states=states[None]).sample[0]
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(((out - noise) ** 2).mean(), params)
    return dict(zip(names, grads, strict=True))


def test_lora_only_features_equal_the_full_gradient_restricted_to_the_adapter(lora_run):
    root, base, checkpoints = lora_run
    model, lora = load_denoiser(checkpoints[0], base / "unet")
    assert lora["num_tensors"] == len(TARGETS) * 2 * 8  # 4 transformer blocks x (attn1, attn2) x (A, B)
    task = DiffusionTask(model, make_scheduler(), vae=make_vae())
    assert all(".retrac." in name for name in task.parameter_names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".retrac." not in n)  # base frozen
    x, t, noise, states = inputs()
    features, _ = projected_gradients(task, make_projector("exact", task), x, t, noise, states)
    # the reference: the adapter trained in the test (adapter "default"), every parameter's gradient taken
    reference_model = with_adapter(make_cond_unet(), seed=1).eval()
    adapter = [n for n, _ in reference_model.named_parameters() if "lora_" in n]
    assert len(adapter) == len(task.parameter_names)
    for b in range(2):
        for s in range(2):
            grads = full_gradient(reference_model, task.scheduler, x[b], int(t[b, s]), noise[b, s], states[b])
            reference = torch.cat([grads[n].reshape(-1) for n in adapter])
            torch.testing.assert_close(features[b, s], reference, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated on the base


def test_factored_hooks_only_the_adapter_and_include_selects_among_it(lora_run):
    _, base, checkpoints = lora_run
    model, _ = load_denoiser(checkpoints[0], base)
    task = DiffusionTask(model, make_scheduler())
    projector = FactoredProjector(task, None, seed=0, layer_dim=None, second_stage="none", norms="exact")
    assert projector.uncovered == [] and all(".retrac" in layer.module for layer in projector.layers)
    attn1 = DiffusionTask(model, make_scheduler(), include=["*attn1*"])
    assert attn1.parameter_names and all("attn1" in n and ".retrac." in n for n in attn1.parameter_names)
    x, t, noise, states = inputs(3)
    whole, _ = projected_gradients(task, make_projector("exact", task), x, t, noise, states)
    part, _ = projected_gradients(attn1, make_projector("exact", attn1), x, t, noise, states)
    offsets, start = {}, 0
    for name, param in task.selected_parameters().items():
        offsets[name] = (start, start + param.numel())
        start += param.numel()
    columns = torch.cat([torch.arange(*offsets[n]) for n in attn1.parameter_names])
    torch.testing.assert_close(part, whole[..., columns])


def test_a_lora_store_is_indexed_and_queried(lora_run, tmp_path):
    root, base, checkpoints = lora_run
    generator = torch.Generator().manual_seed(4)
    data = ImageDataset(
        torch.rand((4, 3, 16, 16), generator=generator) * 2 - 1,
        [f"img-{i}" for i in range(4)],
        source="lora-test",
        captions=["a red square", "a blue circle"] * 2,
    )
    parts = ModelParts(base_model=str(base))
    config = IndexConfig(events="uniform:1", dim=16)
    store = featurize_dataset(checkpoints, data, tmp_path / "store", config, progress=False, parts=parts)
    record = store.attrs["task"]
    assert (
        record["lora"]["base_model"]["path"] == str(base.resolve())
        and record["vae"]
        and record["text_encoder"]
    )
    assert store.checkpoints[0].sha256 != store.checkpoints[1].sha256
    assert not np.array_equal(store.features(0), store.features(1))
    build_attribution_index(store, tmp_path / "index", "retrac", progress=False)
    result = Attributor(tmp_path / "index", progress=False).attribute(
        data.images[:1], k=2, prompts="a red square"
    )
    assert result.indices.shape == (1, 2)


def test_lora_files_that_do_not_fit_are_refused(lora_run, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    _, base, checkpoints = lora_run
    with pytest.raises(CheckpointError, match="give the base model they were trained on with --base-model"):
        load_denoiser(checkpoints[0])
    wider = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    wider.save_pretrained(str(tmp_path / "wider"))
    with pytest.raises(CheckpointError, match="do not fit the base model .*size mismatch"):
        load_denoiser(checkpoints[0], tmp_path / "wider")
    state = load_file(str(checkpoints[0] / "pytorch_lora_weights.safetensors"))
    renamed = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}
    (tmp_path / "renamed").mkdir()
    save_file(renamed, str(tmp_path / "renamed" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(CheckpointError, match="tensors but .* fit layers of the base model"):
        load_denoiser(tmp_path / "renamed", base)
    text = {**state, "text_encoder.text_model.encoder.layers.0.q_proj.lora.down.weight": torch.zeros(4, 32)}
    (tmp_path / "text").mkdir()
    save_file(text, str(tmp_path / "text" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(CheckpointError, match="text-encoder LoRA layers"):
        load_denoiser(tmp_path / "text", base)
