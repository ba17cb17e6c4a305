"""The ``retrac`` command: ``demo``, ``index``, ``build``, ``query``, ``report``.

Each verb parses its options into the library's config objects and calls the Python API.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrac.errors import RetracError


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny digits DDPM and run every pipeline stage on it")
    p.add_argument("--out", default="retrac-demo", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short run for smoke tests (about 30 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 40, 4 with --quick)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from retrac.demo import DemoConfig, train_digits_ddpm

    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    if args.epochs is not None:
        config = DemoConfig(**{**config.__dict__, "epochs": args.epochs})
    out = Path(args.out)
    summary = train_digits_ddpm(config, out)
    print(
        f"trained {len(summary['checkpoints'])} checkpoints in {summary['train_seconds']} s "
        f"(final loss {summary['final_loss']:.4f})"
    )
    print(f"training data:      {summary['train']}")
    print(f"held-out data:      {summary['heldout']}")
    print(f"training-event log: {summary['events']}")
    for ckpt in summary["checkpoints"]:
        print(f"checkpoint:         {ckpt['path']}  (weight {ckpt['weight']:.4g})")
    print(f"summary:            {out / 'demo.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Which training samples made a diffusion model's output? "
        "Diffusion-TracIn / Diffusion-ReTrac / (D-)TRAK attribution served from a FAISS index.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RetracError as exc:
        print(f"retrac {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
