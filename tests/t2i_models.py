"""Tiny text-to-image and latent models built from configs (no downloads), shared by the t2i tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CONTEXT_DIM = 32  # cross_attention_dim of the tiny denoisers = hidden_size of the tiny text encoder
MAX_TOKENS = 32  # character-level tokens: captions of up to 30 characters stay whole


def make_cond_unet(in_channels: int = 4, size: int = 8, seed: int = 0):
    """A tiny ``UNet2DConditionModel`` with cross-attention of width ``CONTEXT_DIM``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def make_dit(num_classes: int = 10, learn_sigma: bool = True, seed: int = 0):
    """A tiny class-conditional ``DiTTransformer2DModel`` on ``(4, 8, 8)`` latents."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=4,
    ).eval()


def make_pixart(seed: int = 0):
    """A tiny text-conditioned ``Transformer2DModel`` (PixArt-style ``ada_norm_single``)."""
    from diffusers import Transformer2DModel

    torch.manual_seed(seed)
    return Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=CONTEXT_DIM,
        norm_type="ada_norm_single",
        norm_num_groups=4,
    ).eval()


def make_vae(seed: int = 0):
    """A tiny ``AutoencoderKL``: ``(3, 16, 16)`` images <-> ``(4, 8, 8)`` latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def make_text_encoder(seed: int = 0):
    """A tiny ``CLIPTextModel`` of width ``CONTEXT_DIM`` over the vocabulary of :func:`make_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(_vocab()),
        hidden_size=CONTEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def _vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + "!,.":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return vocab


def make_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` over single characters (no merges), written to ``folder`` and read back."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )


def save_pipeline(folder: Path, unet, scheduler, vae=None, text_encoder=None, tokenizer=None) -> Path:
    """A Stable-Diffusion-like pipeline folder, each part saved with ``save_pretrained`` and a ``model_index.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    unet.save_pretrained(str(folder / "unet"))
    index["unet"] = ["diffusers", type(unet).__name__]
    scheduler.save_pretrained(str(folder / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    if vae is not None:
        vae.save_pretrained(str(folder / "vae"))
        index["vae"] = ["diffusers", type(vae).__name__]
    if text_encoder is not None:
        text_encoder.save_pretrained(str(folder / "text_encoder"))
        index["text_encoder"] = ["transformers", type(text_encoder).__name__]
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        index["tokenizer"] = ["transformers", type(tokenizer).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
