"""The ``retrac`` command: ``demo``, ``index``, ``build``, ``query``, ``audit``, ``report``, ``serve``, ``verify``,
``lds``.

Each verb parses its options into the library's config objects and calls the Python API. One module per
verb (``retrac.cli.demo``, ...); the options every verb shares live in :mod:`retrac.cli.options`;
``serve``, ``lds`` and ``verify`` register themselves from their own packages.
"""

from __future__ import annotations

import argparse
import sys

from retrac.cli.audit import add_audit_command
from retrac.cli.build import add_build_command
from retrac.cli.demo import add_demo_command
from retrac.cli.index import add_index_command
from retrac.cli.options import os_error_message, prepare
from retrac.cli.query import add_query_command
from retrac.cli.report import add_report_command
from retrac.errors import RetracError
from retrac.lds.cli import add_lds_command
from retrac.serve.cli import add_serve_command
from retrac.verify import add_verify_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Which training samples made a diffusion model's output? "
        "Diffusion-TracIn / Diffusion-ReTrac / (D-)TRAK attribution served from a FAISS index.",
    )
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prepare(args)
        return int(args.func(args) or 0)
    except RetracError as exc:
        print(f"retrac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"retrac {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
