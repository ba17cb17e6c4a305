"""Options and checks shared by the ``retrac`` verbs: one vocabulary for every verb that computes.

* ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` everywhere (``auto`` = ``cuda`` when
  torch sees a GPU, else ``cpu``; for ``build``'s FAISS search, ``auto`` uses a GPU when faiss-gpu
  sees one); ``--threads N``; ``--no-progress``.
* ``--events`` is always a *training* event schedule (``retrac index``); the query events preset is
  ``--query-events`` on every verb that computes query gradients (``query``, ``report``, ``audit``,
  ``serve``, ``lds``). Old spellings stay accepted as deprecated aliases that print a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from pathlib import Path

from retrac.errors import ConfigError
from retrac.query.attribution import DEFAULT_QUERY_PRESET, QUERY_PRESETS, QueryEvents
from retrac.task import DEFAULT_DEVICE

OUT_FOLDER_COMMANDS = ("demo", "build", "audit", "report")  # their --out is a folder they write
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
QUERY_PRESETS_HELP = ", ".join(f"{name} {t} x {m}" for name, (t, m) in QUERY_PRESETS.items())


def warn_deprecated(old: str, new: str, why: str = "") -> None:
    """One line on stderr: ``old`` still works, ``new`` is the name to use."""
    print(f"retrac: warning: {old} is deprecated{why}; use {new}.", file=sys.stderr)


class DeprecatedOption(argparse.Action):
    """An old option spelling: stores into the new option's ``dest`` and prints a deprecation warning."""

    def __init__(self, option_strings, dest, replacement: str, why: str = "", **kwargs) -> None:
        self.replacement, self.why = replacement, why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_deprecated(option_string, self.replacement, self.why)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(
    p: argparse.ArgumentParser, old: str, new: str, dest: str, why: str = "", **kwargs
) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same ``dest``, same checks) that warns when used."""
    p.add_argument(
        old, dest=dest, action=DeprecatedOption, replacement=new, why=why, help=argparse.SUPPRESS, **kwargs
    )


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an existing, non-empty ``--out`` (refused without it)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --out (the new folder takes its place in one step when complete)",
    )


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy shared machine)",
    )


def add_compute_options(
    p: argparse.ArgumentParser,
    device_default: str = DEFAULT_DEVICE,
    device_help: str = "torch device of the gradients",
    device_for: str = "torch",
    progress: bool = True,
) -> None:
    """``--device`` / ``--threads`` / ``--no-progress``, the same on every verb that computes.

    ``device_for`` is ``"torch"`` or ``"faiss"`` (``build``: cuda / cuda:N mean faiss-gpu);
    ``progress=False`` leaves out ``--no-progress`` on a verb that draws no bars (``serve``).
    """
    p.add_argument(
        "--device",
        default=device_default,
        metavar="DEVICE",
        help=f"{device_help}: {DEVICE_NAMES} (default: %(default)s)",
    )
    add_threads(p)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(device_for=device_for)


def add_query_event_options(p: argparse.ArgumentParser) -> None:
    """``--query-events`` / ``--seed``: the query events preset and the seed of the query noise."""
    p.add_argument(
        "--query-events",
        default=DEFAULT_QUERY_PRESET,
        choices=list(QUERY_PRESETS),
        help=f"query events T_q x M: {QUERY_PRESETS_HELP} (default: %(default)s)",
    )
    add_deprecated_alias(
        p,
        "--events",
        "--query-events",
        "query_events",
        why=" for the query preset (--events is retrac index's training schedule)",
        choices=list(QUERY_PRESETS),
    )
    p.add_argument(
        "--seed", type=int, default=QueryEvents.seed, help="seed of the query noise (default: %(default)s)"
    )


def add_location_overrides(p: argparse.ArgumentParser) -> None:
    """``--store`` / ``--checkpoint``: where a moved store and its checkpoints are now (query, report)."""
    p.add_argument(
        "--store",
        default=None,
        help="the feature store (default: the one the index records, found relative to the index after a "
        "move; its fingerprint is checked)",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        metavar="PATH",
        help="where the store's checkpoints are now, once per checkpoint in training order (default: the "
        "recorded paths, or where moving the folder tree put them; each checked by sha256)",
    )
    p.add_argument(
        "--search-path",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder searched (4 levels deep) for the store or a checkpoint not found where recorded: "
        "only the store of the recorded fingerprint, a checkpoint of the recorded sha256 is taken (repeatable)",
    )


def add_data_options(p: argparse.ArgumentParser, what: str = "--images") -> None:
    """``--pixel-range`` and ``--labels``: how the values and labels of ``what`` are read."""
    # let "--pixel-range -1,1" through: argparse takes only plain negative numbers for values, not "-1,1"
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-?[\d.]+,-?[\d.]+$")
    p.add_argument(
        "--pixel-range",
        default=None,
        metavar="LO,HI",
        help=f"the value range of {what}, mapped to the model's [-1, 1]: -1,1 (floats, default), 0,1 (torchvision's "
        "ToTensor), 0,255 (floats holding 8-bit values); 8-bit files are always 0,255",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help=f"class labels of {what} for a class-conditional model: .npy (N,) integers, .txt one a line, or "
        ".json (a list or {id: label}); default: the data's own (.npz labels, folder/CLASS/ subfolders)",
    )


def load_query_images(args: argparse.Namespace):
    """``--images`` read with ``--pixel-range`` / ``--labels``."""
    from retrac.data import load_dataset

    return load_dataset(args.images, pixel_range=args.pixel_range, labels=args.labels)


def check_pixel_range(args: argparse.Namespace, images, store) -> None:
    """Refuse float query images read with the default range when the store's float training data was read
    with another (``--pixel-range 0,1`` at indexing): the two would be mapped to [-1, 1] differently."""
    recorded = store.attrs.get("dataset", {})
    trained = recorded.get("pixel_range")
    both_float = _is_float(recorded.get("pixel_dtype")) and _is_float(images.pixel_dtype)
    if trained and both_float and args.pixel_range is None and tuple(trained) != tuple(images.pixel_range):
        lo, hi = (f"{v:g}" for v in trained)
        raise ConfigError(
            f"the store's training images (floats) were read with --pixel-range {lo},{hi}, the query images "
            f"{args.images!r} (floats) with the default -1,1: give --pixel-range {lo},{hi} if they follow the "
            "training data's convention (or --pixel-range -1,1 if they really lie in [-1, 1])."
        )


def indexed_store(index: str):
    """The feature store an index folder records (found as ``Attributor`` finds it after a move)."""
    from retrac.indexer.store import FeatureStore
    from retrac.query.index.persist import read_manifest
    from retrac.relocate import recorded_path

    recorded = read_manifest(index)["store"]
    return FeatureStore.open(recorded_path(recorded["path"], recorded.get("relative_path"), index))


def _is_float(dtype: str | None) -> bool:
    return bool(dtype) and dtype.startswith("float")


def query_events(args: argparse.Namespace) -> QueryEvents:
    return QueryEvents.preset(args.query_events, args.seed)


def open_attributor(args: argparse.Namespace, quiet: bool = False):
    """The ``Attributor`` over ``--index`` with ``--store``, ``--checkpoint``, ``--search-path``,
    ``--query-events``, ``--device``;
    progress bars unless ``--no-progress`` or ``quiet`` (e.g. ``--json``, whose stdout is the document)."""
    from retrac.query.attribution import Attributor

    return Attributor(
        args.index,
        store=args.store,
        checkpoints=args.checkpoint,
        search_path=args.search_path,
        query_events=query_events(args),
        device=args.device,
        progress=not (quiet or args.no_progress),
    )


def resolve_cli_device(device: str, device_for: str = "torch") -> str:
    """``--device`` checked against this machine: a torch device name, or a FAISS one for ``build``.

    Raises:
        ConfigError: an unknown name, or a GPU this machine (or its torch / faiss build) does not have.
    """
    import torch

    name = str(device).strip().lower()
    if name == "gpu":  # build's old spelling
        warn_deprecated("--device gpu", "--device cuda")
        name = "cuda"
    if device_for == "faiss":
        if name in ("auto", "cpu"):
            return name
        if name == "cuda" or name.startswith("cuda:"):
            import faiss

            from retrac.query.index.checks import _gpu_available

            if not _gpu_available():
                raise ConfigError(
                    f"--device {device!r}: the installed faiss ({faiss.__version__}) has no GPU support or sees "
                    "no GPU; install faiss-gpu (pip install 'retrac[gpu]') on a machine with a CUDA GPU, or use "
                    "--device cpu (or auto)."
                )
            return "gpu"
        if name == "mps":
            raise ConfigError("--device mps: FAISS has no MPS support; use --device cpu for the search.")
        raise ConfigError(f"--device {device!r} is not a search device; give {DEVICE_NAMES}.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.backends.cuda.is_built():
        raise ConfigError(
            f"--device {device!r}: this torch ({torch.__version__}) is a CPU-only build; install a CUDA "
            "build of torch (see the README's GPU section) or use --device cpu."
        )
    from retrac.indexer.featurize import resolve_device

    resolve_device(name)  # a torch device name this machine has (clear message otherwise)
    return name


def end_progress_bars() -> None:
    """Close every live tqdm bar so that a following message starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar half torn down by the error itself
            bar.close()


def prepare(args: argparse.Namespace) -> None:
    """The checks every verb shares: ``--threads``, ``--device``, a writable ``--out`` folder."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} must be at least 1.")
        import torch

        torch.set_num_threads(args.threads)
        if getattr(args, "device_for", None) == "faiss":
            import faiss

            faiss.omp_set_num_threads(args.threads)
    if getattr(args, "device", None) is not None:
        args.device = resolve_cli_device(args.device, getattr(args, "device_for", "torch"))
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
        if existing == out and any(out.iterdir()) and not getattr(args, "overwrite", False):
            raise ConfigError(
                f"--out {args.out!r} exists and is not empty; give --overwrite to replace it (the new folder "
                "takes its place when complete), or another --out."
            )


def os_error_message(error: OSError) -> str:
    """One line for an operating-system error (a full disk, a read-only folder, a missing file)."""
    where = f" ({error.filename})" if error.filename else ""
    denied = error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    remedy = "; free some space or write to another --out, then rerun" if error.errno == errno.ENOSPC else ""
    return f"{error.strerror or error}{where}{remedy or ('; give a writable --out' if denied else '')}."
