"""``retrac query``: top-k training samples of query images."""

from __future__ import annotations

import argparse

from retrac.cli.options import (
    add_compute_options,
    add_data_options,
    add_location_overrides,
    add_query_event_options,
    check_pixel_range,
    load_query_images,
    open_attributor,
)
from retrac.cli.steps import add_prompt_options, query_prompts, run_step_query
from retrac.query.attribution import DEFAULT_TOP_K


def add_query_command(sub) -> None:
    p = sub.add_parser(
        "query",
        help="top-k training samples of query images from one or more indexes",
        description="Score I(z, z') = sum_k w_k <u_k(z), q_k(z')>: positive = proponent (a step on z lowers the "
        "loss on z'), negative = opponent.",
    )
    p.add_argument(
        "--index",
        required=True,
        action="append",
        help="an index folder (repeatable, one per method); the parts of an index (retrac build --part I/N), "
        "a folder of parts, or part server URLs (http://HOST:PORT, retrac serve --search-only) are merged per method",
    )
    p.add_argument(
        "--images",
        default=None,
        help="query images: an image file, a folder of images, .npy or .npz (required unless --query-steps)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULT_TOP_K,
        help="results per query (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="which loaded index to use (default: the only one, or all)",
    )
    p.add_argument(
        "--opponents",
        action="store_true",
        help="the most negative scores instead of the most positive",
    )
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="R",
        help="re-score the index's top R candidates exactly against the store's vectors (exact scores; "
        "recall as the candidates allow; e.g. 100 for an IVF-SQ8 or on-disk index)",
    )
    add_prompt_options(p)
    add_data_options(p)
    add_location_overrides(p)
    add_query_event_options(p)
    add_compute_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the retrac.query JSON document (schema_version, query_ids, results by method) instead of a table",
    )
    p.set_defaults(func=_run_query)


def _run_query(args: argparse.Namespace) -> int:
    import json
    import sys

    from retrac.errors import ConfigError
    from retrac.schema import query_document, typed_ids

    if args.query_steps is not None:
        return run_step_query(args)
    if args.images is None:
        raise ConfigError(
            "give query images with --images (or --query-steps with --prompt to attribute a generated one)."
        )
    images = load_query_images(args)
    attributor = open_attributor(args, quiet=args.json)
    check_pixel_range(args, images, attributor.feature_store)
    labels = images.labels if attributor.task.is_class_conditional else None
    methods = [args.method] if args.method else attributor.methods
    query_ids = typed_ids(images.ids, images.source)
    prompts = query_prompts(args.prompt, images, attributor.task)  # --prompt, else metadata.jsonl captions
    results = {
        m: attributor.attribute(
            images.images,
            args.k,
            m,
            args.opponents,
            labels,
            query_ids=query_ids,
            rerank=args.rerank,
            prompts=prompts,
            input_space=args.input_space,
        )
        for m in methods
    }
    for method, result in results.items():  # an approximate index that could not fill k by itself
        if result.search_note:
            print(f"retrac query: warning: {method} index: {result.search_note}", file=sys.stderr)
    if args.json:  # the retrac.query document (docs/design.md section 10), for one index or several
        print(json.dumps(query_document(results.values()), allow_nan=False))  # strict JSON: never NaN
        return 0
    kind = "opponents" if args.opponents else "proponents"
    for method, result in results.items():
        print(f"{method}: top {args.k} {kind} (score = sum_k w_k <u_k, q_k>; positive = proponent)")
        for q, query_id in enumerate(images.ids):
            pairs = ", ".join(f"{i} ({s:.4g})" for i, s in zip(result.ids[q], result.scores[q], strict=True))
            print(f"  {query_id}: {pairs}")
    return 0
