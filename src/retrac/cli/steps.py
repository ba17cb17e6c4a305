"""``retrac query --prompt`` and ``--query-steps``: text queries and step-specific (Journey-TRAK) queries.

``--prompt`` gives a text model's query prompts (one per image, or one for all; default: the query
folder's ``metadata.jsonl`` captions). ``--query-steps 900,500,100`` attributes generated samples at
those steps of their sampling trajectory (:mod:`retrac.query.steps`): one sample per ``--prompt``
for a text model, ``--generate N`` for an unconditional one, one per ``--label`` for a
class-conditional one; one top-k list per step.
"""

from __future__ import annotations

import argparse

from retrac.cli.options import open_attributor
from retrac.query.inputs import INPUT_SPACES
from retrac.query.steps import DEFAULT_SAMPLING_STEPS


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("text-to-image, latent and step-specific queries")
    group.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a text model's query prompt (repeatable: one per query image, or one for all; default: the "
        "images' metadata.jsonl captions); with --query-steps, one generated sample per prompt",
    )
    group.add_argument(
        "--input-space",
        default=INPUT_SPACES[0],
        choices=INPUT_SPACES,
        help="--images are pixels (a latent model encodes them to the VAE's mean) or a latent model's scaled "
        "latents in an .npy / .npz, e.g. generated ones (default: %(default)s)",
    )
    group.add_argument(
        "--query-steps",
        default=None,
        metavar="T1,T2,...",
        help="attribute generated samples at these timesteps of their sampling trajectory (Journey-TRAK), one "
        "top-k list per step; each is snapped to the sampler's grid",
    )
    group.add_argument(
        "--generate",
        type=int,
        default=1,
        metavar="N",
        help="with --query-steps on an unconditional model: how many samples (default: %(default)s)",
    )
    group.add_argument(
        "--label",
        type=int,
        action="append",
        default=None,
        help="with --query-steps on a class-conditional model: the class of each sample (repeatable)",
    )
    group.add_argument(
        "--sampling-steps",
        type=int,
        default=DEFAULT_SAMPLING_STEPS,
        help="reverse steps of the trajectory's sampler (default: %(default)s)",
    )
    group.add_argument(
        "--sampling-seed", type=int, default=0, help="seed of the trajectory (default: %(default)s)"
    )
    group.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance of a text model's trajectory (default: %(default)s, none)",
    )


def add_prompt_option(p: argparse.ArgumentParser) -> None:
    """``--prompt`` alone (``report``): a text model's query prompts."""
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a text model's query prompt (repeatable: one per query image, or one for all; default: the "
        "images' metadata.jsonl captions)",
    )


def query_prompts(given: list[str] | None, images, task) -> list[str] | str | None:
    """The prompts of query ``images`` for ``task``: ``--prompt`` (one for all, or one per image), else the
    images' captions for a text model; ``None`` for a model without text (a given prompt is then refused
    by the attributor, naming the model)."""
    if given:
        return given[0] if len(given) == 1 else list(given)
    if task.is_text_conditional and images.captions is not None:
        return images.captions
    return None


def run_step_query(args: argparse.Namespace) -> int:
    """Sample, attribute each requested step, print one top-k list per step (or one retrac.query document)."""
    import json

    import numpy as np
    import torch

    from retrac.errors import ConfigError
    from retrac.query.attribution import AttributionResult
    from retrac.query.steps import attribute_steps, parse_steps, sample_trajectory
    from retrac.schema import query_document

    if args.images is not None:
        raise ConfigError(
            "--query-steps attributes generated samples along their trajectory; leave out --images (given images "
            "have no trajectory)."
        )
    attributor = open_attributor(args, quiet=args.json)
    task = attributor.task
    steps = parse_steps(args.query_steps, task.num_train_timesteps)
    prompts, labels, conditioning, unconditional = None, None, None, None
    if task.is_text_conditional:
        if not args.prompt:
            raise ConfigError(
                "the model is text-conditioned: give --prompt (one generated sample per prompt)."
            )
        prompts = list(args.prompt)
        conditioning = task.encode_prompts(prompts, "--prompt")
        if args.guidance_scale != 1.0:
            unconditional = task.encode_prompts([""], "the empty prompt")
        count = len(prompts)
    elif task.is_class_conditional:
        if not args.label:
            raise ConfigError(
                "the model is class-conditional: give --label (one generated sample per label)."
            )
        labels = torch.tensor(args.label)
        conditioning, count = labels, len(args.label)
    else:
        if args.prompt:
            raise ConfigError("--prompt was given, but the model is not text-conditioned; leave it out.")
        count = args.generate
        if count < 1:
            raise ConfigError(f"--generate {count}: ask for at least one sample.")
    trajectory = sample_trajectory(
        task,
        steps,
        count,
        conditioning,
        seed=args.sampling_seed,
        num_inference_steps=args.sampling_steps,
        guidance_scale=args.guidance_scale,
        unconditional=unconditional,
        progress=not (args.json or args.no_progress),
    )
    methods = [args.method] if args.method else attributor.methods
    by_method = {
        m: attribute_steps(attributor, trajectory, args.k, m, args.opponents, labels, prompts)
        for m in methods
    }
    ids = [f"sample-{i}@t={t}" for t in trajectory.timesteps for i in range(count)]
    if args.json:  # rows: every sample at every step, in step order
        stacked = [
            AttributionResult(
                method=m,
                indices=np.concatenate([r.indices for r in per_step.values()]),
                scores=np.concatenate([r.scores for r in per_step.values()]),
                ids=[row for r in per_step.values() for row in r.ids],
                opponents=args.opponents,
                query_ids=ids,
            )
            for m, per_step in by_method.items()
        ]
        print(json.dumps(query_document(stacked)))
        return 0
    kind = "opponents" if args.opponents else "proponents"
    for requested, t in zip(trajectory.requested, trajectory.timesteps, strict=True):
        snapped = "" if requested == t else f" (requested {requested}, the sampler's nearest step)"
        print(f"step t={t}{snapped}:")
        for method, per_step in by_method.items():
            result = per_step[t]
            print(f"  {method}: top {args.k} {kind} (score = sum_k w_k <u_k, q_k>; positive = proponent)")
            for i in range(count):
                what = (
                    f"prompt {prompts[i]!r}"
                    if prompts
                    else (f"label {args.label[i]}" if labels is not None else "")
                )
                pairs = ", ".join(
                    f"{z} ({s:.4g})" for z, s in zip(result.ids[i], result.scores[i], strict=True)
                )
                print(f"    sample {i} {what}: {pairs}")
    return 0
