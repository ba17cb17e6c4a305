"""``retrac index --launch N``: start N local ``--shard auto`` workers through torchrun and wait for them.

The launcher runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m retrac index
<the same options, without --launch> --shard auto`` (torchrun's own module, so nothing but torch is
needed), streams the workers' output, and exits with the first failed worker's status. Each worker gets
``cores / N`` torch threads by default (``LOCAL_WORLD_SIZE``, docs/design.md section 5), so the
store is bit-identical to a one-process run with that many threads.
"""

from __future__ import annotations

import os
import shlex
import sys

from retrac.errors import ConfigError
from retrac.indexer.workers import WORK_STEALING, available_cores

LAUNCH_OPTION = "--launch"
TORCHRUN_MODULE = "torch.distributed.run"


def _is_launch_option(token: str) -> bool:
    """``--launch``, ``--launch=N`` or an abbreviation argparse accepts for it (``--lau``, ``--launc=N``)."""
    name = token.split("=", 1)[0]
    return len(name) >= 5 and LAUNCH_OPTION.startswith(name)


def worker_arguments(argv: list[str]) -> list[str]:
    """``argv`` of ``retrac index ... --launch N`` without ``--launch N`` (spelt in full, ``--launch=N``
    or abbreviated)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif _is_launch_option(token):
            skip = "=" not in token  # "--launch N": N is the next token
        else:
            kept.append(token)
    return kept


def torchrun_command(argv: list[str], workers: int, shard: str | None) -> list[str]:
    """The torchrun command that ``retrac index ... --launch workers`` runs.

    Args:
        argv: the ``retrac`` arguments as given (``["index", ..., "--launch", "2"]``).
        workers: ``N`` of ``--launch N``.
        shard: the ``--shard`` given with it, if any (only ``auto`` is accepted).

    Raises:
        ConfigError: ``workers < 1``, a static ``--shard``, or ``--launch`` inside a torchrun worker.
    """
    if workers < 1:
        raise ConfigError(f"--launch {workers}: give the number of local workers, at least 1.")
    if shard is not None and shard != WORK_STEALING:
        raise ConfigError(
            f"--launch starts --shard auto workers itself; drop --shard {shard} (or drop --launch and "
            "start the static split by hand)."
        )
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK"):
        raise ConfigError(
            "--launch inside a torchrun worker would start workers of its own; drop --launch under torchrun."
        )
    args = worker_arguments(argv)
    if shard is None:
        args += ["--shard", WORK_STEALING]
    return [
        sys.executable,
        "-m",
        TORCHRUN_MODULE,
        "--standalone",
        "--nproc-per-node",
        str(workers),
        "-m",
        "retrac",
        *args,
    ]


def launch_workers(
    argv: list[str], workers: int, shard: str | None, out: str, threads: int | None = None
) -> int:
    """Run ``workers`` local ``retrac index`` workers under torchrun (in this process, as the ``torchrun``
    script does) and wait for them.

    Returns:
        0 when every worker succeeded; else the first failed worker's exit status (2 for bad input,
        128 + the signal for a killed one), after one line naming it (its own message is above).

    Raises:
        ConfigError: see :func:`torchrun_command`; a ``memory://`` store (each worker process would
            fill its own).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if str(out).startswith("memory://"):
        raise ConfigError(
            f"--out {out}: a memory:// store lives in one process; --launch workers are separate processes, "
            "so give a folder or an s3:// / gs:// / file:// URL."
        )
    command = torchrun_command(argv, workers, shard)
    # OpenMP threads of each worker as its torch threads (torchrun would set 1, with a warning)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, available_cores() // workers)))
    print(f"retrac index: launching {workers} workers: {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        torchrun.run(torchrun.parse_args(command[3:]))  # what `python -m torch.distributed.run ...` runs
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(
            f"retrac index: error: worker {rank} of {workers} exited with status {failure.exitcode}; its message is "
            "above (fix what it names and rerun the same command: published shards are kept).",
            file=sys.stderr,
        )
        return status
    except SignalException as signalled:  # the launcher was stopped; torchrun stopped its workers
        return 128 + int(signalled.sigval)
    return 0
