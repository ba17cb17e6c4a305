"""Fidelity of projected attribution: projected vs exact scores over all (train, query) pairs.

On the trained demo model (``retrac.demo.train_digits_ddpm``; by default a shorter run than the
demo's, ``DemoConfig(epochs=10, num_checkpoints=2)``, or an existing run via ``--demo DIR``), for
the first ``--train`` (256) training digits and ``--queries`` (64) held-out digits, at every
checkpoint:

* exact: per-sample gradients (``exact`` projector, the reference) at the training events
  (``stratified:4``, the indexer's plan) and the query events (``QueryEvents`` default 10 x 2), turned
  into TracIn / ReTrac train and query vectors with ``retrac.query.vectors`` (docs/design.md section 1);
* ``dense``: the same vectors through trak's projection (``DenseProjector``; it is linear, so
  projecting the exact per-event gradients gives exactly what the dense featurization stores, norms
  exact);
* ``factored``: the features and norms of the ``factored`` projector, computed from scratch through
  ``projected_gradients`` (the indexer's and the query side's code path).

Scores ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>`` for TracIn, ReTrac, and ReTrac + kernel (``c = 0.1``,
computed in sample space, ``(Phi Phi^T + lambda I)^-1 Phi q``, for exact and projected alike). For each
projector and ``d``: Spearman correlation with the exact scores over all pairs, and mean top-10 overlap
per query. One JSON line per (projector, d); the last line is the summary for the default projector
at ``d = 4096`` (keys ``spearman_tracin``, ``spearman_retrac``, ``top10_overlap_tracin``,
``top10_overlap_retrac``, ...).

Usage::

    python benchmarks/fidelity.py --threads 2                  # trains the short demo under /tmp
    python benchmarks/fidelity.py --demo /tmp/retrac-fidelity-demo --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from retrac.checkpoints import load_scheduler, load_unet, resolve_checkpoint
from retrac.data import load_dataset
from retrac.demo import DemoConfig, train_digits_ddpm
from retrac.events import EventSchedule
from retrac.indexer import IndexConfig
from retrac.projection import (
    DEFAULT_LAYER_DIM,
    DenseProjector,
    ExactProjector,
    FactoredProjector,
    projected_gradients,
    projector_seed,
)
from retrac.query.attribution import QueryEvents, query_event_features
from retrac.query.vectors import DEFAULT_KERNEL_C, query_vectors, train_vectors
from retrac.task import DiffusionTask

METHODS = ("tracin", "retrac", "retrac+kernel")
TOP = 10


def train_events(ids, k, rows, schedule, T, seed, shape):
    plan = schedule.plan(ids, T, seed, [None] * (k + 1))
    events = plan.events(k, rows)
    return torch.from_numpy(events.timesteps), events.noise(shape)


def featurize(task, projector, images, ids, k, args, shape):
    """Per-checkpoint train vectors (TracIn, ReTrac) and query g_kj ``(n_q, T_q, d)`` for ``projector``."""
    schedule = EventSchedule.parse(args.events)
    u = {"tracin": [], "retrac": []}
    for start in range(0, len(ids["train"]), 32):
        rows = list(range(start, min(start + 32, len(ids["train"]))))
        t, noise = train_events(ids["train"], k, rows, schedule, task.num_train_timesteps, 0, shape)
        feats, norms = projected_gradients(task, projector, images["train"][rows], t, noise)
        for kind in u:
            u[kind].append(train_vectors(feats.numpy(), norms.numpy(), kind))
    feats = query_event_features(task, projector, images["query"], QueryEvents.preset("default"), k)
    g = feats.mean(axis=2)  # g_kj = mean_m P grad f
    return {kind: np.concatenate(v) for kind, v in u.items()}, g


def checkpoint_scores(u: dict, g: np.ndarray) -> dict[str, np.ndarray]:
    """Unweighted scores ``(n_train, n_query)`` of one checkpoint for every method."""
    scores = {}
    # TracIn: q = mean_j g_kj; ReTrac: q = mean_j g_kj / ||g_kj|| (query_vectors works on (n, T_q, M, d))
    q_tracin = query_vectors(g[:, :, None], "tracin").astype(np.float64)
    q_retrac = query_vectors(g[:, :, None], "retrac").astype(np.float64)
    phi_t, phi_r = u["tracin"].astype(np.float64), u["retrac"].astype(np.float64)
    scores["tracin"] = phi_t @ q_tracin.T
    scores["retrac"] = phi_r @ q_retrac.T
    # kernel: <u(z), (Phi^T Phi + lambda I)^-1 q> = [(Phi Phi^T + lambda I)^-1 Phi q](z),
    # lambda = c * mean_z ||u(z)||^2
    gram = phi_r @ phi_r.T
    lam = DEFAULT_KERNEL_C * np.trace(gram) / gram.shape[0]
    scores["retrac+kernel"] = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), scores["retrac"])
    return scores


def compare(exact: dict, approx: dict) -> dict:
    out = {}
    for method in METHODS:
        a, b = exact[method], approx[method]
        out[f"spearman_{method.replace('+', '_')}"] = round(float(spearmanr(a.ravel(), b.ravel())[0]), 4)
        top_a = np.argsort(-a, axis=0)[:TOP]
        top_b = np.argsort(-b, axis=0)[:TOP]
        overlap = [len(set(top_a[:, j]) & set(top_b[:, j])) / TOP for j in range(a.shape[1])]
        out[f"top10_overlap_{method.replace('+', '_')}"] = round(float(np.mean(overlap)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=None, help="an existing train_digits_ddpm output folder")
    parser.add_argument(
        "--out", default="/tmp/retrac-fidelity-demo", help="where to train the demo (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="demo training epochs (default: %(default)s)")
    parser.add_argument("--checkpoints", type=int, default=2, help="demo checkpoints (default: %(default)s)")
    parser.add_argument(
        "--train", type=int, default=256, help="training samples scored (default: %(default)s)"
    )
    parser.add_argument("--queries", type=int, default=64, help="held-out queries (default: %(default)s)")
    parser.add_argument("--events", default="stratified:4", help="train events (default: %(default)s)")
    parser.add_argument("--dims", default="1024,2048,4096", help="(default: %(default)s)")
    parser.add_argument("--projectors", default="dense,factored", help="(default: %(default)s)")
    parser.add_argument(
        "--layer-dim", type=int, default=None, help="factored layer_dim (default: the projector's default)"
    )
    parser.add_argument("--quick", action="store_true", help="64 train x 16 queries, d = 1024 and 4096")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train, args.queries, args.dims = 64, 16, "1024,4096"
    dims = [int(d) for d in args.dims.split(",")]
    projectors = args.projectors.split(",")
    started = time.perf_counter()

    if args.demo is None:
        demo_dir = Path(args.out)
        if not (demo_dir / "demo.json").is_file():
            train_digits_ddpm(
                DemoConfig(epochs=args.epochs, num_checkpoints=args.checkpoints), demo_dir, progress=False
            )
    else:
        demo_dir = Path(args.demo)
    summary = json.loads((demo_dir / "demo.json").read_text())
    train = load_dataset(summary["train"]).subset(range(args.train))
    heldout = load_dataset(summary["heldout"]).subset(range(args.queries))
    images = {"train": train.images, "query": heldout.images}
    ids = {"train": train.ids}
    checkpoints = [resolve_checkpoint(c["path"]) for c in summary["checkpoints"]]
    weights = [c.weight for c in checkpoints]
    shape = tuple(train.images.shape[1:])
    default_projector = IndexConfig().projector

    exact_scores = {m: 0.0 for m in METHODS}
    approx_scores = {(p, d): {m: 0.0 for m in METHODS} for p in projectors for d in dims}
    timing = {}
    for k, (checkpoint, w) in enumerate(zip(checkpoints, weights, strict=True)):
        task = DiffusionTask(load_unet(checkpoint.path), load_scheduler(checkpoint.path))
        t0 = time.perf_counter()
        u, g = featurize(task, ExactProjector(task.num_parameters), images, ids, k, args, shape)
        timing["exact"] = timing.get("exact", 0) + time.perf_counter() - t0
        for method, s in checkpoint_scores(u, g).items():
            exact_scores[method] = exact_scores[method] + w * s  # I = sum_k w_k <u_k, q_k>
        for d in dims:
            if "dense" in projectors:
                t0 = time.perf_counter()
                dense = DenseProjector(task.num_parameters, d, projector_seed(0, k))
                # P is linear: P mean_e(g_e / n_e) = mean_e(P g_e / n_e) with exact norms n_e
                stacked = np.concatenate([u["tracin"], u["retrac"], g.reshape(-1, g.shape[-1])])
                projected = dense.project(torch.from_numpy(stacked)).numpy()
                n = len(u["tracin"])
                pu = {"tracin": projected[:n], "retrac": projected[n : 2 * n]}
                pg = projected[2 * n :].reshape(*g.shape[:2], d)
                for method, s in checkpoint_scores(pu, pg).items():
                    approx_scores[("dense", d)][method] = approx_scores[("dense", d)][method] + w * s
                timing[f"dense_{d}"] = timing.get(f"dense_{d}", 0) + time.perf_counter() - t0
            if "factored" in projectors:
                t0 = time.perf_counter()
                layer_dim = {} if args.layer_dim is None else {"layer_dim": args.layer_dim}
                factored = FactoredProjector(task, d, projector_seed(0, k), **layer_dim)
                fu, fg = featurize(task, factored, images, ids, k, args, shape)
                for method, s in checkpoint_scores(fu, fg).items():
                    approx_scores[("factored", d)][method] = approx_scores[("factored", d)][method] + w * s
                timing[f"factored_{d}"] = timing.get(f"factored_{d}", 0) + time.perf_counter() - t0
        del u, g

    results = {}
    for (p, d), scores in approx_scores.items():
        results[(p, d)] = compare(exact_scores, scores)
        print(json.dumps({"benchmark": "fidelity", "projector": p, "dim": d, **results[(p, d)]}))
    best = max(dims)
    final = {
        "benchmark": "fidelity",
        "default_projector": default_projector,
        "dim": best,
        **results.get((default_projector, best), {}),
        **{f"{p}_{key}": value for p in projectors for key, value in results[(p, best)].items()},
        "num_train": args.train,
        "num_queries": args.queries,
        "num_checkpoints": len(checkpoints),
        "factored_layer_dim": args.layer_dim or DEFAULT_LAYER_DIM,
        "train_events": args.events,
        "query_events": "10x2",
        "num_parameters": task.num_parameters,
        "demo": str(demo_dir),
        "demo_config": json.loads((demo_dir / "demo.json").read_text())["config"],
        "seconds": {key: round(v, 1) for key, v in timing.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
