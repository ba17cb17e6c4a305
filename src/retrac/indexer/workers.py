"""Who computes which shards, and with how many threads (docs/design.md section 5).

``--shard`` says how a featurization is split between processes:

* none: this process computes every shard;
* ``I/N``: a static split, shards ``s`` with ``s % N == I`` (processes started by hand);
* ``slurm``: ``I/N`` from a SLURM job array (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of
  ``SLURM_ARRAY_TASK_COUNT``);
* ``auto``: work stealing (:mod:`retrac.indexer.claims`): every worker claims unfinished shards until
  none is left, so workers may be started, killed and restarted at will (torchrun, SLURM, by hand).

Threads: each worker on a machine gets ``cores / local_world_size`` torch threads by default, where
``cores`` is the CPUs this process may run on and ``local_world_size`` the workers sharing them:
``LOCAL_WORLD_SIZE`` under torchrun, ``N`` of a static ``I/N`` split started by hand (not under
SLURM, whose tasks have their own CPUs), else 1. ``--threads`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from retrac.errors import ConfigError

WORK_STEALING = "auto"
SLURM_SHARD = "slurm"


@dataclass(frozen=True)
class ShardPlan:
    """How this process takes part in a featurization.

    Attributes:
        mode: ``"all"`` (every shard), ``"static"`` (shards ``s % count == index``) or ``"claims"``
            (work stealing).
        index, count: the static split (``0, 1`` otherwise).
    """

    mode: str
    index: int = 0
    count: int = 1

    def owns(self, shard: int) -> bool:
        """Whether a static split gives shard ``shard`` to this process (always, in the other modes)."""
        return self.mode != "static" or shard % self.count == self.index


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (or ``(I, N)``) -> ``(I, N)`` with ``0 <= I < N``; ``None`` -> ``(0, 1)``.

    ``"slurm"`` reads the SLURM job array's ``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_MIN`` and
    ``SLURM_ARRAY_TASK_COUNT``. (``"auto"``, work stealing, is no static split: see :func:`plan_shards`.)

    Raises:
        ConfigError: not of the form ``I/N``, ``I`` outside ``[0, N)``, ``slurm`` outside a job array.
    """
    if spec is None:
        return 0, 1
    if spec == WORK_STEALING:
        raise ConfigError("--shard auto is work stealing, not a static I/N split; use plan_shards('auto').")
    if spec == SLURM_SHARD:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        if any(name not in os.environ for name in names):
            raise ConfigError(
                "--shard slurm reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set; submit "
                "with sbatch --array, or give --shard I/N or --shard auto."
            )
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        spec = f"{int(os.environ['SLURM_ARRAY_TASK_ID']) - first}/{os.environ['SLURM_ARRAY_TASK_COUNT']}"
    if isinstance(spec, str):
        index, sep, count = spec.partition("/")
        try:
            if not sep:
                raise ValueError
            spec = (int(index), int(count))
        except ValueError:
            raise ConfigError(
                f"--shard {spec!r} is not I/N; e.g. --shard 0/4 for the first of 4 processes, or --shard auto."
            ) from None
    index, count = int(spec[0]), int(spec[1])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"--shard {index}/{count} is out of range; I must lie in [0, N) with N >= 1, e.g. 0/{max(count, 1)}."
        )
    return index, count


def plan_shards(spec: str | tuple[int, int] | None) -> ShardPlan:
    """The :class:`ShardPlan` of ``--shard`` (``None``, ``I/N``, ``(I, N)``, ``slurm`` or ``auto``)."""
    if spec is None:
        return ShardPlan("all")
    if spec == WORK_STEALING:
        return ShardPlan("claims")
    index, count = parse_shard(spec)
    return ShardPlan("static", index, count) if count > 1 else ShardPlan("all")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which cgroups and SLURM set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def local_world_size(spec: str | tuple[int, int] | None = None) -> int:
    """Workers sharing this machine's CPUs: ``LOCAL_WORLD_SIZE`` (torchrun), else ``N`` of a static
    ``I/N`` split started by hand (not under SLURM), else 1."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if spec in (None, WORK_STEALING, SLURM_SHARD) or "SLURM_JOB_ID" in os.environ:
        return 1
    return parse_shard(spec)[1]


def default_threads(spec: str | tuple[int, int] | None = None) -> int:
    """Torch threads per worker by default: ``max(1, cores // local_world_size)``."""
    return max(1, available_cores() // local_world_size(spec))


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5T"`` or a number of bytes -> bytes (binary units; a trailing ``B`` is allowed).

    Raises:
        ConfigError: not a positive size.
    """
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in SIZE_UNITS else ""
    try:
        size = int(float(value[: len(value) - len(unit)]) * SIZE_UNITS[unit])
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"size {text!r} is not a positive size; give e.g. 8G, 512M or a number of bytes.")
    return size
