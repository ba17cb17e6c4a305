"""``retrac build``: a FAISS index of one method over a feature store."""

from __future__ import annotations

import argparse

from retrac.cli.options import add_compute_options, add_deprecated_alias, add_overwrite
from retrac.indexer.workers import parse_size
from retrac.query.attribution import DEFAULT_INDEX_KIND, DEFAULT_SEARCH_DEVICE
from retrac.query.index import AUTO_FLAT_MAX_ROWS
from retrac.query.vectors import DEFAULT_KERNEL_C, DEFAULT_METHOD, DEFAULT_SQNORM_METHOD, METHOD_NAMES


def add_build_command(sub) -> None:
    p = sub.add_parser(
        "build",
        help="build a FAISS inner-product index of one method over a feature store",
        description="Aggregate the store's features into train vectors U(z) = concat_k(w_k u_k(z)) of a "
        "method (tracin: mean of phi; retrac: mean of phi / n_k, the paper's Diffusion-ReTrac; retrac+kernel: "
        "retrac with the TRAK kernel folded into queries; trak / dtrak: tracin with the kernel, dtrak on a "
        "sqnorm store; the default is chosen by measured LDS) and index them for inner-product search.",
    )
    p.add_argument("--store", required=True, help="a complete feature store (from `retrac index`)")
    p.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,
        help=f"default: {DEFAULT_SQNORM_METHOD} on a store indexed with --objective sqnorm, else {DEFAULT_METHOD} "
        "(the best measured linear datamodeling scores; README, 'Attribution quality')",
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
        "--kind",
        default=DEFAULT_INDEX_KIND,
        help=f"index kind: auto (Flat up to {AUTO_FLAT_MAX_ROWS:,} rows, IVF above), flat, ivf, hnsw or a FAISS "
        "factory string (default: %(default)s)",
    )
    add_deprecated_alias(
        p, "--index", "--kind", "kind", why=" for the index kind (--index names an index folder)"
    )
    p.add_argument("--out", required=True, help="the index folder")
    p.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="index only the I-th (from 0) of N contiguous row ranges of the store, for an index split over "
        "machines: build every I of 0..N-1 (e.g. --out index/part-I) and give the parts (or their folder, or "
        "their `retrac serve --search-only` URLs) to retrac query; results name store rows either way",
    )
    p.add_argument(
        "--max-memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="RAM the index may hold, e.g. 8G or 512M: auto picks what fits, and IVF lists beyond it go to "
        "disk (index.ivfdata, memory-mapped at query) (default: half the machine's RAM)",
    )
    p.add_argument(
        "--rerank-vectors",
        action="store_true",
        help="also keep the exact train vectors in the index folder (vectors.npy, 4 x rows x dims bytes): "
        "retrac query --rerank then reads only its candidates' rows, not whole store shards",
    )
    add_compute_options(
        p,
        device_default=DEFAULT_SEARCH_DEVICE,
        device_help="FAISS device of the build and its recall calibration (cuda: faiss-gpu)",
        device_for="faiss",
    )
    add_overwrite(p)
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from retrac.query.attribution import build_attribution_index

    built = build_attribution_index(
        args.store,
        args.out,
        args.method,
        kernel=args.kernel,
        index=args.kind,
        device=args.device,
        progress=not args.no_progress,
        max_memory=args.max_memory,
        part=args.part,
        rerank_vectors=args.rerank_vectors,
    )
    recall = f", recall@10 vs flat {built.recall['recall_at_10']:.3f}" if built.recall else ""
    on_disk = ", inverted lists on disk (index.ivfdata)" if built.build_params.get("on_disk") else ""
    on_disk += ", exact vectors for re-ranking (vectors.npy)" if args.rerank_vectors else ""
    part = ""
    if args.part is not None:
        from retrac.query.index import read_manifest
        from retrac.query.partition import IndexPart

        part = f" ({IndexPart.from_manifest(read_manifest(args.out)).label} of the store)"
    print(
        f"index {args.out}{part}: {built.num_vectors} vectors x {built.dim} dims, {built.factory}{recall}{on_disk}"
    )
    return 0
