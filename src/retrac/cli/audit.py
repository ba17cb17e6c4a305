"""``retrac audit``: the memorization audit."""

from __future__ import annotations

import argparse
import json
import sys

from retrac.audit import AuditConfig
from retrac.audit.estimate import DEFAULT_AUDIT_SAMPLING_STEPS
from retrac.cli.options import (
    QUERY_PRESETS_HELP,
    add_compute_options,
    add_data_options,
    add_overwrite,
    check_pixel_range,
    indexed_store,
    load_query_images,
)
from retrac.errors import ConfigError
from retrac.query.attribution import DEFAULT_QUERY_PRESET, QUERY_PRESETS, QueryEvents
from retrac.sampling import DEFAULT_SAMPLING_SEED


def add_audit_command(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="memorization audit: pixel-space nearest training images, copy verdicts, top proponents, hot spots",
        description="For every image: its nearest training images (exact L2), the relative distance "
        "r = d1 / mean distance to the n nearest (Carlini et al. 2023), a verdict (copy / near / novel), and "
        "its top-k proponents under each index. Across images: hot spots and the self-influence ranking. "
        "Writes OUT/audit.jsonl, OUT/summary.json, OUT/self_influence.jsonl, OUT/index.html and the exact pixel "
        "index OUT/pixel-index/ (reused by a later audit into OUT with --overwrite; read by retrac serve --audit OUT).",
    )
    p.add_argument(
        "--index",
        required=True,
        action="append",
        help="an attribution index folder (repeatable, one per method)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images",
        help="images to audit: an image file, a folder of images, .npy or .npz",
    )
    source.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="sample N images from the last checkpoint",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SAMPLING_SEED,
        help="seed of --generate (default: %(default)s)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a text model's prompt (repeatable): --generate samples from the prompts in turn; with --images, "
        "one for all or one per image (default: the images' metadata.jsonl captions)",
    )
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help=f"reverse steps of --generate (default: {DEFAULT_AUDIT_SAMPLING_STEPS}, at most the scheduler's T; "
        "the time it will take is printed first)",
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
    add_data_options(p)
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
    add_compute_options(p, device_help="torch device of gradients and sampling")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the retrac.audit JSON document (as OUT/summary.json holds it) instead of a summary",
    )
    add_overwrite(p)
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
    images = None
    if args.images is not None:
        images = load_query_images(args)
        check_pixel_range(args, images, indexed_store(args.index[0]))
    summary = run_audit(
        args.index,
        args.out,
        images=images,
        generate=args.generate,
        seed=args.seed,
        sampling_steps=args.sampling_steps,
        data=args.data,
        config=config,
        query_events=QueryEvents.preset(args.query_events),
        device=args.device,
        progress=not args.no_progress,
        announce=lambda line: print(f"retrac audit: {line}", file=sys.stderr, flush=True),
        prompts=args.prompt,
    )
    if args.json:  # the retrac.audit document, as OUT/summary.json holds it
        print(json.dumps(summary))
        return 0
    counts = ", ".join(f"{v} {c}" for v, c in summary["verdict_counts"].items())
    print(f"audited {summary['num_images']} images: {counts} (copy rate {summary['copy_rate']:.3f})")
    for hot in summary["hot_spots"][:5]:
        top1 = ", ".join(f"{method} {count}" for method, count in hot["as_top1"].items()) or "no index"
        print(
            f"hot spot {hot['id']}: {hot['outputs']} outputs (nearest of {hot['as_nearest']}; top-1 under {top1})"
        )
    for name, path in summary["files"].items():
        print(f"{name + ':':<16}{path}")
    return 0
