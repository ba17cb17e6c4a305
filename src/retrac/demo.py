"""The embedded default: a tiny DDPM trained on scikit-learn's bundled 8x8 digits.

``train_digits_ddpm`` trains a ``UNet2DModel`` with a ``DDPMScheduler``, saves checkpoints with
their weights (learning rate x steps since the previous checkpoint) and a training-event log.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrac._io import atomic_save_npz, atomic_write_text, publish_directory
from retrac.checkpoints import save_checkpoint
from retrac.data import ImageDataset
from retrac.errors import ConfigError
from retrac.events import TrainingEventLog, derive_seed, noise_from_seed


@dataclass
class DemoConfig:
    """Settings of the demo trainer.

    Attributes:
        seed: seeds the split, the model initialisation, batches, timesteps and noise.
        epochs: passes over the training split.
        batch_size: samples per optimizer step.
        learning_rate: constant AdamW learning rate.
        num_checkpoints: checkpoints saved at evenly spaced steps (the last at the final step).
        num_heldout: digits kept out of training, used as queries.
        num_train_timesteps: ``T`` of the DDPM scheduler.
        index_events: event schedule of the demo's feature store.
        index_projector: projector of the demo's store (``factored``: per-layer projection from
            layer hooks, the fastest on this model; ``dense`` and ``exact`` also work).
        index_dim: projection dimension ``d`` of the store.
        num_heldout_queries: held-out digits attributed in the report.
        num_generated_queries: digits sampled from the last checkpoint and attributed.
        sampling_steps: reverse steps when sampling (DDPM; ``T`` = the full chain).
        top_k: proponents shown per query and method.
        planted_outliers: image patches from another distribution (8x8 crops of scikit-learn's two
            sample photographs) added to the training set, ids ``outlier-NNN`` (the paper plants
            MNIST zeros among CIFAR-10 images to show which samples become generally influential).
        duplicated_samples: training digits that are duplicated ``duplicate_copies`` times in all
            (ids ``<id>-copy-NN``); heavy duplication makes diffusion models memorize samples.
        duplicate_copies: copies of each duplicated digit, the original included.
    """

    seed: int = 0
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    num_checkpoints: int = 4
    num_heldout: int = 197
    num_train_timesteps: int = 1000
    index_events: str = "stratified:2"
    index_projector: str = "factored"
    index_dim: int = 512
    num_heldout_queries: int = 8
    num_generated_queries: int = 8
    sampling_steps: int = 1000
    top_k: int = 8
    planted_outliers: int = 0
    duplicated_samples: int = 0
    duplicate_copies: int = 100

    def __post_init__(self) -> None:
        if self.planted_outliers < 0 or self.duplicated_samples < 0 or self.duplicate_copies < 1:
            raise ConfigError("planted_outliers and duplicated_samples must be >= 0, duplicate_copies >= 1.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1.")
        if self.num_checkpoints < 1:
            raise ConfigError("num_checkpoints must be at least 1.")
        if not 0 < self.num_heldout < 1797:
            raise ConfigError("num_heldout must lie in (0, 1797) (scikit-learn's digits hold 1797 images).")

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A shorter run for smoke tests (a few seconds)."""
        return cls(
            seed=seed,
            epochs=4,
            num_checkpoints=3,
            index_events="stratified:1",
            index_dim=128,
            num_heldout_queries=4,
            num_generated_queries=4,
            sampling_steps=50,
            top_k=6,
        )


def digits_dataset() -> ImageDataset:
    """scikit-learn's 1797 digits as ``(1797, 1, 8, 8)`` in ``[-1, 1]`` with labels; ids ``digit-NNNN``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16
    ids = [f"digit-{i:04d}" for i in range(len(images))]
    return ImageDataset(
        images, ids, torch.from_numpy(digits.target.astype(np.int64)), source="sklearn-digits"
    )


def build_demo_unet(sample_size: int = 8, channels: int = 1, num_class_embeds: int | None = None):
    """The demo's tiny ``UNet2DModel`` (one attention block, so attention is exercised)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )


