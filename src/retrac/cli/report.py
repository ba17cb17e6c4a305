"""``retrac report``: the timestep-induced bias page."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrac._io import atomic_write_text, publish_directory
from retrac.bias import DEFAULT_FRACTION, DEFAULT_MIN_QUERIES
from retrac.cli.options import (
    add_compute_options,
    add_data_options,
    add_location_overrides,
    add_overwrite,
    add_query_event_options,
    check_pixel_range,
    load_query_images,
    open_attributor,
)
from retrac.cli.steps import add_prompt_option, query_prompts
from retrac.query.attribution import DEFAULT_TOP_K
from retrac.report.bias import DEFAULT_TITLE


def add_report_command(sub) -> None:
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
        "--index",
        required=True,
        action="append",
        help="an index folder (repeatable, one per method)",
    )
    p.add_argument(
        "--images",
        required=True,
        help="query images: an image file, a folder of images, .npy or .npz",
    )
    add_data_options(p)
    add_prompt_option(p)
    add_location_overrides(p)
    p.add_argument(
        "--data",
        default=None,
        help="the training images, for thumbnails (default: the store's recorded data path)",
    )
    p.add_argument("--out", default="retrac-report", help="output folder (default: %(default)s)")
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULT_TOP_K,
        help="top-k proponents per query (default: %(default)s)",
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
    add_query_event_options(p)
    p.add_argument("--title", default=DEFAULT_TITLE, help="page title (default: %(default)s)")
    add_compute_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the retrac.report JSON document (as OUT/bias.json holds it) instead of a summary",
    )
    add_overwrite(p)
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import json

    from retrac.audit.training import load_recorded_data
    from retrac.bias import load_outlier_ids, measure_bias
    from retrac.errors import DataError
    from retrac.report.bias import write_bias_report

    images = load_query_images(args)
    attributor = open_attributor(args)
    store = attributor.feature_store
    check_pixel_range(args, images, store)
    data_path = args.data or attributor.training_data_path  # the recorded data, moved as the store moved
    data_path = None if data_path is None else str(data_path)
    if not data_path or not Path(data_path).exists():
        raise DataError(
            f"the store records no readable training data path ({data_path!r}); give the training images with --data."
        )
    train = load_recorded_data(data_path, store.attrs["dataset"])  # with the recorded pixel range and labels
    if train.fingerprint != store.attrs["dataset"].get("fingerprint"):
        same_ids = "same ids but other pixels or labels" if train.ids == store.ids else "the ids differ"
        raise DataError(
            f"--data {data_path!r} does not hold the store's training samples ({same_ids}: fingerprint "
            f"{train.fingerprint[:16]}..., the store's {str(store.attrs['dataset'].get('fingerprint'))[:16]}...); "
            "give the data the store was featurized from."
        )
    outliers = load_outlier_ids(args.outliers) if args.outliers else []
    labels = images.labels if attributor.task.is_class_conditional else None
    prompts = query_prompts(args.prompt, images, attributor.task)
    measurement = measure_bias(
        attributor,
        images.images,
        args.k,
        outlier_ids=outliers,
        fraction=args.fraction,
        class_labels=labels,
        prompts=prompts,
    )
    out = Path(args.out)
    queries = list(zip([str(i) for i in images.ids], images.images, strict=True))
    document = measurement.to_dict()  # the retrac.report document (docs/design.md section 10)
    with publish_directory(out) as staging:  # the whole folder appears, or the old one stays
        page = out / write_bias_report(staging, measurement, queries, train, title=args.title).relative_to(
            staging
        )
        atomic_write_text(staging / "bias.json", json.dumps(document, indent=2))
    if args.json:
        print(json.dumps(document))
        return 0
    print(f"norm-timestep Spearman (mean over checkpoints): {measurement.norm_timestep_spearman:.3f}")
    for method, stats in measurement.topk.items():
        outlier = f", outlier share {stats.outlier_share:.3f}" if stats.num_outliers else ""
        print(
            f"{method}: {stats.unique} distinct samples in {stats.num_queries} top-{stats.k} lists, "
            f"{stats.general_influential} generally influential (>= {stats.threshold} queries){outlier}"
        )
    print(f"report: {page}")
    return 0
