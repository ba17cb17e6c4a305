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

With ``--index-rows N`` it measures instead what the index's digest check costs at load: a Flat
index of ``N`` random float32 rows of ``--index-dim`` dimensions is saved with ``save_index`` (the
manifest records the sha256 of ``index.faiss``), then, from the page cache, best of three each:

* ``read_index_s``: ``faiss.read_index`` (what loading costs without the check);
* ``sha256_s``: ``retrac._io.file_sha256`` of ``index.faiss`` (the check, streamed);
* ``load_index_s``: ``retrac.query.index.load_index`` (seal, digest, read);
* ``read_index_mmap_s``: ``faiss.read_index`` memory-mapped (``load_index(mmap=True)`` still hashes
  the whole file first).

and prints one JSON object with ``sha256_over_read_index`` and ``load_index_over_read_index``.

Usage::

    python benchmarks/integrity.py                       # 20,000 x 4 x 256 x 2 checkpoints (~160 MB)
    python benchmarks/integrity.py --store retrac-demo/store
    python benchmarks/integrity.py --index-rows 1000000  # 10^6 x 256 float32 Flat index (~1 GB)
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
    from retrac.indexer.layout import chunk_rows_for
    from retrac.indexer.store import FORMAT_NAME, FORMAT_VERSION

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


def best_of(count: int, fn) -> float:
    return min(timed(fn) for _ in range(count))


def index_load(rows: int, dim: int, block_rows: int = 65536) -> dict:
    """The digest check of ``load_index`` against ``faiss.read_index``, on a Flat index of ``rows`` rows."""
    import faiss

    from retrac._io import file_sha256
    from retrac.query.index import INDEX_FILENAME, SearchIndex, load_index, save_index

    rng = np.random.default_rng(0)
    flat = faiss.IndexFlatIP(dim)
    for start in range(0, rows, block_rows):
        flat.add(rng.standard_normal((min(block_rows, rows - start), dim), dtype=np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        built = SearchIndex(flat, "flat", "Flat", dim)
        save_s = timed(lambda: save_index(built, folder))
        path = str(folder / INDEX_FILENAME)
        file_sha256(path)  # warm the page cache: every timing below reads from memory
        read = best_of(3, lambda: faiss.read_index(path))
        digest = best_of(3, lambda: file_sha256(path))
        load = best_of(3, lambda: load_index(folder, device="cpu"))
        mapped = best_of(3, lambda: faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY))
        size = Path(path).stat().st_size
    return {
        "benchmark": "integrity-index-load",
        "rows": rows,
        "dim": dim,
        "index_mb": round(size / 2**20, 1),
        "save_index_s": round(save_s, 3),
        "read_index_s": round(read, 3),
        "sha256_s": round(digest, 3),
        "load_index_s": round(load, 3),
        "read_index_mmap_s": round(mapped, 4),
        "sha256_mb_per_s": round(size / 2**20 / digest, 1),
        "sha256_over_read_index": round(digest / read, 3),
        "load_index_over_read_index": round(load / read, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="an existing store (default: a synthetic one)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--events", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument(
        "--index-rows", type=int, default=None, help="measure the index digest check at load instead"
    )
    parser.add_argument("--index-dim", type=int, default=256)
    args = parser.parse_args()
    if args.index_rows:
        print(json.dumps(index_load(args.index_rows, args.index_dim)))
        return

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