def demo_checkpoint_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """The training steps after which the demo saves a checkpoint: ``num_checkpoints`` spread evenly."""
    return sorted({round(total_steps * (k + 1) / num_checkpoints) for k in range(num_checkpoints)})


def demo_training_draws(
    n: int, batch_size: int, epochs: int, seed: int, num_train_timesteps: int, shape: tuple[int, ...]
):
    """The demo training's random draws, one batch a step (steps count from 1), all from ``seed``:
    the batch order per epoch, each step's timesteps and each row's noise (``noise_from_seed`` of
    ``derive_seed("train-noise", seed, step, position)``), so an event log can replay them.

    Yields:
        ``(epoch, step, rows, timesteps, noise_seeds, noise)``, tensors on the CPU.
    """
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("epoch", seed, epoch)))
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            step += 1
            step_rng = torch.Generator().manual_seed(derive_seed("timesteps", seed, step))
            timesteps = torch.randint(0, num_train_timesteps, (len(rows),), generator=step_rng)
            seeds = [derive_seed("train-noise", seed, step, pos) for pos in range(len(rows))]
            noise = torch.stack([noise_from_seed(s, shape) for s in seeds])
            yield epoch, step, rows, timesteps, seeds, noise


def build_demo_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear")


def split_digits(config: DemoConfig) -> tuple[ImageDataset, ImageDataset]:
    """Seeded split of the digits into (train, held-out)."""
    data = digits_dataset()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)).tolist()
    heldout = sorted(order[: config.num_heldout])
    train = sorted(order[config.num_heldout :])
    return data.subset(train), data.subset(heldout)


def photo_patches(count: int, seed: int) -> ImageDataset:
    """``count`` grayscale 8x8 patches of scikit-learn's two sample photographs, in ``[-1, 1]``.

    Each patch is a random 48x48 crop averaged down to 8x8: natural-image texture, visibly unlike
    the digits (an out-of-distribution set, as the paper's MNIST zeros among CIFAR-10).
    """
    from sklearn.datasets import load_sample_images

    photos = [img.astype(np.float32).mean(axis=2) / 127.5 - 1.0 for img in load_sample_images().images]
    rng = np.random.default_rng(derive_seed("outliers", seed))
    patches = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - 48)
        left = rng.integers(0, photo.shape[1] - 48)
        patches.append(photo[top : top + 48, left : left + 48].reshape(8, 6, 8, 6).mean(axis=(1, 3)))
    images = torch.from_numpy(np.stack(patches).astype(np.float32))[:, None].clamp(-1, 1)
    return ImageDataset(
        images, [f"outlier-{i:03d}" for i in range(count)], torch.full((count,), -1), source="photo-patches"
    )


def build_training_set(config: DemoConfig) -> tuple[ImageDataset, ImageDataset, dict]:
    """The demo's (train, held-out) sets with the planted variants of ``config``, and what was planted.

    Returns:
        ``(train, heldout, planted)`` with ``planted = {"outliers": [ids], "duplicated": {id: [copy ids]}}``.
    """
    train, heldout = split_digits(config)
    parts, planted = [train], {"outliers": [], "duplicated": {}}
    if config.duplicated_samples:
        rows = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(derive_seed("dup", config.seed))
        )
        for row in sorted(rows[: config.duplicated_samples].tolist()):
            original = train.ids[row]
            copies = [f"{original}-copy-{c:02d}" for c in range(1, config.duplicate_copies)]
            if copies:
                parts.append(
                    ImageDataset(
                        train.images[row].expand(len(copies), *train.images.shape[1:]).clone(),
                        copies,
                        train.labels[row].expand(len(copies)).clone(),
                    )
                )
            planted["duplicated"][original] = copies
    if config.planted_outliers:
        outliers = photo_patches(config.planted_outliers, config.seed)
        parts.append(outliers)
        planted["outliers"] = outliers.ids
    if len(parts) > 1:
        train = ImageDataset(
            torch.cat([p.images for p in parts]),
            [i for p in parts for i in p.ids],
            torch.cat([p.labels for p in parts]),
            source="sklearn-digits+planted",
        )
    return train, heldout, planted


