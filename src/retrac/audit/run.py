"""``retrac audit``: load the indexes, the training data and the pixel index, audit, write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from retrac.audit.config import AuditConfig
from retrac.audit.estimate import attribution_seconds, audit_sampling_steps, describe, sampling_seconds
from retrac.audit.pixel_index import PIXEL_INDEX_FOLDER, audit_pixel_index
from retrac.audit.records import audit_images
from retrac.audit.training import check_can_sample, load_training_data, self_influence
from retrac.audit.writers import write_audit
from retrac.data import ImageDataset, load_dataset
from retrac.errors import ConfigError
from retrac.query.attribution import Attributor, QueryEvents
from retrac.sampling import DEFAULT_SAMPLING_SEED, generate_images
from retrac.task import DEFAULT_DEVICE


def run_audit(
    indexes: Sequence[str | Path] | str | Path,
    out: str | Path,
    images: ImageDataset | str | Path | None = None,
    generate: int | None = None,
    seed: int = DEFAULT_SAMPLING_SEED,
    sampling_steps: int | None = None,
    data: str | Path | ImageDataset | None = None,
    config: AuditConfig | None = None,
    query_events=None,
    device: str = DEFAULT_DEVICE,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    prompts: Sequence[str] | str | None = None,
) -> dict:
    """``retrac audit``: audit given or freshly generated images against an attribution index.

    Args:
        indexes: attribution index folders built from one store (e.g. ReTrac and TracIn).
        out: output folder: ``audit.jsonl``, ``summary.json``, ``self_influence.jsonl``, ``index.html``
            (and ``generated.npz`` with ``generate``), published whole when the audit is done (an
            existing folder is replaced in one step; ``retrac.audit.writers``).
        images: the images to audit (an :class:`ImageDataset` or a path ``load_dataset`` reads).
        generate: instead of ``images``, sample this many images from the last checkpoint.
        seed: seed of the sampling.
        sampling_steps: reverse steps of the sampling (default: ``DEFAULT_AUDIT_SAMPLING_STEPS`` = 100,
            at most the scheduler's ``T``; diffusers' DDPM pipeline would take all ``T``).
        data: the training data (default: the source the store recorded); must match its fingerprint.
        query_events: :class:`retrac.query.attribution.QueryEvents` of the attribution queries.
        announce: called with one line estimating the time of sampling and attribution before they run.
        prompts: for a text model, the prompts: with ``generate``, the images are sampled from them
            (cycled over the ``generate`` images, decoded by the VAE of a latent model) and attributed
            under them; with ``images``, one per image or one for all (default: the images' captions).

    The exact pixel index over the training images is written to ``out/pixel-index/`` (reused from a
    previous audit into ``out`` built from the same data), never beside the attribution index.

    Returns:
        The summary (also in ``summary.json``) with the written paths under ``"files"``.
    """
    if (images is None) == (generate is None):
        raise ConfigError(
            "give either images to audit (--images) or a number of images to generate (--generate)."
        )
    config = config or AuditConfig()
    dirs = [indexes] if isinstance(indexes, (str, Path)) else list(indexes)
    attributor = Attributor(
        dirs, query_events=query_events or QueryEvents(), device=device, progress=progress
    )
    store = attributor.feature_store
    train = load_training_data(store, data, attributor.training_data_path)
    if config.num_neighbours > len(train):
        raise ConfigError(
            f"n={config.num_neighbours} nearest neighbours asked for, but the training set has {len(train)} samples; "
            f"use n <= {len(train)}."
        )
    pixel_index = audit_pixel_index(out, train)  # goes into out/pixel-index/, never beside the index
    labels = None
    if generate is not None:
        task = attributor.task
        check_can_sample(task)
        sampling_steps = audit_sampling_steps(sampling_steps, task.num_train_timesteps)
        if announce is not None:
            sampling = sampling_seconds(task, generate, sampling_steps)
            attributing = attribution_seconds(attributor, train.images[0], generate)
            announce(
                f"sampling {generate} images x {sampling_steps} steps: about {describe(sampling)}; their query "
                f"gradients: about {describe(attributing)} (estimates measured here)"
            )
        prompts = _prompts_for(task, prompts, generate, None, cycle=True)
        if prompts is not None or task.is_latent:  # retrac.query.steps' sampler: text and latent models
            from retrac.query.steps import generate_samples

            states = None if prompts is None else task.encode_prompts(prompts, "--prompt")
            generated = generate_samples(task, generate, states, seed, sampling_steps, progress=progress)
        else:
            generated = generate_images(
                task.model,
                task.scheduler,
                generate,
                seed=seed,
                num_inference_steps=sampling_steps,
                progress=progress,
            )
        audited = ImageDataset(generated, [f"generated-{i:04d}" for i in range(generate)], source="generated")
    else:
        audited = images if isinstance(images, ImageDataset) else load_dataset(images)
        attributor.task.check_images(audited.images, f"images {audited.source!r}")
        labels = audited.labels if attributor.task.is_class_conditional else None
        prompts = _prompts_for(attributor.task, prompts, len(audited), audited.captions, cycle=False)
    result = audit_images(
        audited.images,
        pixel_index,
        attributor,
        config,
        audited.ids,
        class_labels=labels,
        self_influences=self_influence(store),
        prompts=prompts,
    )
    result.summary["indexes"] = [str(Path(d).resolve()) for d in dirs]
    result.summary["pixel_index"] = PIXEL_INDEX_FOLDER  # relative to the audit folder
    result.summary["audited"] = {
        "source": audited.source,
        "generated": generate,
        "seed": seed,
        "steps": sampling_steps,
    }
    generated_images = audited if generate is not None else None
    files = write_audit(result, out, train, generated=generated_images, pixel_index=pixel_index)
    return {**result.summary, "files": files}


def _prompts_for(task, prompts, count: int, captions, cycle: bool) -> list[str] | None:
    """A text model's prompts for ``count`` images: one for all, one per image, or (``cycle``, generated
    images) cycled; else ``captions``; ``None`` for a model without text (where a prompt is refused)."""
    if not task.is_text_conditional:
        if prompts:
            raise ConfigError("--prompt was given, but the model is not text-conditioned; leave it out.")
        return None
    if not prompts:
        if captions is None:
            raise ConfigError(
                "the model is text-conditioned: give --prompt (the images are sampled / attributed under it)."
            )
        return list(captions)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not cycle and len(prompts) not in (1, count):
        raise ConfigError(f"{len(prompts)} prompts for {count} images; give one for all or one per image.")
    return [prompts[i % len(prompts)] for i in range(count)]
