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


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="featurize a training set: projected per-sample gradients per event and checkpoint -> Zarr store",
        description="Compute phi_k(z, e) = P_k grad l(theta_k; z, e) and n_k(z, e) = ||grad l|| for every "
        "training sample z, event e and checkpoint k, into a resumable, sharded Zarr store. Rerun the same "
        "command to resume; run it with --shard I/N in N processes to split the work.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="PATH[=WEIGHT]",
        help="a checkpoint, in training order (repeatable); WEIGHT is w_k (default: retrac_checkpoint.json or 1)",
    )
    p.add_argument("--data", required=True, help="training data: .npz, .npy or a folder of images")
    p.add_argument("--out", required=True, help="the store folder (created; reopened to resume)")
    p.add_argument(
        "--events",
        default="stratified:4",
        help="events per sample: stratified:S, uniform:S, replay:LOG or t1,t2,... (default: %(default)s)",
    )
    p.add_argument("--projector", default="dense", choices=["exact", "dense"], help="(default: %(default)s)")
    p.add_argument("--dim", type=int, default=None, help="projection dimension d for dense (default: 1024)")
    p.add_argument(
        "--dense-backend",
        default="basic",
        choices=["basic", "fast_jl"],
        help="dense projector: trak BasicProjector, or CudaProjector with fast_jl (default: %(default)s)",
    )
    p.add_argument(
        "--objective",
        default="loss",
        choices=["loss", "l1", "sqnorm"],
        help="loss (TracIn/ReTrac/TRAK), l1 (paper's code), sqnorm (D-TRAK) (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float16", "float32"], help="(default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="samples per gradient batch (default: %(default)s)"
    )
    p.add_argument("--shard-rows", type=int, default=256, help="samples per shard (default: %(default)s)")
    p.add_argument("--shard", default=None, metavar="I/N", help="fill only shards s with s %% N == I")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of events, noise and projections (default: %(default)s)"
    )
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="parameters that count")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="parameters left out")
    p.add_argument("--device", default="cpu", help="torch device for the gradients (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from retrac.indexer import IndexConfig, featurize_dataset

    config = IndexConfig(
        events=args.events,
        projector=args.projector,
        dim=args.dim,
        dense_backend=args.dense_backend,
        objective=args.objective,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        shard_rows=args.shard_rows,
    )
    store = featurize_dataset(
        args.checkpoint,
        args.data,
        args.out,
        config,
        shard=args.shard,
        device=args.device,
        progress=not args.no_progress,
    )
    missing = store.missing()
    print(
        f"store {store.path}: N={store.num_samples} samples x K={store.num_checkpoints} checkpoints x "
        f"S={store.num_events} events, d={store.dim} ({store.config.projector}, norms {store.norm_kind})"
    )
    print(f"fingerprint {store.fingerprint}")
    print(
        "complete"
        if not missing
        else f"{len(missing)} (checkpoint, shard) pairs left for other --shard processes"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Which training samples made a diffusion model's output? "
        "Diffusion-TracIn / Diffusion-ReTrac / (D-)TRAK attribution served from a FAISS index.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_index(sub)
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
