"""``retrac demo --text``: a tiny text-conditioned diffusion model on the digits, attributed by prompt.

The digits get captions ("a handwritten seven"); a tiny ``UNet2DConditionModel`` (pixel space,
8x8, cross-attention over a tiny frozen ``CLIPTextModel`` with a character-level ``CLIPTokenizer``,
all built from configs: nothing is downloaded) is trained on them; then the pipeline runs as a user
would run it on a Stable Diffusion fine-tune: ``retrac index`` of the training set with its
captions, ``retrac build`` of TracIn and ReTrac indexes, queries by prompt, step-specific
queries of generated samples (:mod:`retrac.query.steps`), a memorization audit of samples
generated from prompts (``retrac audit --prompt``) and the timestep-bias report of the held-out
queries under their captions (``retrac report``).

What it shows: the share of each query's top-k proponents whose caption names the query's digit,
for held-out digits queried with their own caption, for the same images queried with another
digit's caption (the prompt moves the attribution), and per step of generated samples.

Layout written::

    out/train.npz, out/heldout.npz             digits with ids, labels and captions
    out/text_encoder/, out/tokenizer/           the frozen text encoder and its tokenizer
    out/checkpoints/checkpoint-STEP/            unet/, scheduler/, retrac_checkpoint.json
    out/store/, out/index-tracin/, out/index-retrac/
    out/audit/                                  retrac audit of generated samples (index.html, summary.json)
    out/report/                                 retrac report of the held-out queries (bias.html, bias.json)
    out/text-demo.json                          config, paths, timings and the shares above
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrac._io import atomic_write_text
from retrac.checkpoints import save_checkpoint
from retrac.data import ImageDataset
from retrac.errors import ConfigError
from retrac.events import derive_seed

__all__ = ["DIGIT_WORDS", "TextDemoConfig", "caption_of", "run_text_demo"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONTEXT_DIM = 32
MAX_TOKENS = 24  # "a handwritten seven": 19 character tokens with start and end


def caption_of(label: int) -> str:
    """The caption of a digit: ``"a handwritten seven"``."""
    return f"a handwritten {DIGIT_WORDS[int(label)]}"


@dataclass
class TextDemoConfig:
    """Settings of the text demo.

    Attributes:
        seed: seeds the split, the initialisations, batches, timesteps, noise and sampling.
        epochs: passes over the training split.
        batch_size, learning_rate: AdamW training.
        num_checkpoints: checkpoints saved at evenly spaced steps.
        num_heldout: digits kept out of training (queries).
        index_events, index_dim: the store's event schedule and projection dimension.
        num_queries: held-out digits queried.
        query_steps: steps of the generated samples' trajectories that are attributed.
        sampling_steps: reverse steps of the sampler.
        top_k: proponents per query.
        num_audited: samples generated from the ten captions in turn and audited.
        max_train: train on the first this many training digits only (``None``: all of them).
    """

    seed: int = 0
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    num_checkpoints: int = 2
    num_heldout: int = 197
    index_events: str = "stratified:2"
    index_dim: int = 256
    num_queries: int = 20
    query_steps: tuple[int, ...] = (900, 500, 100)
    sampling_steps: int = 50
    top_k: int = 10
    num_audited: int = 10
    max_train: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_checkpoints < 1:
            raise ConfigError("epochs, batch_size and num_checkpoints must be at least 1.")
        if not 0 < self.num_queries <= self.num_heldout < 1797:
            raise ConfigError("need 0 < num_queries <= num_heldout < 1797 (the digits hold 1797 images).")

    @classmethod
    def quick(cls, seed: int = 0) -> TextDemoConfig:
        """A short run for smoke tests."""
        return cls(
            seed=seed,
            epochs=2,
            index_events="stratified:1",
            index_dim=64,
            num_queries=4,
            sampling_steps=10,
            top_k=5,
            num_audited=2,
            num_checkpoints=1,
            max_train=128,
        )


def _vocabulary() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return vocab


def build_text_parts(folder: Path, seed: int):
    """The frozen text encoder and its character-level tokenizer, saved as ``folder/text_encoder``
    and ``folder/tokenizer`` (``save_pretrained``) and returned."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    source = folder / "tokenizer-source"
    source.mkdir(parents=True, exist_ok=True)
    atomic_write_text(source / "vocab.json", json.dumps(_vocabulary()))
    atomic_write_text(source / "merges.txt", "#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(source / "vocab.json"),
        str(source / "merges.txt"),
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(derive_seed("text-encoder", seed) % (1 << 31))
    config = CLIPTextConfig(
        vocab_size=len(_vocabulary()),
        hidden_size=CONTEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    encoder = CLIPTextModel(config).eval()
    encoder.save_pretrained(str(folder / "text_encoder"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return encoder, tokenizer


def build_text_unet():
    """The demo's tiny text-conditioned ``UNet2DConditionModel`` (8x8, one channel, about 0.2M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def captioned_digits(config: TextDemoConfig) -> tuple[ImageDataset, ImageDataset]:
    """The digits split as the pixel demo splits them, with captions."""
    from retrac.demo import digits_dataset

    data = digits_dataset()
    data.captions = [caption_of(label) for label in data.labels.tolist()]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)).tolist()
    train = sorted(order[config.num_heldout :])[: config.max_train]
    return data.subset(train), data.subset(sorted(order[: config.num_heldout]))


def train_text_model(
    train: ImageDataset, config: TextDemoConfig, out: Path, encoder, tokenizer, progress, device
):
    """Train the text UNet; checkpoints ``out/checkpoints/checkpoint-STEP/`` with weight ``lr x steps``."""
    from retrac.demo import build_demo_scheduler, demo_checkpoint_steps, demo_training_draws
    from retrac.text import PromptEncoder

    torch.manual_seed(derive_seed("text-unet", config.seed) % (1 << 31))
    model = build_text_unet().to(device)
    scheduler = build_demo_scheduler()
    states = PromptEncoder(encoder.to(device), tokenizer).encode(
        [caption_of(d) for d in range(10)]
    )  # (10, L, D)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    n, shape = len(train), tuple(train.images.shape[1:])
    total = -(-n // config.batch_size) * config.epochs
    saves = demo_checkpoint_steps(total, config.num_checkpoints)
    checkpoints, started = [], time.perf_counter()
    model.train()
    draws = demo_training_draws(
        n, config.batch_size, config.epochs, config.seed, scheduler.config.num_train_timesteps, shape
    )
    with tqdm(total=total, desc="train text demo", disable=not progress) as bar:
        for epoch, step, rows, timesteps, _, noise in draws:
            noise = noise.to(device)
            images, timesteps = train.images[rows].to(device), timesteps.to(device)
            cond = states[train.labels[rows].to(device)]
            prediction = model(
                scheduler.add_noise(images, noise, timesteps), timesteps, encoder_hidden_states=cond
            )
            loss = torch.nn.functional.mse_loss(prediction.sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
            if step in saves:
                previous = saves[saves.index(step) - 1] if saves.index(step) else 0
                weight = config.learning_rate * (step - previous)
                path = save_checkpoint(
                    model, scheduler, out / "checkpoints" / f"checkpoint-{step}", weight, step
                )
                checkpoints.append(str(path))
    model.eval()
    return checkpoints, float(loss.item()), round(time.perf_counter() - started, 2)


def _caption_share(result, captions: list[str], wanted: list[str]) -> float:
    """Mean share of each query's top-k training samples whose caption is ``wanted[q]``."""
    hits = [np.mean([captions[i] == wanted[q] for i in row]) for q, row in enumerate(result.indices.tolist())]
    return round(float(np.mean(hits)), 3)


def run_text_demo(
    config: TextDemoConfig, out: str | Path, progress: bool = True, device: str = "cpu"
) -> dict:
    """Train, index, build, and attribute by prompt and by step; write ``out/text-demo.json``.

    Returns:
        The summary written to ``out/text-demo.json``.
    """
    from retrac.indexer import IndexConfig, featurize_dataset
    from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
    from retrac.query.steps import attribute_steps, sample_trajectory

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, heldout = captioned_digits(config)
    train_path, heldout_path = train.save_npz(out / "train.npz"), heldout.save_npz(out / "heldout.npz")
    encoder, tokenizer = build_text_parts(out, config.seed)
    checkpoints, final_loss, train_seconds = train_text_model(
        train, config, out, encoder, tokenizer, progress, device
    )

    clock = time.perf_counter()
    index_config = IndexConfig(events=config.index_events, dim=config.index_dim, seed=config.seed)
    store = featurize_dataset(
        checkpoints, train_path, out / "store", index_config, device=device, progress=progress
    )
    for method in ("tracin", "retrac"):
        build_attribution_index(store, out / f"index-{method}", method, progress=progress)
    index_seconds = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    indexes = [out / "index-tracin", out / "index-retrac"]
    attributor = Attributor(
        indexes, query_events=QueryEvents(4, 1, config.seed), device=device, progress=progress
    )
    queries = heldout.subset(range(config.num_queries))
    own = queries.captions
    other = [caption_of((label + 1) % 10) for label in queries.labels.tolist()]  # another digit's caption
    shares: dict = {"own_caption": {}, "other_caption": {}, "steps": {}}
    k = config.top_k
    for method in attributor.methods:
        mine = attributor.attribute(queries.images, k, method, prompts=own)
        theirs = attributor.attribute(queries.images, k, method, prompts=other)
        shares["own_caption"][method] = _caption_share(mine, train.captions, own)
        shares["other_caption"][method] = {
            "share_naming_the_image_digit": _caption_share(theirs, train.captions, own),
            "share_naming_the_prompt_digit": _caption_share(theirs, train.captions, other),
        }
    prompts = [caption_of(d) for d in (7, 1, 3)]
    task = attributor.task
    trajectory = sample_trajectory(
        task,
        list(config.query_steps),
        len(prompts),
        task.encode_prompts(prompts),
        config.seed,
        config.sampling_steps,
    )
    for method in attributor.methods:
        per_step = attribute_steps(attributor, trajectory, k, method, prompts=prompts)
        shares["steps"][method] = {
            str(t): _caption_share(r, train.captions, prompts) for t, r in per_step.items()
        }
    query_seconds = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    audit, report = _audit_and_report(attributor, config, out, train, queries, train_path, device, progress)
    audit_seconds = round(time.perf_counter() - clock, 2)
    summary = {
        "config": asdict(config),
        "train": str(train_path),
        "heldout": str(heldout_path),
        "checkpoints": checkpoints,
        "store": str(store.path),
        "indexes": [str(p) for p in indexes],
        "final_loss": final_loss,
        "top_k_caption_share": shares,
        "chance": round(float(np.mean([train.captions.count(c) / len(train) for c in own])), 3),
        "audit": audit,
        "report": report,
        "train_seconds": train_seconds,
        "audit_report_seconds": audit_seconds,
        "index_seconds": index_seconds,
        "query_seconds": query_seconds,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / "text-demo.json", json.dumps(summary, indent=2))
    return summary


def _audit_and_report(
    attributor, config, out: Path, train, queries, train_path, device, progress
) -> tuple[dict, dict]:
    """``retrac audit`` of samples generated from the captions, ``retrac report`` of the held-out queries."""
    from retrac.audit import run_audit
    from retrac.audit.config import AuditConfig
    from retrac.bias import measure_bias
    from retrac.report.bias import write_bias_report

    prompts = [caption_of(d) for d in range(10)]
    audit = run_audit(
        [out / "index-tracin", out / "index-retrac"],
        out / "audit",
        generate=config.num_audited,
        seed=config.seed,
        sampling_steps=config.sampling_steps,
        data=train_path,
        config=AuditConfig(k=min(config.top_k, len(train))),
        query_events=attributor.query_events,
        device=device,
        progress=progress,
        prompts=prompts,
    )
    measurement = measure_bias(attributor, queries.images, config.top_k, prompts=queries.captions)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    page = write_bias_report(report, measurement, list(zip(queries.ids, queries.images, strict=True)), train)
    atomic_write_text(report / "bias.json", json.dumps(measurement.to_dict(), indent=2))
    return (
        {
            "folder": str(out / "audit"),
            "verdict_counts": audit["verdict_counts"],
            "copy_rate": audit["copy_rate"],
        },
        {"page": str(page), "norm_timestep_spearman": measurement.to_dict()["norm_timestep_spearman"]},
    )
