"""What the store's digest checks cost, against the operations they protect.

Writes a synthetic feature store (random features, ``--samples`` rows x ``--events`` events x ``--dim``
float32, ``--checkpoints`` checkpoints, shards of ``--shard-rows``) with ``FeatureStore.write_shard``,
exactly as ``retrac index`` writes one, or uses ``--store PATH`` (e.g. the demo's store), then times:

* ``read_unverified_s``: streaming every shard of every checkpoint without the digest check;
* ``read_verified_s``: the same stream with the check (what ``retrac build`` reads);
* ``verify_s``: ``retrac verify`` (``retrac.verify.verify_store``);
* ``build_s``: ``build_attribution_index`` (``--method tracin --index flat``), the operation protected.

Prints one JSON object with the times and the ratios ``verified_over_unverified_read`` and
``verify_over_build``.

Usage::

    python benchmarks/integrity.py                       # 20,000 x 4 x 256 x 2 checkpoints (~160 MB)
    python benchmarks/integrity.py --store retrac-demo/store
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_store(path: Path, samples: int, events: int, dim: int, checkpoints: int, shard_rows: int):
    from retrac.indexer import FeatureStore, IndexConfig
    from retrac.indexer.store import FORMAT_NAME, FORMAT_VERSION, chunk_rows_for

    config = IndexConfig(events=f"stratified:{events}", projector="dense", dim=dim, shard_rows=shard_rows)
    scheduler = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    attrs = {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "config": config.store_dict(),
        "task": {"objective": "loss", "include": ["*"], "exclude": [], "num_train_timesteps": 1000},
        "projectors": [
            {"kind": "dense", "dim": dim, "seed": k, "norm_kind": "exact"} for k in range(checkpoints)
        ],
        "norm_kind": "exact",
        "events": config.schedule.to_dict(),
        "checkpoints": [
            {"path": f"synthetic-{k}", "weight": 1.0, "sha256": "0" * 64, "step": k, "scheduler": scheduler}
            for k in range(checkpoints)
        ],
        "dataset": {"num_samples": samples, "fingerprint": "synthetic", "has_labels": False, "source": None},
        "layout": {
            "num_samples": samples,
            "num_events": events,
            "dim": dim,
            "dtype": "float32",
            "shard_rows": shard_rows,
            "chunk_rows": chunk_rows_for(shard_rows, events * dim * 4),
            "num_shards": -(-samples // shard_rows),
        },
    }
    store = FeatureStore.create_or_open(path, attrs, [f"s{i}" for i in range(samples)])
    rng = np.random.default_rng(0)
    for k in range(checkpoints):
        for shard in range(store.num_shards):
            start, stop = store.shard_range(shard)
            n = stop - start
            features = rng.standard_normal((n, events, dim), dtype=np.float32)
            norms = np.linalg.norm(features, axis=2) * 10
            timesteps = rng.integers(0, 1000, (n, events), dtype=np.int32)
            store.write_shard(k, shard, features, norms, timesteps, np.ones((n, events), bool))
    return FeatureStore.open(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stream(store, verify: bool) -> None:
    for k in range(store.num_checkpoints):
        for _ in store.blocks(k, 4096, verify=verify):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="an existing store (default: a synthetic one)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--events", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=1024)
    args = parser.parse_args()

    from retrac.indexer import FeatureStore
    from retrac.query.attribution import build_attribution_index
    from retrac.verify import verify_store

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.store:
            store = FeatureStore.open(args.store)
        else:
            store = synthetic_store(
                tmp / "store", args.samples, args.events, args.dim, args.checkpoints, args.shard_rows
            )
        stream(store, verify=False)  # warm the page cache: every timing below reads from memory
        times = {False: [], True: []}
        for _ in range(3):  # interleaved, best of three: a shared machine's noise hits both alike
            for verify in (False, True):
                times[verify].append(timed(lambda verify=verify: stream(store, verify=verify)))
        unverified, verified = min(times[False]), min(times[True])
        verify_s = timed(lambda: verify_store(store.path))
        build_s = timed(
            lambda: build_attribution_index(store, tmp / "index", "tracin", index="flat", progress=False)
        )
    nbytes = store.num_checkpoints * store.num_samples * store.num_events * (store.dim * 4 + 9)
    print(
        json.dumps(
            {
                "benchmark": "integrity",
                "store": args.store or "synthetic",
                "samples": store.num_samples,
                "checkpoints": store.num_checkpoints,
                "events": store.num_events,
                "dim": store.dim,
                "store_mb": round(nbytes / 2**20, 1),
                "read_unverified_s": round(unverified, 3),
                "read_verified_s": round(verified, 3),
                "verify_s": round(verify_s, 3),
                "build_s": round(build_s, 3),
                "verified_over_unverified_read": round(verified / unverified, 3),
                "verify_over_build": round(verify_s / build_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
