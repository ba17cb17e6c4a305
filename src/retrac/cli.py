"""The ``retrac`` command: ``demo``, ``index``, ``build``, ``query``, ``audit``, ``report``, ``serve``, ``verify``.

Each verb parses its options into the library's config objects and calls the Python API.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from retrac.audit import AuditConfig
from retrac.bias import DEFAULT_FRACTION, DEFAULT_MIN_QUERIES
from retrac.checkpoints import CHECKPOINT_INFO, DEFAULT_CHECKPOINT_WEIGHT
from retrac.demo import DemoConfig
from retrac.errors import ConfigError, RetracError
from retrac.events import SCHEDULE_HELP
from retrac.indexer.config import DEFAULT_DIM, DTYPES, IndexConfig
from retrac.lds.cli import add_lds_command
from retrac.projection import DENSE_BACKENDS, PROJECTOR_KINDS
from retrac.query.attribution import (
    DEFAULT_INDEX_KIND,
    DEFAULT_QUERY_PRESET,
    DEFAULT_SEARCH_DEVICE,
    DEFAULT_TOP_K,
    QUERY_PRESETS,
    QueryEvents,
)
from retrac.query.index import AUTO_FLAT_MAX_ROWS, DEVICES
from retrac.query.vectors import DEFAULT_KERNEL_C, DEFAULT_METHOD, METHOD_NAMES
from retrac.report.bias import DEFAULT_TITLE
from retrac.sampling import DEFAULT_SAMPLING_SEED
from retrac.serve.cli import add_serve_command
from retrac.task import DEFAULT_DEVICE, OBJECTIVES
from retrac.verify import add_verify_command

TORCH_DEVICE_COMMANDS = ("index", "query", "audit", "report")  # their --device is a torch device
OUT_FOLDER_COMMANDS = ("demo", "build", "audit", "report")  # their --out is a folder they write


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy shared machine)",
    )


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny digits DDPM and run every pipeline stage on it")
    p.add_argument("--out", default="retrac-demo", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short run for smoke tests (about 30 s)")
    p.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="seed of every random choice (default: %(default)s)"
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
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from retrac.demo import run_demo

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
    summary = run_demo(config, out, progress=not args.no_progress)
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
    for method, path in summary["indexes"].items():
        print(f"{method + ' index:':<20}{path}")
    print(f"report:             {summary['report']}")
    print(f"serve it:           {summary['serve']}")
    print(f"summary:            {out / 'demo.json'}")
    print("seconds per stage:  " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
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
        help="a checkpoint, in training order (repeatable); WEIGHT is w_k "
        f"(default: {CHECKPOINT_INFO} or {DEFAULT_CHECKPOINT_WEIGHT:g})",
    )
    p.add_argument("--data", required=True, help="training data: .npz, .npy or a folder of images")
    p.add_argument("--out", required=True, help="the store folder (created; reopened to resume)")
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
    p.add_argument("--dtype", default=IndexConfig.dtype, choices=DTYPES, help="(default: %(default)s)")
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
        metavar="I/N",
        help="fill only shards s with s %% N == I ('auto': RANK/WORLD_SIZE from torchrun)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=IndexConfig.seed,
        help="seed of events, noise and projections (default: %(default)s)",
    )
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="parameters that count")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="parameters left out")
    p.add_argument(
        "--device", default=DEFAULT_DEVICE, help="torch device for the gradients (default: %(default)s)"
    )
    _add_threads(p)
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
    record = store.attrs["projectors"][0]
    if record.get("uncovered_parameters"):
        print(
            f"factored projector: {record['uncovered_parameters']:,} parameters ({record['uncovered_share']:.2%}) "
            f"not covered (left out of features and norms): {', '.join(record['uncovered'][:5])}"
            + (" ..." if len(record["uncovered"]) > 5 else "")
        )
    print(f"fingerprint {store.fingerprint}")
    print(
        "complete"
        if not missing
        else f"{len(missing)} (checkpoint, shard) pairs left for other --shard processes"
    )
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build a FAISS inner-product index of one method over a feature store",
        description="Aggregate the store's features into train vectors U(z) = concat_k(w_k u_k(z)) of a "
        "method (tracin: mean of phi; retrac: mean of phi / n_k; trak / dtrak: tracin with the kernel "
        "folded into queries) and index them for inner-product search.",
    )
    p.add_argument("--store", required=True, help="a complete feature store (from `retrac index`)")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=METHOD_NAMES,
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--kernel",
        nargs="?",
        const=DEFAULT_KERNEL_C,
        type=float,
        default=None,
        metavar="C",
        help="apply the kernel (Phi^T Phi + lambda I)^-1, lambda = C * mean ||u||^2 (C default %(const)s)",
    )
    p.add_argument(
        "--index",
        default=DEFAULT_INDEX_KIND,
        help=f"auto (Flat up to {AUTO_FLAT_MAX_ROWS:,} rows, IVF above), flat, ivf, hnsw or a FAISS factory "
        "string (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="the index folder")
    p.add_argument(
        "--device",
        default=DEFAULT_SEARCH_DEVICE,
        choices=DEVICES,
        help="faiss device (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from retrac.query.attribution import build_attribution_index

    built = build_attribution_index(
        args.store,
        args.out,
        args.method,
        kernel=args.kernel,
        index=args.index,
        device=args.device,
        progress=not args.no_progress,
    )
    recall = f", recall@10 vs flat {built.recall['recall_at_10']:.3f}" if built.recall else ""
    print(f"index {args.out}: {built.num_vectors} vectors x {built.dim} dims, {built.factory}{recall}")
    return 0


QUERY_PRESETS_HELP = ", ".join(f"{name} {t} x {m}" for name, (t, m) in QUERY_PRESETS.items())


def _add_query_event_options(p: argparse.ArgumentParser) -> None:
    """``--events`` / ``--seed`` / ``--device``: how query gradients are computed (query, report)."""
    p.add_argument(
        "--events",
        default=DEFAULT_QUERY_PRESET,
        choices=list(QUERY_PRESETS),
        help=f"query events T_q x M: {QUERY_PRESETS_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=QueryEvents.seed, help="seed of the query noise (default: %(default)s)"
    )
    p.add_argument(
        "--device", default=DEFAULT_DEVICE, help="torch device for the gradients (default: %(default)s)"
    )
    _add_threads(p)


def _query_events(args: argparse.Namespace):
    return QueryEvents.preset(args.events, args.seed)


def _add_query(sub) -> None:
    p = sub.add_parser(
        "query",
        help="top-k training samples of query images from one or more indexes",
        description="Score I(z, z') = sum_k w_k <u_k(z), q_k(z')>: positive = proponent (a step on z lowers the "
        "loss on z'), negative = opponent.",
    )
    p.add_argument(
        "--index", required=True, action="append", help="an index folder (repeatable, one per method)"
    )
    p.add_argument(
        "--images", required=True, help="query images: an image file, a folder of images, .npy or .npz"
    )
    p.add_argument("--k", type=int, default=DEFAULT_TOP_K, help="results per query (default: %(default)s)")
    p.add_argument("--method", default=None, help="which loaded index to use (default: the only one, or all)")
    p.add_argument(
        "--opponents", action="store_true", help="the most negative scores instead of the most positive"
    )
    _add_query_event_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_run_query)


def _run_query(args: argparse.Namespace) -> int:
    import json

    from retrac.data import load_dataset
    from retrac.query.attribution import Attributor

    images = load_dataset(args.images)
    attributor = Attributor(
        args.index,
        query_events=_query_events(args),
        device=args.device,
        progress=not args.json,
    )
    labels = images.labels if attributor.task.is_class_conditional else None
    methods = [args.method] if args.method else attributor.methods
    results = {m: attributor.attribute(images.images, args.k, m, args.opponents, labels) for m in methods}
    if args.json:
        payload = {m: {**r.to_dict(), "query_ids": images.ids} for m, r in results.items()}
        print(json.dumps(next(iter(payload.values())) if len(payload) == 1 else {"results": payload}))
        return 0
    kind = "opponents" if args.opponents else "proponents"
    for method, result in results.items():
        print(f"{method}: top {args.k} {kind} (score = sum_k w_k <u_k, q_k>; positive = proponent)")
        for q, query_id in enumerate(images.ids):
            pairs = ", ".join(f"{i} ({s:.4g})" for i, s in zip(result.ids[q], result.scores[q], strict=True))
            print(f"  {query_id}: {pairs}")
    return 0


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="memorization audit: pixel-space nearest training images, copy verdicts, top proponents, hot spots",
        description="For every image: its nearest training images (exact L2), the relative distance "
        "r = d1 / mean distance to the n nearest (Carlini et al. 2023), a verdict (copy / near / novel), and "
        "its top-k proponents under each index. Across images: hot spots and the self-influence ranking. "
        "Writes OUT/audit.jsonl, OUT/summary.json, OUT/self_influence.jsonl and OUT/index.html.",
    )
    p.add_argument(
        "--index",
        required=True,
        action="append",
        help="an attribution index folder (repeatable, one per method)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="images to audit: an image file, a folder of images, .npy or .npz")
    source.add_argument("--generate", type=int, metavar="N", help="sample N images from the last checkpoint")
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SAMPLING_SEED, help="seed of --generate (default: %(default)s)"
    )
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help="reverse steps of --generate (default: the scheduler's T)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--k",
        type=int,
        default=AuditConfig.k,
        help="top proponents per image and method (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="training data (default: the source recorded in the store; fingerprint checked)",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=AuditConfig.num_neighbours,
        help="n of the relative distance (default: %(default)s)",
    )
    p.add_argument(
        "--copy-threshold",
        type=float,
        default=AuditConfig.copy_threshold,
        help="copy if r is below it (default: %(default).4g)",
    )
    p.add_argument(
        "--near-threshold",
        type=float,
        default=AuditConfig.near_threshold,
        help="near if r is below it (default: %(default)s)",
    )
    p.add_argument(
        "--query-events",
        default=DEFAULT_QUERY_PRESET,
        choices=list(QUERY_PRESETS),
        help=f"attribution query events T_q x M: {QUERY_PRESETS_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="torch device for gradients and sampling (default: %(default)s)",
    )
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from retrac.audit import run_audit

    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise ConfigError(
            f"--sampling-steps {args.sampling_steps} must be at least 1 (reverse steps of --generate)."
        )
    config = AuditConfig(
        k=args.k,
        num_neighbours=args.neighbours,
        copy_threshold=args.copy_threshold,
        near_threshold=args.near_threshold,
    )
    summary = run_audit(
        args.index,
        args.out,
        images=args.images,
        generate=args.generate,
        seed=args.seed,
        sampling_steps=args.sampling_steps,
        data=args.data,
        config=config,
        query_events=QueryEvents.preset(args.query_events),
        device=args.device,
        progress=not args.no_progress,
    )
    counts = ", ".join(f"{v} {c}" for v, c in summary["verdict_counts"].items())
    print(f"audited {summary['num_images']} images: {counts} (copy rate {summary['copy_rate']:.3f})")
    for hot in summary["hot_spots"][:5]:
        print(
            f"hot spot {hot['id']}: {hot['outputs']} outputs (nearest of {hot['as_nearest']}, top-1 {hot['as_top1']})"
        )
    for name, path in summary["files"].items():
        print(f"{name + ':':<16}{path}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="HTML page of the timestep-induced bias: norm vs timestep, TracIn vs ReTrac counts, top-k grids",
        description="Attribute query images against a store's indexes (e.g. one TracIn and one ReTrac index) and "
        "write OUT/bias.html with PNG figures: per-sample gradient norm against timestep, the number of distinct "
        f"and of generally influential training samples (in the top-k of at least max({DEFAULT_MIN_QUERIES}, "
        "ceil(F * Q)) of the Q "
        "queries) per method, planted outliers in the top-k lists, and every query's top-k grid; OUT/bias.json "
        "holds the figures.",
    )
    p.add_argument(
        "--index", required=True, action="append", help="an index folder (repeatable, one per method)"
    )
    p.add_argument(
        "--images", required=True, help="query images: an image file, a folder of images, .npy or .npz"
    )
    p.add_argument("--store", default=None, help="the feature store (default: the one recorded in the index)")
    p.add_argument(
        "--data",
        default=None,
        help="the training images, for thumbnails (default: the store's recorded data path)",
    )
    p.add_argument("--out", default="retrac-report", help="output folder (default: %(default)s)")
    p.add_argument(
        "--k", type=int, default=DEFAULT_TOP_K, help="top-k proponents per query (default: %(default)s)"
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=DEFAULT_FRACTION,
        metavar="F",
        help=f"generally influential: in the top-k of at least max({DEFAULT_MIN_QUERIES}, ceil(F * Q)) queries "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--outliers",
        default=None,
        metavar="FILE",
        help="planted outlier ids: planted.json, a JSON list or one id a line",
    )
    _add_query_event_options(p)
    p.add_argument("--title", default=DEFAULT_TITLE, help="page title (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import json

    from retrac.bias import load_outlier_ids, measure_bias
    from retrac.data import load_dataset
    from retrac.errors import DataError
    from retrac.query.attribution import Attributor
    from retrac.report.bias import write_bias_report

    images = load_dataset(args.images)
    attributor = Attributor(
        args.index,
        store=args.store,
        query_events=_query_events(args),
        device=args.device,
        progress=not args.no_progress,
    )
    store = attributor.feature_store
    data_path = args.data or store.attrs["dataset"].get("source")
    if not data_path or not Path(data_path).exists():
        raise DataError(
            f"the store records no readable training data path ({data_path!r}); give the training images with --data."
        )
    train = load_dataset(data_path)
    if train.fingerprint != store.attrs["dataset"].get("fingerprint"):
        same_ids = "same ids but other pixels or labels" if train.ids == store.ids else "other ids"
        raise DataError(
            f"--data {data_path!r} does not hold the store's training samples ({same_ids}: fingerprint "
            f"{train.fingerprint[:16]}..., the store's {str(store.attrs['dataset'].get('fingerprint'))[:16]}...); "
            "give the data the store was featurized from."
        )
    outliers = load_outlier_ids(args.outliers) if args.outliers else []
    labels = images.labels if attributor.task.is_class_conditional else None
    measurement = measure_bias(
        attributor, images.images, args.k, outlier_ids=outliers, fraction=args.fraction, class_labels=labels
    )
    out = Path(args.out)
    queries = list(zip([str(i) for i in images.ids], images.images, strict=True))
    page = write_bias_report(out, measurement, queries, train, title=args.title)
    (out / "bias.json").write_text(json.dumps(measurement.to_dict(), indent=2))
    print(f"norm-timestep Spearman (mean over checkpoints): {measurement.norm_timestep_spearman:.3f}")
    for method, stats in measurement.topk.items():
        outlier = f", outlier share {stats.outlier_share:.3f}" if stats.num_outliers else ""
        print(
            f"{method}: {stats.unique} distinct samples in {stats.num_queries} top-{stats.k} lists, "
            f"{stats.general_influential} generally influential (>= {stats.threshold} queries){outlier}"
        )
    print(f"report: {page}")
    return 0


def _prepare(args: argparse.Namespace) -> None:
    """The checks every verb shares: ``--threads``, a torch ``--device``, a writable ``--out`` folder."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be at least 1.")
        import torch

        torch.set_num_threads(args.threads)
    if args.command in TORCH_DEVICE_COMMANDS:
        from retrac.indexer.featurize import resolve_device

        resolve_device(args.device)
    if args.command in OUT_FOLDER_COMMANDS:
        out = Path(args.out).absolute()
        existing = next(p for p in (out, *out.parents) if p.exists())  # --out itself, or its nearest parent
        if not existing.is_dir():
            raise ConfigError(
                f"--out {args.out!r}: {str(existing)!r} is an existing file; give a folder path."
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--out {args.out!r}: folder {str(existing)!r} is not writable; give a writable one."
            )


def _os_error_message(error: OSError) -> str:
    """One line for an operating-system error (a full disk, a read-only folder, a missing file)."""
    where = f" ({error.filename})" if error.filename else ""
    denied = error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    remedy = "; free some space or write to another --out, then rerun" if error.errno == errno.ENOSPC else ""
    return f"{error.strerror or error}{where}{remedy or ('; give a writable --out' if denied else '')}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Which training samples made a diffusion model's output? "
        "Diffusion-TracIn / Diffusion-ReTrac / (D-)TRAK attribution served from a FAISS index.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_index(sub)
    _add_build(sub)
    _add_query(sub)
    _add_audit(sub)
    _add_report(sub)
    add_serve_command(sub)
    add_lds_command(sub)
    add_verify_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _prepare(args)
        return int(args.func(args) or 0)
    except RetracError as exc:
        print(f"retrac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"retrac {args.command}: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
