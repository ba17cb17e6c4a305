"""Scale benchmark: (a) featurization throughput of 1 vs 2 local processes; (b) an index of N synthetic rows
built from a streamed store in bounded memory.

(a) Local scaling. A small UNet (block channels 32/64, 16 x 16 images, seeded) and ``--local-samples``
images: ``retrac index`` once in one process with every core (``--threads <cores>``), then as two
``--shard auto`` workers started together, each with its default threads (``cores / 2``: the
``LOCAL_WORLD_SIZE`` rule, given here by the two-process count). Throughput = samples / wall time of
the whole command (process start included, for both). ``local_scaling_2proc`` = two-process
throughput / one-process throughput; the two stores are compared bit for bit when the threads per
process agree.

(b) Index at scale. ``N`` synthetic rows shaped like real projected-gradient train vectors, made by
``benchmarks/search.py``'s ``GradientLikeVectors`` (2,000 clusters in a 64-dimensional subspace, 30%
of the energy in isotropic noise, log-normal norms with sigma 0.5) at ``d = --dim`` (256 by default),
are written as a float16 feature store (K = 1 checkpoint, S = 1 event, so ``U(z)`` = the row; the
store is streamed and digest-checked like any other). Then, each phase in its own process so that its
peak RSS is its own:

* ``build``: ``retrac.query.attribution.build_attribution_index(store, method="tracin", index="auto",
  max_memory=--max-memory)``: one coarse quantizer trained on a uniform sample, lists on disk when
  they exceed the budget, ``nprobe`` calibrated to recall@10 >= 0.97 at build time;
* ``exact``: exact top-10 of 1,000 held-out queries (same clusters, not rows of the store) by brute
  force over the streamed store (``retrac.query.index.exact_search``): the baseline and the truth;
* ``query``: ``load_index`` (digests checked, lists memory-mapped) and the 1,000 queries with the
  calibrated ``nprobe``: recall@10 against the exact top-10, and speed-up = exact time / index time.

Prints one JSON object per phase on stderr and, last, one JSON line on stdout with ``n``, ``dim``,
``peak_rss_gb`` (the largest of the build and query phases), ``build_seconds``, ``index_disk_gb``,
``recall_at_10``, ``speedup_over_exact``, ``local_scaling_2proc`` and the rest.

Usage::

    python benchmarks/scale.py --n 1000000 --max-memory 512M           # ~15 min on 1 thread
    python benchmarks/scale.py --n 10000000 --max-memory 2G --skip-local  # hours on 1 thread
    python benchmarks/scale.py --n 100000 --local-samples 32 --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK_ROWS = 50_000
SHARD_ROWS = 50_000
NUM_QUERIES = 1000
K = 10
RERANK_DEPTH = 100  # candidates re-scored exactly per query
RERANK_EF_SEARCH = 256  # HNSW candidate list for them
RERANK_NPROBE = 64  # IVF lists probed for them


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------- (a) local scaling
def make_workload(folder: Path, samples: int) -> tuple[Path, Path]:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from retrac.checkpoints import save_checkpoint
    from retrac.data import ImageDataset

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    checkpoint = save_checkpoint(
        model, DDPMScheduler(num_train_timesteps=1000), folder / "checkpoint", 1.0, 100
    )
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((samples, 1, 16, 16), generator=generator) * 2 - 1
    ImageDataset(images, [f"s{i:05d}" for i in range(samples)], source="scale").save_npz(folder / "train.npz")
    return Path(checkpoint), folder / "train.npz"


def index_command(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "retrac", "index", "--checkpoint", str(checkpoint), "--data", str(data),
        "--out", str(out), "--events", "stratified:2", "--dim", "256",
        "--shard-rows", "8", "--batch-size", "8", "--no-progress", *extra,
    ]  # fmt: skip


def local_scaling(work: Path, samples: int) -> dict:
    from retrac.indexer.workers import available_cores

    cores = available_cores()
    checkpoint, data = make_workload(work / "local", samples)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)  # each process chooses its own threads (the rule under test)
    one_out = work / "local" / "one"
    start = time.perf_counter()
    subprocess.run(index_command(checkpoint, data, one_out, "--threads", str(cores)), env=env, check=True)
    one_seconds = time.perf_counter() - start
    two_out = work / "local" / "two"
    two_env = {**env, "LOCAL_WORLD_SIZE": "2"}  # as torchrun --nproc-per-node 2 sets it
    start = time.perf_counter()
    workers = [
        subprocess.Popen(index_command(checkpoint, data, two_out, "--shard", "auto"), env=two_env)
        for _ in range(2)
    ]
    codes = [w.wait() for w in workers]
    two_seconds = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a two-process worker failed: exit codes {codes}")
    result = {
        "phase": "local_scaling",
        "cores": cores,
        "samples": samples,
        "one_process_threads": cores,
        "two_process_threads_each": max(1, cores // 2),
        "one_process_samples_per_s": samples / one_seconds,
        "two_process_samples_per_s": samples / two_seconds,
        "local_scaling_2proc": one_seconds / two_seconds,
    }
    log(json.dumps(result))
    return result


# ---------------------------------------------------------------------- (b) the synthetic store
def synthetic_attrs(n: int, dim: int) -> dict:
    from retrac.indexer.config import IndexConfig
    from retrac.indexer.layout import chunk_rows_for
    from retrac.indexer.store import FORMAT_NAME, FORMAT_VERSION

    config = IndexConfig(events="1", projector="dense", dim=dim, dtype="float16", shard_rows=SHARD_ROWS)
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "config": config.store_dict(),
        "task": {
            "objective": "loss",
            "num_parameters": dim,
            "num_train_timesteps": 1000,
            "include": [],
            "exclude": [],
        },
        "projectors": [{"kind": "dense", "dim": dim, "seed": 0, "norm_kind": "exact", "num_parameters": dim}],
        "norm_kind": "exact",
        "events": {"num_events": 1, "synthetic": "benchmarks/scale.py GradientLikeVectors"},
        "checkpoints": [{"path": "synthetic", "weight": 1.0, "sha256": "0" * 64, "step": 0, "scheduler": {}}],
        "dataset": {
            "num_samples": n,
            "fingerprint": f"synthetic-{n}-{dim}",
            "has_labels": False,
            "source": "synthetic",
        },
        "layout": {
            "num_samples": n,
            "num_events": 1,
            "dim": dim,
            "dtype": "float16",
            "shard_rows": SHARD_ROWS,
            "chunk_rows": chunk_rows_for(SHARD_ROWS, dim * 2),
            "num_shards": -(-n // SHARD_ROWS),
        },
        "versions": {},
    }


def vectors(dim: int):
    sys.path.insert(0, str(HERE))
    from search import GradientLikeVectors

    return GradientLikeVectors(dim, seed=0, block_rows=BLOCK_ROWS)


def write_store(store_path: Path, n: int, dim: int) -> dict:
    from retrac.indexer.store import FeatureStore

    start = time.perf_counter()
    ids = [f"r{i:08d}" for i in range(n)]
    store = FeatureStore.create_or_open(store_path, synthetic_attrs(n, dim), ids)
    done = store.completed_shards(0)
    for shard, block in enumerate(vectors(dim).blocks(n)):
        if shard in done:
            continue
        rows = block.shape[0]
        store.write_shard(
            0,
            shard,
            block[:, None, :],
            np.ones((rows, 1), np.float32),
            np.zeros((rows, 1), np.int32),
            np.ones((rows, 1), bool),
        )
    return {
        "phase": "write",
        "seconds": time.perf_counter() - start,
        "store_gb": folder_bytes(store_path) / 1e9,
    }


def build_phase(store_path: Path, index_path: Path, max_memory: int, kind: str = "auto") -> dict:
    from retrac.query.attribution import build_attribution_index

    start = time.perf_counter()
    built = build_attribution_index(
        store_path,
        index_path,
        "tracin",
        index=kind,
        max_memory=max_memory,
        progress=False,
        rerank_vectors=True,
    )
    seconds = time.perf_counter() - start
    return {
        "phase": "build",
        "seconds": seconds,
        "factory": built.factory,
        "on_disk": bool(built.build_params.get("on_disk")),
        "search_params": built.search_params,
        "build_recall": built.recall,
        "index_disk_gb": folder_bytes(index_path) / 1e9,
        "peak_rss_gb": peak_rss_gb(),
    }


def exact_phase(store_path: Path, work: Path, dim: int) -> dict:
    from retrac.indexer.store import FeatureStore
    from retrac.query.attribution import train_vector_blocks
    from retrac.query.index import exact_search
    from retrac.query.vectors import Method

    queries = vectors(dim).queries(NUM_QUERIES)
    store = FeatureStore.open(store_path)
    start = time.perf_counter()
    _, truth = exact_search(
        lambda: train_vector_blocks(store, Method.named("tracin"), BLOCK_ROWS), queries, K
    )
    seconds = time.perf_counter() - start
    np.save(work / "truth.npy", truth)
    return {"phase": "exact", "seconds": seconds, "queries": NUM_QUERIES, "peak_rss_gb": peak_rss_gb()}


def query_phase(index_path: Path, work: Path, dim: int) -> dict:
    from retrac.query.index import load_index, recall_at_k

    queries = vectors(dim).queries(NUM_QUERIES)
    start = time.perf_counter()
    index = load_index(index_path)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    found = index.search(queries, K)
    seconds = time.perf_counter() - start
    truth = np.load(work / "truth.npy")
    return {
        "phase": "query",
        "load_seconds": load_seconds,
        "seconds": seconds,
        "recall_at_10": recall_at_k(found[1], truth, K),
        "search_params": index.search_params,
        "peak_rss_gb": peak_rss_gb(),
    }


def rerank_phase(store_path: Path, index_path: Path, work: Path, dim: int) -> dict:
    """The index's top ``RERANK_DEPTH`` at a fixed ``efSearch`` / ``nprobe``, re-scored exactly
    (``retrac.query.index.rerank``), the candidates' vectors read two ways, each timed with the search:
    from the index's ``vectors.npy`` (``--rerank-vectors``: only the candidates' rows, each with a positioned read;
    ``seconds``) and from the store (the shards holding candidates read whole, digest-checked;
    ``store_seconds``). Both must give the same rows."""
    from retrac.indexer.rows import train_vector_rows
    from retrac.indexer.store import FeatureStore
    from retrac.query.index import load_index, read_manifest, recall_at_k
    from retrac.query.index.rerank import open_rerank_vectors, rerank

    queries = vectors(dim).queries(NUM_QUERIES)
    index = load_index(index_path)  # every file's digest checked, vectors.npy included
    kept = open_rerank_vectors(index_path, read_manifest(index_path), index.num_vectors, index.dim)
    store = FeatureStore.open(store_path)
    params = (
        {"ef_search": RERANK_EF_SEARCH} if "efSearch" in index.search_params else {"nprobe": RERANK_NPROBE}
    )
    truth = np.load(work / "truth.npy")
    result = {"phase": "rerank", "depth": RERANK_DEPTH, **params}
    sources = {"store": lambda r: train_vector_rows(store, "tracin", r)}
    if kept is not None:
        sources["vectors"] = lambda r: np.asarray(kept[r])
    found = {}
    for name, vectors_of in sources.items():
        start = time.perf_counter()
        _, candidates = index.search(queries, RERANK_DEPTH, **params)
        _, found[name] = rerank(queries, candidates, vectors_of, K)
        seconds = time.perf_counter() - start
        result["store_seconds" if name == "store" else "seconds"] = seconds
    if kept is None:
        result["seconds"] = result["store_seconds"]
    elif not np.array_equal(found["vectors"], found["store"]):
        raise SystemExit("re-ranking from vectors.npy and from the store found different rows")
    result.update({"recall_at_10": recall_at_k(found["store"], truth, K), "peak_rss_gb": peak_rss_gb()})
    return result


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    """Run one phase in a child process (its own peak RSS) and return its JSON (kept in the work folder:
    a rerun reuses the phases already measured)."""
    saved = args.work / f"n{args.n}-d{args.dim}" / f"{phase}.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
        log(f"reusing {saved}: {json.dumps(result)}")
        return result
    command = [sys.executable, __file__, "--phase", phase, "--n", str(args.n), "--dim", str(args.dim)]
    command += ["--work", str(args.work), "--max-memory", str(args.max_memory), "--kind", args.kind]
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"phase {phase} failed ({done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    saved.write_text(json.dumps(result))
    log(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic rows of the index benchmark")
    parser.add_argument(
        "--dim", type=int, default=256, help="dimension d of the rows (>= 256: real features)"
    )
    parser.add_argument("--max-memory", default="512M", help="the build's --max-memory")
    parser.add_argument("--kind", default="auto", help="the build's --kind (default: auto)")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/retrac-scale"), help="folder for stores and indexes"
    )
    parser.add_argument("--local-samples", type=int, default=64, help="images of the local scaling run")
    parser.add_argument("--skip-local", action="store_true", help="leave out (a) local scaling")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from retrac.indexer.workers import parse_size

    budget = parse_size(args.max_memory)
    work = args.work / f"n{args.n}-d{args.dim}"
    work.mkdir(parents=True, exist_ok=True)
    store_path, index_path = work / "store", work / "index"
    if args.phase:  # a child: one phase, one JSON line
        phases = {
            "write": lambda: write_store(store_path, args.n, args.dim),
            "build": lambda: build_phase(store_path, index_path, budget, args.kind),
            "exact": lambda: exact_phase(store_path, work, args.dim),
            "query": lambda: query_phase(index_path, work, args.dim),
            "rerank": lambda: rerank_phase(store_path, index_path, work, args.dim),
        }
        print(json.dumps(phases[args.phase]()))
        return
    local = None if args.skip_local else local_scaling(args.work, args.local_samples)
    write = run_phase("write", args)
    build = run_phase("build", args)
    exact = run_phase("exact", args)
    query = run_phase("query", args)
    reranked = run_phase("rerank", args)
    summary = {
        "n": args.n,
        "dim": args.dim,
        "store_dtype": "float16",
        "max_memory_gb": budget / 1e9,
        "store_gb": write["store_gb"],
        "factory": build["factory"],
        "on_disk": build["on_disk"],
        "build_seconds": build["seconds"],
        "build_peak_rss_gb": build["peak_rss_gb"],
        "query_peak_rss_gb": query["peak_rss_gb"],
        "peak_rss_gb": max(build["peak_rss_gb"], query["peak_rss_gb"], reranked["peak_rss_gb"]),
        "index_disk_gb": build["index_disk_gb"],
        "search_params": query["search_params"],
        "exact_seconds": exact["seconds"],
        "calibrated": {
            "recall_at_10": query["recall_at_10"],
            "seconds": query["seconds"],
            "speedup_over_exact": exact["seconds"] / query["seconds"],
        },
        "reranked": {k: v for k, v in reranked.items() if k not in ("phase", "peak_rss_gb")},
        # the headline: the index's candidates re-scored exactly from its vectors.npy
        "recall_at_10": reranked["recall_at_10"],
        "index_seconds": reranked["seconds"],
        "speedup_over_exact": exact["seconds"] / reranked["seconds"],
        "speedup_over_exact_rerank_from_store": exact["seconds"] / reranked["store_seconds"],
        "queries": NUM_QUERIES,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "local_scaling_2proc": None if local is None else local["local_scaling_2proc"],
        "local": local,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
