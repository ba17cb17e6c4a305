"""Options and checks shared by the ``retrac`` verbs: threads, devices, progress, query events, ``--out``."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from retrac.errors import ConfigError
from retrac.query.attribution import DEFAULT_QUERY_PRESET, QUERY_PRESETS, QueryEvents
from retrac.task import DEFAULT_DEVICE

TORCH_DEVICE_COMMANDS = (
    "index",
    "query",
    "audit",
    "report",
)  # their --device is a torch device
OUT_FOLDER_COMMANDS = (
    "demo",
    "build",
    "audit",
    "report",
)  # their --out is a folder they write

QUERY_PRESETS_HELP = ", ".join(
    f"{name} {t} x {m}" for name, (t, m) in QUERY_PRESETS.items()
)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy shared machine)",
    )


def add_query_event_options(p: argparse.ArgumentParser) -> None:
    """``--events`` / ``--seed`` / ``--device``: how query gradients are computed (query, report)."""
    p.add_argument(
        "--events",
        default=DEFAULT_QUERY_PRESET,
        choices=list(QUERY_PRESETS),
        help=f"query events T_q x M: {QUERY_PRESETS_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=QueryEvents.seed,
        help="seed of the query noise (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="torch device for the gradients (default: %(default)s)",
    )
    add_threads(p)


def query_events(args: argparse.Namespace) -> QueryEvents:
    return QueryEvents.preset(args.events, args.seed)


def prepare(args: argparse.Namespace) -> None:
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
        existing = next(
            p for p in (out, *out.parents) if p.exists()
        )  # --out itself, or its nearest parent
        if not existing.is_dir():
            raise ConfigError(
                f"--out {args.out!r}: {str(existing)!r} is an existing file; give a folder path."
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--out {args.out!r}: folder {str(existing)!r} is not writable; give a writable one."
            )


def os_error_message(error: OSError) -> str:
    """One line for an operating-system error (a full disk, a read-only folder, a missing file)."""
    where = f" ({error.filename})" if error.filename else ""
    denied = error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    remedy = (
        "; free some space or write to another --out, then rerun"
        if error.errno == errno.ENOSPC
        else ""
    )
    return f"{error.strerror or error}{where}{remedy or ('; give a writable --out' if denied else '')}."
