"""Kill a writer at each of its write points, as ``kill -9`` would: the helper of ``test_publish.py``.

Run as a script in a fresh interpreter (so no OpenMP pool exists before it forks)::

    python tests/kill_points.py WRITER ARGS_JSON TEMPLATE WORK

``WRITER`` names a function of :data:`WRITERS` (``ARGS_JSON`` its keyword arguments). ``TEMPLATE`` is
the folder as it is before the write (copied for every run) and ``WORK`` a folder for the runs. The
script first runs the writer once in a forked child that only counts its write points (every call
that changes the disk: ``open`` for writing, ``os.replace`` / ``rename`` / ``mkdir`` / ``unlink`` /
``rmdir``, ``shutil.rmtree``, ``faiss.write_index``, ``numpy.savez``, the atomic folder exchange),
then, for each point ``n``, forks a child that writes into a fresh copy of ``TEMPLATE`` and calls
``os._exit(137)`` just before point ``n`` (nothing is flushed or cleaned up, as with ``kill -9``).
Run ``n`` leaves its folder at ``WORK/run-n/target``; a last run ``WORK/run-done`` is not killed.
Prints one JSON object: ``{"points": [labels]}``.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
from pathlib import Path


def _build_index(target: str, store: str, method: str) -> None:
    from retrac.query.attribution import build_attribution_index

    build_attribution_index(store, target, method, index="flat", progress=False)


def _audit(target: str, index: str, images: str) -> None:
    from retrac.audit import AuditConfig, run_audit
    from retrac.query.attribution import QueryEvents

    config = AuditConfig(k=2, num_neighbours=3)
    run_audit(index, target, images=images, config=config, query_events=QueryEvents(1, 1), progress=False)


WRITERS = {"build_index": _build_index, "audit": _audit}


def _instrument(on_point) -> None:
    """Route every disk-changing call through ``on_point(label)`` before it runs."""
    import faiss
    import numpy as np

    import retrac._io as retrac_io

    def wrap(owner, name, label_of):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            label = label_of(*args, **kwargs)
            if label is not None:
                on_point(f"{name} {label}")
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def path_label(*args, **kwargs):
        return Path(str(args[0])).name if args else ""

    def open_label(file, mode="r", *args, **kwargs):
        if isinstance(file, int) or not any(flag in mode for flag in "wax+"):
            return None
        return Path(str(file)).name

    for name in ("replace", "rename", "mkdir", "unlink", "rmdir"):
        wrap(os, name, path_label)
    wrap(shutil, "rmtree", path_label)
    wrap(builtins, "open", open_label)
    io.open = builtins.open
    wrap(faiss, "write_index", lambda index, path, *a: Path(str(path)).name)
    wrap(np, "savez", lambda file, *a, **k: "npz")
    wrap(retrac_io, "_exchange", lambda first, second: f"{Path(first).name} <-> {Path(second).name}")


_STATE = {"points": [], "kill_at": None}


def _on_point(label: str) -> None:
    if _STATE["kill_at"] is not None and len(_STATE["points"]) == _STATE["kill_at"]:
        os._exit(137)  # no flush, no clean-up: as kill -9
    _STATE["points"].append(label)


def _run_killed(writer, kwargs: dict, target: Path, kill_at: int) -> int:
    """Fork; the child writes into ``target`` and dies before point ``kill_at``. Returns its status."""
    pid = os.fork()
    if pid == 0:  # the child
        _STATE.update(points=[], kill_at=kill_at)
        try:
            writer(target=str(target), **kwargs)
        except BaseException as error:  # noqa: BLE001 - reported to the parent by the exit code
            print(f"writer failed: {type(error).__name__}: {error}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    writer_name, kwargs_json, template, work = sys.argv[1:5]
    writer, kwargs = WRITERS[writer_name], json.loads(kwargs_json)
    import torch

    torch.set_num_threads(1)  # one thread: the process forks after computing
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    def fresh(name: str) -> Path:
        run = work / name
        shutil.copytree(template, run / "target")
        return run / "target"

    _instrument(_on_point)
    writer(target=str(fresh("run-warm") / "ignored"), **kwargs)  # first call: lazy imports, caches
    done = fresh("run-done")
    _STATE.update(points=[], kill_at=None)
    writer(target=str(done), **kwargs)  # the points of one whole write, in order
    points = list(_STATE["points"])
    for n in range(len(points)):
        code = _run_killed(writer, kwargs, fresh(f"run-{n}"), n)
        if code != 137:
            raise SystemExit(f"run {n} was to be killed before {points[n]!r} but exited {code}")
    shutil.rmtree(work / "run-warm")
    print(json.dumps({"points": points}))


if __name__ == "__main__":
    main()
