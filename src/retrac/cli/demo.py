"""``retrac demo``: train the tiny digits DDPM and run every pipeline stage on it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrac._io import atomic_write_text, publish_directory
from retrac.cli.options import add_compute_options, add_overwrite
from retrac.demo import DemoConfig


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny digits DDPM and run every pipeline stage on it")
    p.add_argument("--out", default="retrac-demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run for smoke tests (measured 132 s, the full demo 609 s, with one torch thread on 2 "
        "shared CPU cores)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DemoConfig.seed,
        help="seed of every random choice (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: {DemoConfig.epochs}, {DemoConfig.quick().epochs} with --quick)",
    )
    p.add_argument(
        "--planted-outliers",
        type=int,
        default=DemoConfig.planted_outliers,
        metavar="N",
        help="add N out-of-distribution photo patches to the training set (default: %(default)s)",
    )
    p.add_argument(
        "--duplicate-samples",
        type=int,
        default=DemoConfig.duplicated_samples,
        metavar="N",
        help="duplicate N training digits --duplicate-copies times each (default: %(default)s)",
    )
    p.add_argument(
        "--duplicate-copies",
        type=int,
        default=DemoConfig.duplicate_copies,
        help="copies per duplicated digit (default: %(default)s)",
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="the text-conditioned demo: captioned digits, a tiny UNet2DConditionModel and CLIP text encoder, "
        "queries by prompt and by sampling step (retrac.demo_text)",
    )
    add_compute_options(p, device_help="torch device of training, gradients and sampling")
    add_overwrite(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from retrac.demo import run_demo

    if args.text:
        from retrac.cli.text_demo import run_text_demo_command

        return run_text_demo_command(args)

    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    overrides = {
        "planted_outliers": args.planted_outliers,
        "duplicated_samples": args.duplicate_samples,
        "duplicate_copies": args.duplicate_copies,
    }
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = DemoConfig(**{**config.__dict__, **overrides})
    out = Path(args.out)
    # --overwrite (checked by prepare): the new demo replaces the old one in one step
    if out.is_dir() and any(out.iterdir()):
        with publish_directory(out) as staging:
            run_demo(config, staging, progress=not args.no_progress, device=args.device)
            summary = _as_published(staging, out)
    else:  # a new folder: written in place, so the artifacts record their final paths
        summary = run_demo(config, out, progress=not args.no_progress, device=args.device)
    print(
        f"trained {len(summary['checkpoints'])} checkpoints in {summary['train_seconds']} s "
        f"(final loss {summary['final_loss']:.4f})"
    )
    print(f"training data:      {summary['train']}")
    print(f"held-out data:      {summary['heldout']}")
    print(f"training-event log: {summary['events']}")
    for ckpt in summary["checkpoints"]:
        print(f"checkpoint:         {ckpt['path']}  (weight {ckpt['weight']:.4g})")
    print(f"feature store:      {summary['store']}")
    if "store_sqnorm" in summary:
        print(
            f"sqnorm store:       {summary['store_sqnorm']}  (for {summary['default_method']}, the default)"
        )
    for method, path in summary["indexes"].items():
        print(f"{method + ' index:':<20}{path}")
    print(f"report:             {summary['report']}")
    if "label_share_top10" in summary:
        shares = ", ".join(f"{m} {v:.0%}" for m, v in summary["label_share_top10"].items())
        print(f"same label in top 10 of held-out digits: {shares}")
    print(f"serve it:           {summary['serve']}")
    print(f"summary:            {out / 'demo.json'}")
    print("seconds per stage:  " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    return 0


def _as_published(staging: Path, out: Path) -> dict:
    """``staging/demo.json`` with every path written as it will be once ``staging`` is published at ``out``.

    The artifacts inside need no rewrite: an index finds its store, and a store its checkpoints and data,
    relative to where they are now (``retrac.relocate``).
    """
    names = [(str(staging.absolute()), str(out.absolute())), (str(staging), str(out))]

    def moved(value):
        if isinstance(value, str):
            for old, new in names:
                value = value.replace(old, new)
            return value
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    summary = moved(json.loads((staging / "demo.json").read_text()))
    atomic_write_text(staging / "demo.json", json.dumps(summary, indent=2))
    return summary
