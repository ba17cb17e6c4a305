"""``retrac serve``: the subcommand's options and its run function (fastapi is imported only to run)."""

from __future__ import annotations

import argparse

from retrac.cli.options import add_compute_options, add_query_event_options, query_events
from retrac.errors import ConfigError
from retrac.serve.config import ServeConfig


def add_serve_command(sub) -> None:
    """Add ``retrac serve`` to the ``retrac`` subcommands."""
    defaults = ServeConfig()
    p = sub.add_parser(
        "serve",
        help="an HTTP service and web page over indexes loaded once: POST /attribute, POST /audit, GET /samples/ID",
        description="Load the model, checkpoints and indexes once and answer attribution queries over HTTP "
        "(JSON API documented at /docs) with a web page at /. Query gradients of concurrent requests are "
        "batched; searches run off the event loop; requests are bounded in size, images and k. Nothing is "
        "written to the store or the indexes.",
    )
    p.add_argument(
        "--index",
        required=True,
        action="append",
        help="an index folder (repeatable, one per method); the parts of an index (retrac build --part), a "
        "folder of parts, or part server URLs (http://HOST:PORT) are merged per method",
    )
    p.add_argument(
        "--search-only",
        action="store_true",
        help="serve index parts to a front (retrac query --index http://HOST:PORT): GET /parts and POST /search "
        "of query vectors only; loads the parts and the store, no model, checkpoint or training image",
    )
    p.add_argument(
        "--store",
        default=None,
        help="the feature store (default: the one the index records; its fingerprint is checked)",
    )
    p.add_argument(
        "--audit",
        default=None,
        metavar="DIR|memory",
        help="enable POST /audit: a `retrac audit` output folder or its pixel index folder (read only), or "
        "'memory' to build the exact pixel index in memory",
    )
    p.add_argument(
        "--data",
        default=None,
        help="the training data, for thumbnails and the audit (default: the store's recorded source; fingerprint checked)",
    )
    p.add_argument(
        "--examples",
        action="append",
        default=[],
        metavar="PATH",
        help="images the page offers to pick: .npz, .npy or a folder (repeatable; first --max-examples of each)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    add_query_event_options(p)  # --query-events, --seed
    add_compute_options(p, device_help="torch device of the query gradients", progress=False)
    p.add_argument(
        "--max-k", type=int, default=defaults.max_k, help="largest k a request may ask (default: %(default)s)"
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=defaults.max_images,
        help="images per request (default: %(default)s)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_bytes / 2**20,
        help="largest request body in MiB (default: %(default)s)",
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=defaults.max_image_side,
        help="largest decoded image width / height (default: %(default)s)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=defaults.batch_window_ms,
        help="wait this long for concurrent requests to join a gradient batch (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch_images,
        help="images per gradient batch (default: %(default)s)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=defaults.max_pending_images,
        help="images allowed to wait for gradients; more get 503 + Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--cache-queries",
        type=int,
        default=defaults.cache_queries,
        help="query vectors kept by image digest, 0 = none (default: %(default)s)",
    )
    p.add_argument(
        "--history",
        type=int,
        default=defaults.history_queries,
        help="answered queries kept in memory for a sample's most influenced queries (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: %(default)s)",
    )
    p.set_defaults(func=run_serve_command)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    if not 0 < args.max_upload_mb <= 1024:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb} must lie in (0, 1024].")
    return ServeConfig(
        max_k=args.max_k,
        max_images=args.max_images,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_image_side=args.max_image_side,
        batch_window_ms=args.batch_window_ms,
        max_batch_images=args.max_batch,
        max_pending_images=args.max_pending,
        cache_queries=args.cache_queries,
        history_queries=args.history,
    )


def run_serve_command(args: argparse.Namespace) -> int:
    from retrac.serve.app import run_server
    from retrac.serve.service import AttributionService

    # --threads and --device were checked and applied by retrac.cli.options.prepare
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} must lie in [0, 65535].")
    config = serve_config(args)
    if args.search_only:
        return _run_part_server(args, config)
    service = AttributionService.load(
        args.index,
        audit=args.audit,
        data=args.data,
        examples=args.examples,
        query_events=query_events(args),
        device=args.device,
        config=config,
        store=args.store,
    )
    print(
        f"retrac serve: {', '.join(service.methods)} over {service.num_samples} training samples; "
        f"page and API on http://{args.host}:{args.port}/ (API docs at /docs)",
        flush=True,
    )
    try:
        run_server(service, args.host, args.port, args.log_level)
    finally:
        service.close()
    return 0


def _run_part_server(args: argparse.Namespace, config: ServeConfig) -> int:
    from retrac.serve.parts import PartService, run_part_server

    extra = [name for name in ("audit", "data") if getattr(args, name)] + (
        ["examples"] if args.examples else []
    )
    if extra:
        raise ConfigError(
            f"--search-only serves searches of query vectors only; drop --{' --'.join(extra)} (a front "
            "`retrac serve --index URL ...` can offer them)."
        )
    service = PartService.load(args.index, store=args.store, config=config)
    held = ", ".join(f"{name} {part.part.label}" for name, (_, _, part) in service.parts.items())
    print(
        f"retrac serve: index parts {held}; POST /search and GET /parts on http://{args.host}:{args.port}/",
        flush=True,
    )
    run_part_server(service, args.host, args.port, args.log_level)
    return 0


def serve_command_line(indexes, examples=(), audit: str | None = None, port: int = 8000) -> str:
    """The ``retrac serve`` command that serves ``indexes`` (printed by ``retrac demo``)."""
    import shlex

    parts = ["retrac", "serve"]
    for index in indexes:
        parts += ["--index", str(index)]
    for example in examples:
        parts += ["--examples", str(example)]
    if audit:
        parts += ["--audit", str(audit)]
    if port != 8000:
        parts += ["--port", str(port)]
    return shlex.join(parts)