def train_digits_ddpm(
    config: DemoConfig, out: str | Path, progress: bool = True, device: str = "cpu"
) -> dict:
    """Train the demo DDPM and write checkpoints, data and the training-event log under ``out``.

    Layout written::

        out/train.npz, out/heldout.npz           data (images in [-1, 1], ids, labels)
        out/checkpoints/checkpoint-STEP/         unet/, scheduler/, retrac_checkpoint.json
        out/events.npz                           training-event log (TrainingEventLog)
        out/planted.json                         planted outlier ids and duplicated sample ids
        out/demo.json                            config, paths, timing

    Returns:
        The content of ``demo.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, planted = build_training_set(config)
    atomic_write_text(out / "planted.json", json.dumps(planted, indent=2))
    train_path = train.save_npz(out / "train.npz")
    heldout_path = heldout.save_npz(out / "heldout.npz")
    trained = train_ddpm(train, config, out, progress, device)
    summary = {
        "config": asdict(config),
        "train": str(train_path),
        "heldout": str(heldout_path),
        **trained,
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2))
    return summary


def train_ddpm(
    train: ImageDataset, config: DemoConfig, out: str | Path, progress: bool = True, device: str = "cpu"
) -> dict:
    """Train the demo ``UNet2DModel`` on ``train`` with the seed, epochs, batch size, learning rate and
    checkpoint count of ``config``; write ``out/checkpoints/checkpoint-STEP/`` and ``out/events.npz``.

    The run is a pure function of ``config`` and ``train``'s images: the model initialisation, batch
    order, timesteps and noise come from ``config.seed``. ``retrac lds`` retrains subset models with it.

    Returns:
        ``{"events": path, "checkpoints": [{"path", "weight", "step"}], "final_loss", "train_seconds"}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    channels, size = int(train.images.shape[1]), int(train.images.shape[2])
    model = build_demo_unet(sample_size=size, channels=channels).to(device)
    scheduler = build_demo_scheduler(config.num_train_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

    n = len(train)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    checkpoint_steps = demo_checkpoint_steps(total_steps, config.num_checkpoints)
    shape = tuple(train.images.shape[1:])
    log: dict[str, list] = {"sample_id": [], "timestep": [], "noise_seed": [], "step": [], "interval": []}
    checkpoints = []
    started = time.perf_counter()
    model.train()
    interval = 0
    bar = tqdm(total=total_steps, desc="train demo DDPM", disable=not progress)
    draws = demo_training_draws(
        n, config.batch_size, config.epochs, config.seed, config.num_train_timesteps, shape
    )
    for epoch, step, rows, timesteps, seeds, noise in draws:
        noise = noise.to(device)
        images, timesteps = train.images[rows].to(device), timesteps.to(device)
        noisy = scheduler.add_noise(images, noise, timesteps)
        loss = torch.nn.functional.mse_loss(model(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log["sample_id"].extend(train.ids[i] for i in rows.tolist())
        log["timestep"].extend(timesteps.cpu().tolist())
        log["noise_seed"].extend(seeds)
        log["step"].extend([step] * len(rows))
        log["interval"].extend([interval] * len(rows))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
        if step in checkpoint_steps:
            previous = checkpoint_steps[interval - 1] if interval else 0
            weight = config.learning_rate * (step - previous)  # w_k: learning rate x steps covered
            path = save_checkpoint(model, scheduler, out / "checkpoints" / f"checkpoint-{step}", weight, step)
            checkpoints.append({"path": str(path), "weight": weight, "step": step})
            interval += 1
    bar.close()
    model.eval()
    event_log = TrainingEventLog(
        sample_id=np.array(log["sample_id"]),
        timestep=np.array(log["timestep"], dtype=np.int64),
        noise_seed=np.array(log["noise_seed"], dtype=np.int64),
        step=np.array(log["step"], dtype=np.int64),
        interval=np.array(log["interval"], dtype=np.int64),
        checkpoint_steps=np.array(checkpoint_steps, dtype=np.int64),
    )
    events_path = event_log.save(out / "events.npz")
    return {
        "events": str(events_path),
        "checkpoints": checkpoints,
        "final_loss": float(loss.item()),
        "train_seconds": round(time.perf_counter() - started, 2),
    }


def run_demo(config: DemoConfig, out: str | Path, progress: bool = True, device: str = "cpu") -> dict:
    """Every stage of the pipeline on the digits: train, index, build TracIn and ReTrac indexes,
    attribute held-out and generated digits, and write the HTML report.

    Returns:
        The demo summary (also written to ``out/demo.json``), with the paths of every artifact.
    """
    from retrac.checkpoints import load_scheduler, load_unet
    from retrac.data import load_dataset
    from retrac.indexer import IndexConfig, featurize_dataset
    from retrac.query.attribution import Attributor, build_attribution_index
    from retrac.query.vectors import DEFAULT_SQNORM_METHOD
    from retrac.report.attribution import write_attribution_report
    from retrac.sampling import generate_images
    from retrac.schema import query_document
    from retrac.serve.cli import serve_command_line

    out = Path(out)
    summary = train_digits_ddpm(config, out, progress, device)
    timings = {"train": summary["train_seconds"]}
    checkpoints = [c["path"] for c in summary["checkpoints"]]

    started = time.perf_counter()
    index_config = IndexConfig(
        events=config.index_events, projector=config.index_projector, dim=config.index_dim, seed=config.seed
    )
    store = featurize_dataset(
        checkpoints, summary["train"], out / "store", index_config, device=device, progress=progress
    )
    # the default method (dtrak, the best measured LDS) measures the squared norm of the model output
    default_store = featurize_dataset(
        checkpoints,
        summary["train"],
        out / "store-sqnorm",
        replace(index_config, objective="sqnorm"),
        device=device,
        progress=progress,
    )
    timings["featurize"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    indexes = {DEFAULT_SQNORM_METHOD: out / f"index-{DEFAULT_SQNORM_METHOD}"}
    build_attribution_index(default_store, indexes[DEFAULT_SQNORM_METHOD], index="auto", progress=progress)
    for method in ("retrac", "tracin"):
        indexes[method] = out / f"index-{method}"
        build_attribution_index(store, indexes[method], method, index="auto", progress=progress)
    timings["build"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    final = checkpoints[-1]
    generated = generate_images(
        load_unet(final).to(device),
        load_scheduler(final),
        config.num_generated_queries,
        seed=config.seed,
        num_inference_steps=config.sampling_steps,
        progress=progress,
    )
    heldout = load_dataset(summary["heldout"]).subset(range(config.num_heldout_queries))
    generated_path = atomic_save_npz(
        out / "generated.npz",
        images=generated.numpy().astype(np.float32),
        ids=np.array([f"generated-{i:02d}" for i in range(len(generated))]),
    )
    timings["sample"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    # one Attributor per store: dtrak's queries are measured with the sqnorm objective too
    default_attributor = Attributor([indexes[DEFAULT_SQNORM_METHOD]], device=device, progress=progress)
    attributor = Attributor([indexes["retrac"], indexes["tracin"]], device=device, progress=progress)
    queries = torch.cat([heldout.images, generated])
    captions = [f"held-out {i} (label {int(y)})" for i, y in zip(heldout.ids, heldout.labels, strict=True)]
    captions += [f"generated {i}" for i in range(len(generated))]
    depth = max(config.top_k, LABEL_TOP_K)
    deep = {
        m: (default_attributor if m == DEFAULT_SQNORM_METHOD else attributor).attribute(
            queries, k=depth, method=m
        )
        for m in indexes
    }
    results = {m: _first(result, config.top_k) for m, result in deep.items()}
    timings["attribute"] = round(time.perf_counter() - started, 2)

    train = load_dataset(summary["train"])
    label_share = label_agreement(deep, heldout, train, LABEL_TOP_K)
    intro = (
        f"<p>Tiny DDPM on scikit-learn's digits: {len(train)} training digits, {len(checkpoints)} checkpoints, "
        f"events {config.index_events}, {config.index_projector} projection d = {config.index_dim} per checkpoint. "
        f"Queries: {len(heldout)} held-out digits and {len(generated)} digits sampled from the last checkpoint.</p>"
        f"<p><b>{DEFAULT_SQNORM_METHOD}</b> (D-TRAK, retrac's default: the best measured linear datamodeling "
        "score, README 'Attribution quality') next to <b>retrac</b> (Diffusion-ReTrac, the paper's method) "
        "and <b>tracin</b>.</p>"
        + label_table(label_share, len(heldout))
        + '<p><a href="bias.html">The timestep-induced bias: gradient norm vs timestep, TracIn vs ReTrac</a></p>'
    )
    # the report folder appears whole, or the old one stays (section 7 of docs/design.md)
    with publish_directory(out / "report") as staging:
        page = write_attribution_report(
            staging, list(zip(captions, queries, strict=True)), results, train, "retrac demo", intro
        )
        report = out / "report" / Path(page).relative_to(staging)
        timings["bias"] = _write_bias_page(attributor, queries, captions, train, out, staging, config)
    summary.update(
        {
            "store": str(store.path),
            "store_sqnorm": str(default_store.path),
            "default_method": DEFAULT_SQNORM_METHOD,
            "indexes": {m: str(p) for m, p in indexes.items()},
            "label_share_top10": label_share,
            "report": str(report),
            "generated": str(generated_path),
            "serve": serve_command_line(  # one store per service: the loss store's indexes
                [indexes["retrac"], indexes["tracin"]],
                examples=[summary["heldout"], generated_path],
                audit="memory",
            ),
            "results": query_document(results.values(), captions),
            "seconds": timings,
        }
    )
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2))
    return summary


LABEL_TOP_K = 10  # proponents per held-out digit counted by the label check


def _first(result, k: int):
    """``result`` cut to its first ``k`` columns."""
    return replace(
        result,
        indices=result.indices[:, :k],
        scores=result.scores[:, :k],
        ids=[row[:k] for row in result.ids],
    )


def label_agreement(results: dict, heldout, train, k: int = LABEL_TOP_K) -> dict[str, float]:
    """Share of the top-``k`` proponents of the held-out queries (the first ``len(heldout)`` rows of each
    result) whose label is the query's, per method and for the ``k`` nearest training images in pixel
    space (L2): a sanity check of attributions, not a measure of influence (LDS is)."""
    labels = train.labels.numpy()
    truth = heldout.labels.numpy()[:, None]
    n = len(heldout)
    share = {m: float((labels[r.indices[:n, :k]] == truth).mean()) for m, r in results.items()}
    distances = torch.cdist(heldout.images.flatten(1).double(), train.images.flatten(1).double())
    nearest = distances.topk(k, dim=1, largest=False).indices.numpy()
    share["pixel nearest neighbours"] = float((labels[nearest] == truth).mean())
    return share


def label_table(share: dict[str, float], num_queries: int) -> str:
    """The label check as an HTML table for the report's introduction."""
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{v:.0%}</td></tr>" for m, v in share.items())
    return (
        f"<p>Share of the top {LABEL_TOP_K} proponents of the {num_queries} held-out digits with the query's "
        f"label (chance about 10%):</p><table><tr><th>method</th><th>same label</th></tr>{rows}</table>"
    )


def _write_bias_page(
    attributor, queries, captions, train, out: Path, report_dir: Path, config: DemoConfig
) -> float:
    """``report_dir/bias.html`` (and ``bias.json``) for the demo's queries; returns the seconds it took."""
    from retrac.bias import measure_bias
    from retrac.report.bias import write_bias_report

    started = time.perf_counter()
    planted = json.loads((out / "planted.json").read_text())["outliers"]
    measurement = measure_bias(attributor, queries, config.top_k, outlier_ids=planted)
    intro = '<p><a href="index.html">Back to the attribution report</a></p>'
    write_bias_report(report_dir, measurement, list(zip(captions, queries, strict=True)), train, intro=intro)
    atomic_write_text(report_dir / "bias.json", json.dumps(measurement.to_dict(), indent=2))
    return round(time.perf_counter() - started, 2)
