"""The ``retrac lds`` subcommand (registered by :func:`retrac.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULT_FILENAME = "lds.json"


def add_lds_command(sub) -> None:
    from retrac.cli.options import QUERY_PRESETS_HELP, add_compute_options
    from retrac.query.attribution import DEFAULT_QUERY_PRESET, QUERY_PRESETS

    p = sub.add_parser(
        "lds",
        help="linear datamodeling score: retrain on random subsets, correlate predicted and actual test losses",
        description="Draw M random subsets (fraction alpha) of the training data, retrain one model per subset "
        "(the demo trainer, or --train-command), measure each test image's loss on each model at fixed "
        "(timestep, noise) events, and report for each scoring the Spearman correlation across subsets of the "
        "predicted effect (sum of the subset's scores) with minus the loss (a proponent lowers the loss), "
        "averaged over test images, with a 95%% bootstrap interval. Pixel-space similarity and random scores "
        "are reported as baselines. Models and losses are cached in --out; rerun the same command to resume.",
    )
    p.add_argument("--data", required=True, help="training data: .npz, .npy or a folder of images")
    p.add_argument(
        "--test", required=True, help="test images: an image file, a folder of images, .npy or .npz"
    )
    p.add_argument("--out", required=True, help="the run folder (created; reopened to resume)")
    p.add_argument(
        "--subsets", type=int, default=32, metavar="M", help="random subsets (default: %(default)s)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets (default: %(default)s)")
    p.add_argument(
        "--train-command",
        default=None,
        metavar="CMD",
        help='train with your command, e.g. "python train.py {subset_file} {out_dir}": {subset_file} lists the '
        "subset's rows of --data (0-based, one a line), {out_dir} is where to save the model (default: the "
        "demo trainer)",
    )
    p.add_argument("--epochs", type=int, default=40, help="demo trainer: epochs (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="demo trainer: batch size (default: %(default)s)"
    )
    p.add_argument(
        "--learning-rate", type=float, default=2e-3, help="demo trainer: AdamW rate (default: %(default)s)"
    )
    p.add_argument(
        "--train-seed", type=int, default=0, help="demo trainer: seed of every model (default: %(default)s)"
    )
    p.add_argument(
        "--loss-events",
        default="50x4",
        metavar="TxM",
        help="loss events: T evenly spaced timesteps x M noise draws (default: %(default)s)",
    )
    p.add_argument("--loss-seed", type=int, default=1, help="seed of the loss noise (default: %(default)s)")
    p.add_argument(
        "--index",
        action="append",
        default=[],
        help="an attribution index folder built with --kind flat (repeatable, one per method)",
    )
    p.add_argument(
        "--query-events",
        default=DEFAULT_QUERY_PRESET,
        choices=list(QUERY_PRESETS),
        help=f"query events T_q x M of the indexes: {QUERY_PRESETS_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--scores",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a (n_test, N) score matrix in a .npy file, positive = proponent (repeatable)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the interval (default: %(default)s)",
    )
    p.add_argument(
        "--counterfactual-k",
        type=int,
        default=0,
        metavar="K",
        help="also remove each of the first --counterfactual-queries test images' top-K proponents under each "
        "scoring (and K random samples) and retrain (default: off)",
    )
    p.add_argument(
        "--counterfactual-queries",
        type=int,
        default=10,
        metavar="Q",
        help="test images of the counterfactual check (default: %(default)s)",
    )
    add_compute_options(p, device_help="torch device of the demo trainer, the losses and the query gradients")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_lds_command)


def parse_loss_events(spec: str) -> tuple[int, int]:
    """``"TxM"`` -> ``(T, M)``."""
    from retrac.errors import ConfigError

    timesteps, sep, noise = spec.lower().partition("x")
    if not sep or not timesteps.isdigit() or not noise.isdigit():
        raise ConfigError(f"--loss-events {spec!r} is not TxM; e.g. 50x4 for 50 timesteps x 4 noise draws.")
    return int(timesteps), int(noise)


def _parse_scores(specs: list[str], num_test: int, num_train: int) -> dict:
    import numpy as np

    from retrac.errors import ConfigError, DataError

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--scores {spec!r} is not NAME=FILE.npy.")
        try:
            scores = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"--scores {path!r} cannot be read as a .npy array ({error}).") from None
        if scores.shape != (num_test, num_train):
            raise DataError(
                f"--scores {name}: shape {scores.shape}, expected (n_test, N) = {(num_test, num_train)}."
            )
        out[name] = scores
    return out


def run_lds_command(args: argparse.Namespace) -> int:

    from retrac._io import atomic_write_json
    from retrac.data import load_dataset
    from retrac.demo import DemoConfig
    from retrac.lds import (
        CommandTrainer,
        DemoTrainer,
        LDSConfig,
        LDSRun,
        counterfactual_check,
        format_table,
        index_scores,
        lds_table,
        pixel_scores,
        random_scores,
    )
    from retrac.query.attribution import QueryEvents

    progress = not (args.no_progress or args.json)
    data = load_dataset(args.data)
    test = load_dataset(args.test)
    if args.train_command:
        trainer = CommandTrainer(args.train_command)
    else:
        trainer = DemoTrainer(
            data,
            DemoConfig(
                seed=args.train_seed,
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                num_checkpoints=1,
            ),
            device=args.device,
        )
    loss_timesteps, loss_noise = parse_loss_events(args.loss_events)
    config = LDSConfig(args.subsets, args.alpha, args.seed, loss_timesteps, loss_noise, args.loss_seed)
    run = LDSRun(args.out, data, trainer, config, device=args.device, progress=progress)
    run.train_subset_models()
    conditional = test.labels is not None and _is_class_conditional(run)
    labels = test.labels if conditional else None
    losses = run.losses(test.images, labels)

    scorings = {}
    if args.index:
        scorings.update(
            index_scores(
                args.index,
                test.images,
                query_events=QueryEvents.preset(args.query_events),
                class_labels=labels,
                device=args.device,
                progress=progress,
            )
        )
    scorings.update(_parse_scores(args.scores, len(test), len(data)))
    attributions = list(scorings)
    scorings["pixel_nn (-L2)"] = pixel_scores(test.images, data.images, "neg_l2")
    scorings["pixel_nn (cosine)"] = pixel_scores(test.images, data.images, "cosine")
    scorings["random"] = random_scores(len(test), len(data), args.seed)
    results = lds_table(scorings, run.masks(), losses, num_resamples=args.bootstrap, seed=args.seed)
    specific = None
    if len(test) > 1:
        specific = lds_table(
            scorings, run.masks(), losses, num_resamples=args.bootstrap, seed=args.seed, centered=True
        )
    record = {
        "n_subsets": config.num_subsets,
        "n_test": len(test),
        "n_train": len(data),
        "alpha": config.alpha,
        "loss_events": config.loss_events.to_dict(),
        "sign": "Spearman of the predicted effect (sum of a subset's scores) with minus the test loss",
        "lds": {r.name: r.to_dict(per_test=True) for r in results},
        "lds_test_specific": {r.name: r.to_dict(per_test=True) for r in specific or []},
        "models_trained_now": len(run.trained),
    }
    if args.counterfactual_k:
        queries = min(args.counterfactual_queries, len(test))
        names = attributions + ["pixel_nn (-L2)"]
        record["counterfactual"] = {
            name: counterfactual_check(
                run,
                scorings[name][:queries],
                test.images[:queries],
                args.counterfactual_k,
                name,
                None if labels is None else labels[:queries],
            ).to_dict()
            for name in names
        }
    atomic_write_json(Path(args.out) / RESULT_FILENAME, record)
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"LDS over {config.num_subsets} subsets of {run.manifest['subset_size']} of {len(data)} training samples, "
        f"{len(test)} test images, loss events {loss_timesteps} x {loss_noise} "
        f"({len(run.trained)} models trained now, the rest reused)"
    )
    print("LDS = mean over test images of Spearman(sum of the subset's scores, -loss); positive = good")
    if specific:
        print("test-specific LDS: the same after removing each subset's mean over the test images")
    print(format_table(results, specific))
    for name, check in record.get("counterfactual", {}).items():
        print(
            f"counterfactual {name}: removing the top-{check['k']} proponents changes the loss by "
            f"{check['mean_delta_top']:+.4g} on average, {check['k']} random samples by {check['mean_delta_random']:+.4g} "
            f"(top above random for {check['share_top_above_random']:.0%} of {check['n_test']} images)"
        )
    print(f"results: {Path(args.out) / RESULT_FILENAME}")
    return 0


def _is_class_conditional(run) -> bool:
    from retrac.checkpoints import load_unet

    config = load_unet(run.model(run.subset_names[0], run.subsets[0])).config
    return getattr(config, "num_class_embeds", None) is not None or bool(
        getattr(config, "class_embed_type", None)
    )
