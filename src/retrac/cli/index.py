"""``retrac index``: featurize a training set into a feature store."""

from __future__ import annotations

import argparse

from retrac.checkpoints import CHECKPOINT_INFO, DEFAULT_CHECKPOINT_WEIGHT
from retrac.cli.options import add_compute_options, add_data_options
from retrac.cli.parts import add_model_part_options, describe_task_record, model_parts
from retrac.data import CAPTION_COLUMN
from retrac.events import SCHEDULE_HELP
from retrac.indexer.claims import DEFAULT_LEASE_SECONDS
from retrac.indexer.config import DEFAULT_DIM, DTYPES, LAYOUTS, IndexConfig
from retrac.projection import DENSE_BACKENDS, PROJECTOR_KINDS
from retrac.task import OBJECTIVES


def add_index_command(sub) -> None:
    p = sub.add_parser(
        "index",
        help="featurize a training set: projected per-sample gradients per event and checkpoint -> Zarr store",
        description="Compute phi_k(z, e) = P_k grad l(theta_k; z, e) and n_k(z, e) = ||grad l|| for every "
        "training sample z, event e and checkpoint k, into a resumable, sharded Zarr store. Rerun the same "
        "command to resume; run it with --shard I/N in N processes to split the work, or with --shard auto in "
        "any number of workers (torchrun --nproc-per-node N -m retrac index ... --shard auto) that claim shards "
        "from one another (or let --launch N start N local workers that way). --out may be a folder or an s3://, gs://, memory:// or file:// URL.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="PATH[=WEIGHT]",
        help="a checkpoint, in training order (repeatable); WEIGHT is w_k "
        f"(default: {CHECKPOINT_INFO} or {DEFAULT_CHECKPOINT_WEIGHT:g})",
    )
    p.add_argument("--data", required=True, help="training data: .npz, .npy or a folder of images")
    p.add_argument(
        "--out",
        required=True,
        help="the store: a folder or an s3://, gs://, memory:// or file:// URL (created; reopened to resume)",
    )
    p.add_argument(
        "--events",
        default=IndexConfig.events,
        help=f"events per sample: {SCHEDULE_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--projector",
        default=IndexConfig.projector,
        choices=PROJECTOR_KINDS,
        help="factored: per-layer projection from layer hooks, never forms per-sample gradients (default: %(default)s)",
    )
    p.add_argument(
        "--dim",
        type=int,
        default=None,
        help=f"projection dimension d for dense / factored (default: {DEFAULT_DIM})",
    )
    p.add_argument(
        "--dense-backend",
        default=IndexConfig.dense_backend,
        choices=DENSE_BACKENDS,
        help="dense projector: trak BasicProjector, or CudaProjector with fast_jl (default: %(default)s)",
    )
    p.add_argument(
        "--objective",
        default=IndexConfig.objective,
        choices=OBJECTIVES,
        help="loss (TracIn/ReTrac/TRAK), l1 (paper's code), sqnorm (D-TRAK) (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default=IndexConfig.dtype,
        choices=DTYPES,
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=IndexConfig.batch_size,
        help="samples per gradient batch (default: %(default)s)",
    )
    p.add_argument(
        "--shard-rows",
        type=int,
        default=IndexConfig.shard_rows,
        help="samples per shard (default: %(default)s)",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N|auto|slurm",
        help="I/N: fill only shards s with s %% N == I; slurm: I/N from the SLURM job array; auto: work "
        "stealing, claim unfinished shards until the store is complete (torchrun, several machines)",
    )
    p.add_argument(
        "--launch",
        type=int,
        default=None,
        metavar="N",
        help="start N local workers through torchrun (python -m torch.distributed.run --standalone "
        "--nproc-per-node N -m retrac index <these options> --shard auto), wait for them and exit with the first failed one's "
        "status (0 when all succeed); each gets cores / N torch threads unless --threads says otherwise",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        metavar="SECONDS",
        help="--shard auto: a claim not renewed for this long is taken over (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        default=IndexConfig.layout,
        choices=LAYOUTS,
        help="full: every event's features; compact: only the TracIn and ReTrac train vectors per sample "
        "(S/2 times less disk; no per-event features) (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=IndexConfig.seed,
        help="seed of events, noise and projections (default: %(default)s)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="parameters that count",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="parameters left out",
    )
    add_data_options(p, "--data")
    add_model_part_options(p)
    add_compute_options(p)
    p.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from retrac.indexer import IndexConfig, default_threads, featurize_dataset

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
        layout=args.layout,
    )  # checked here, before any worker is launched
    if args.launch is not None:
        from retrac.cli.launch import launch_workers

        return launch_workers(args.argv, args.launch, args.shard, args.out, args.threads)
    # each local worker gets cores / local_world_size threads unless --threads says otherwise
    threads = args.threads if args.threads is not None else default_threads(args.shard)
    data = args.data
    if args.caption_column != CAPTION_COLUMN or args.pixel_range is not None or args.labels is not None:
        from retrac.data import load_dataset

        data = load_dataset(
            args.data, caption_column=args.caption_column, pixel_range=args.pixel_range, labels=args.labels
        )
    store = featurize_dataset(
        args.checkpoint,
        data,
        args.out,
        config,
        shard=args.shard,
        device=args.device,
        progress=not args.no_progress,
        threads=threads,
        lease_seconds=args.lease,
        parts=model_parts(args),
    )
    missing = store.missing()
    print(
        f"store {store.path}: N={store.num_samples} samples x K={store.num_checkpoints} checkpoints x "
        f"S={store.num_events} events, d={store.dim} ({store.config.projector}, norms {store.norm_kind}, "
        f"{store.layout} layout; {threads} torch threads)"
    )
    record = store.attrs["projectors"][0]
    if record.get("uncovered_parameters"):
        print(
            f"factored projector: {record['uncovered_parameters']:,} parameters ({record['uncovered_share']:.2%}) "
            f"not covered (left out of features and norms): {', '.join(record['uncovered'][:5])}"
            + (" ..." if len(record["uncovered"]) > 5 else "")
        )
    for line in describe_task_record(store.attrs["task"]):
        print(line)
    print(f"fingerprint {store.fingerprint}")
    print(
        "complete"
        if not missing
        else f"{len(missing)} (checkpoint, shard) pairs left for other --shard processes"
    )
    return 0
