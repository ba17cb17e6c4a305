"""Featurization throughput: sample-events per second for the ``exact`` and ``dense`` projectors.

Runs ``featurize_dataset`` end to end (events, noise, per-sample gradients with torch.func,
projection, Zarr writes) on the demo model (``retrac.demo.build_demo_unet``, random weights, saved as
a checkpoint) and the first ``--samples`` scikit-learn digits, once with ``--projector exact`` and
once with ``--projector dense --dim D``, in the same run. The one-off cost of generating ``P_k``
(trak BasicProjector, on the CPU) is reported apart from the steady-state throughput.

The first line printed is one JSON object::

    {"benchmark": "featurize", "exact_sample_events_per_s": ..., "dense_sample_events_per_s": ...,
     "dense_over_exact": ..., ...}

Usage::

    python benchmarks/featurize.py                    # 64 digits x stratified:4, d=1024, CPU (~1-2 min on 2 cores)
    python benchmarks/featurize.py --device cuda --samples 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.demo import build_demo_scheduler, build_demo_unet, digits_dataset
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.projection import DenseProjector, projector_seed


def measure(checkpoint, data, out: Path, config: IndexConfig, device: str) -> float:
    """Seconds for one full featurization into a fresh store."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    featurize_dataset([checkpoint], data, out, config, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="digits featurized (default: %(default)s)")
    parser.add_argument("--events", default="stratified:4", help="event schedule (default: %(default)s)")
    parser.add_argument(
        "--dim", type=int, default=1024, help="dense projection dimension (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    data = digits_dataset().subset(range(args.samples))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = resolve_checkpoint(
            save_checkpoint(build_demo_unet(), build_demo_scheduler(), tmp / "ckpt")
        )
        common = {"events": args.events, "batch_size": args.batch_size, "shard_rows": args.samples}
        exact = IndexConfig(projector="exact", **common)
        dense = IndexConfig(projector="dense", dim=args.dim, **common)
        num_parameters = sum(p.numel() for p in build_demo_unet().parameters())

        started = time.perf_counter()  # one-off: generate P_k (cached for the process)
        DenseProjector(num_parameters, args.dim, projector_seed(0, 0))._project_basic(
            torch.zeros(1, num_parameters)
        )
        setup = time.perf_counter() - started

        # warm-up (imports, allocator, torch.func tracing) on a few samples, then the timed runs
        featurize_dataset(
            [checkpoint], data.subset(range(2)), tmp / "warm", exact, device=args.device, progress=False
        )
        exact_s = measure(checkpoint, data, tmp / "exact", exact, args.device)
        dense_s = measure(checkpoint, data, tmp / "dense", dense, args.device)

    sample_events = args.samples * exact.schedule.num_events
    exact_rate, dense_rate = sample_events / exact_s, sample_events / dense_s
    result = {
        "benchmark": "featurize",
        "model": "demo UNet2DModel (random weights)",
        "num_parameters": num_parameters,
        "samples": args.samples,
        "events": args.events,
        "sample_events": sample_events,
        "dense_dim": args.dim,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "exact_sample_events_per_s": round(exact_rate, 2),
        "dense_sample_events_per_s": round(dense_rate, 2),
        "dense_over_exact": round(dense_rate / exact_rate, 3),
        "dense_projection_setup_s": round(setup, 2),
        "exact_seconds": round(exact_s, 2),
        "dense_seconds": round(dense_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
