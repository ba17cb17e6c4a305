"""Latent text-to-image featurization: a tiny Stable-Diffusion-like pipeline folder -> store.

The reference is computed without retrac: the parts loaded with diffusers / transformers from the
pipeline folder, latents ``E(x).mean * scaling_factor``, ``encoder_hidden_states`` of each caption,
``x_t`` from ``alpha_bar``, the UNet called directly, plain autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_scheduler, make_tiny_unet
from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError
from retrac.events import event_noise_seed, noise_from_seed
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.latents import LATENT_CACHE_FILE, LatentCache, LatentEncoder
from retrac.pipeline import ModelParts
from retrac.task import DiffusionTask
from t2i_models import make_cond_unet, make_text_encoder, make_tokenizer, make_vae, save_pipeline

CAPTIONS = ["a red square", "a blue circle", "a red square", "a green cross"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    folder = save_pipeline(
        root / "sd-tiny",
        make_cond_unet(),
        make_scheduler(),
        vae=make_vae(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(root / "vocab"),
    )
    generator = torch.Generator().manual_seed(5)
    data = ImageDataset(
        torch.rand((4, 3, 16, 16), generator=generator) * 2 - 1,
        [f"img-{i}" for i in range(4)],
        source="t2i-test",
        captions=CAPTIONS,
    )
    return folder, data


def reference_gradient(folder, image, caption: str, t: int, noise) -> torch.Tensor:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        latent = vae.encode(image[None]).latent_dist.mean[0] * vae.config.scaling_factor
        ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        states = encoder(torch.tensor([ids.input_ids]))[0]
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
    out = unet(x_t[None], torch.tensor([t]), encoder_hidden_states=states).sample[0]
    grads = torch.autograd.grad(((out - noise) ** 2).mean(), list(unet.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_latent_text_features_equal_autograd_of_the_pipeline_parts(pipeline, tmp_path):
    folder, data = pipeline
    config = IndexConfig(events="uniform:2", projector="exact", shard_rows=2, batch_size=3)
    store = featurize_dataset([folder], data, tmp_path / "store", config, progress=False)
    task_record = store.attrs["task"]
    assert task_record["conditioning"] == "text" and task_record["vae"]["mode"] == "mean"
    assert task_record["vae"]["path"] == str((folder / "vae").resolve())
    assert (tmp_path / "store" / LATENT_CACHE_FILE).is_file()
    for row in (0, 3):
        for event in range(2):
            t = int(store.timesteps(0)[row, event])
            noise = noise_from_seed(event_noise_seed(0, 0, data.ids[row], event), (4, 8, 8))
            reference = reference_gradient(folder, data.images[row], CAPTIONS[row], t, noise)
            np.testing.assert_allclose(store.features(0)[row, event], reference.numpy(), rtol=2e-4, atol=1e-6)


def test_the_vae_and_text_encoder_may_be_given_apart(pipeline, tmp_path):
    """A bare unet folder with --vae and --text-encoder gives the store the pipeline folder gives."""
    folder, data = pipeline
    config = IndexConfig(events="uniform:1", projector="dense", dim=16)
    whole = featurize_dataset([folder], data, tmp_path / "whole", config, progress=False)
    parts = ModelParts(vae=str(folder / "vae"), text_encoder=str(folder))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "unet").symlink_to(folder / "unet")
    (bare / "scheduler").symlink_to(folder / "scheduler")
    apart = featurize_dataset([bare / "unet"], data, tmp_path / "apart", config, progress=False, parts=parts)
    np.testing.assert_array_equal(whole.features(0), apart.features(0))


def test_cached_latents_are_reused_and_invalidated(pipeline, tmp_path):
    from diffusers import AutoencoderKL

    folder, data = pipeline
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    cache = LatentCache(tmp_path / LATENT_CACHE_FILE)
    first, reused = cache.latents(LatentEncoder(vae), data)
    assert not reused and first.shape == (4, 4, 8, 8)
    again, reused = cache.latents(LatentEncoder(vae), data)
    assert reused and torch.equal(first, again)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.01)  # another VAE
    changed, reused = cache.latents(LatentEncoder(vae), data)
    assert not reused and not torch.equal(changed, first)
    assert cache.latents(LatentEncoder(vae), data)[1]
    other_data = ImageDataset(data.images.flip(0), data.ids, source="t2i-test", captions=CAPTIONS)
    assert not cache.latents(LatentEncoder(vae), other_data)[1]
    sampled, reused = cache.latents(LatentEncoder(vae, mode="sample", seed=3), other_data)
    assert not reused and not torch.equal(sampled, cache.latents(LatentEncoder(vae), other_data)[0])
    # a draw is a pure function of (seed, sample id): the same bits in any batch
    alone = LatentEncoder(vae, mode="sample", seed=3).encode(other_data.images[2:3], other_data.ids[2:3])
    torch.testing.assert_close(alone[0], sampled[2], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(pipeline, tmp_path):
    folder, data = pipeline
    config = IndexConfig(events="uniform:1", projector="dense", dim=8)
    no_captions = ImageDataset(data.images, data.ids, source="bare")
    with pytest.raises(DataError, match="text-conditioned, but the data 'bare' has no captions"):
        featurize_dataset([folder], no_captions, tmp_path / "a", config, progress=False)
    small = ImageDataset(data.images[:, :, :8, :8], data.ids, source="small", captions=CAPTIONS)
    with pytest.raises(DataError, match=r"but the VAE takes \(B, 3, 16, 16\)"):
        featurize_dataset([folder], small, tmp_path / "b", config, progress=False)
    with pytest.raises(ConfigError, match="VAE gives 4-channel latents but the denoiser takes 1 channels"):
        DiffusionTask(make_tiny_unet(), make_scheduler(), vae=make_vae())
    with pytest.raises(ConfigError, match="does not exist"):
        ModelParts(vae=str(tmp_path / "none"))


def test_queries_by_prompt_go_through_the_same_encoders(pipeline, tmp_path):
    from retrac.projection import projected_gradients
    from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index

    folder, data = pipeline
    config = IndexConfig(events="uniform:2", projector="dense", dim=32)
    store = featurize_dataset([folder], data, tmp_path / "store", config, progress=False)
    build_attribution_index(store, tmp_path / "index", "tracin", progress=False)
    events = QueryEvents(3, 1, seed=2)
    attributor = Attributor(tmp_path / "index", query_events=events, progress=False)
    task = attributor.task
    assert task.is_latent and task.is_text_conditional
    queries = data.images[:2]
    result = attributor.attribute(queries, k=4, prompts=["a red square", "a green cross"])
    assert result.indices.shape == (2, 4)
    # by hand: the VAE mean latents, the prompts' states, the query events' timesteps and noise
    latents = task.latent_encoder.encode(queries, mode="mean")
    states = task.prompt_encoder.encode(["a red square", "a green cross"])
    feats = attributor.query_features(queries, prompts=["a red square", "a green cross"])[0]
    taus = torch.from_numpy(events.timesteps(task.num_train_timesteps))
    noise = events.noise(0, (4, 8, 8)).reshape(3, 4, 8, 8)
    by_hand, _ = projected_gradients(
        task, attributor._projectors[0], latents, taus.expand(2, 3), noise.expand(2, 3, 4, 8, 8), states
    )
    np.testing.assert_allclose(feats.reshape(2, 3, -1), by_hand.numpy(), rtol=1e-5, atol=1e-7)
    # generated queries may be given as latents: the same features as their pixels' mean latents
    as_latents = attributor.query_features(
        latents, prompts=["a red square", "a green cross"], input_space="latents"
    )
    np.testing.assert_array_equal(as_latents[0], feats)
    one_prompt = attributor.query_features(queries[:1], prompts="a red square")[0]
    np.testing.assert_allclose(one_prompt, feats[:1], rtol=1e-4, atol=1e-5)  # a batch of one: rounding
    with pytest.raises(DataError, match="text-conditioned; give the queries' prompts"):
        attributor.attribute(queries, k=2)
    with pytest.raises(DataError, match="got 1 prompts for 2 query images"):
        attributor.attribute(queries, k=2, prompts=["one"])
