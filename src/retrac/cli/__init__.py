"""The ``retrac`` command: ``demo``, ``index``, ``build``, ``query``, ``audit``, ``report``, ``serve``, ``lds``,
``verify``.

Each verb parses its options into the library's config objects and calls the Python API. One module per
verb (``retrac.cli.demo``, ...); the options every verb shares live in :mod:`retrac.cli.options`;
``serve``, ``lds`` and ``verify`` register themselves from their own packages. The verb modules are
imported inside :func:`build_parser`, so ``retrac.cli.options`` can be imported from anywhere.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrac")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from retrac import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from retrac.cli.audit import add_audit_command
    from retrac.cli.build import add_build_command
    from retrac.cli.demo import add_demo_command
    from retrac.cli.index import add_index_command
    from retrac.cli.query import add_query_command
    from retrac.cli.report import add_report_command
    from retrac.lds.cli import add_lds_command
    from retrac.serve.cli import add_serve_command
    from retrac.verify import add_verify_command

    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Which training samples made a diffusion model's output? "
        "Diffusion-TracIn / Diffusion-ReTrac / (D-)TRAK attribution served from a FAISS index.",
    )
    parser.add_argument("--version", action="version", version=f"retrac {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_command(sub)
    add_index_command(sub)
    add_build_command(sub)
    add_query_command(sub)
    add_audit_command(sub)
    add_report_command(sub)
    add_serve_command(sub)
    add_lds_command(sub)
    add_verify_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from retrac.cli.options import end_progress_bars, os_error_message, prepare
    from retrac.errors import RetracError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(
        sys.argv[1:] if argv is None else argv
    )  # as given (retrac index --launch passes them on)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            prepare(args)
            return int(args.func(args) or 0)
    except RetracError as exc:
        end_progress_bars()  # the message starts on its own line, not after a half-drawn bar
        print(f"retrac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        end_progress_bars()
        print(f"retrac {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2


def _warning_printer(command: str, fallback):
    """retrac's own warnings as one line, ``retrac VERB: warning: ...``, above any progress bar."""
    package = str(Path(__file__).resolve().parents[1])

    def show(message, category, filename, lineno, file=None, line=None):
        if not str(filename).startswith(package):
            return fallback(message, category, filename, lineno, file, line)
        from tqdm import tqdm

        tqdm.write(f"retrac {command}: warning: {message}", file=sys.stderr)

    return show
