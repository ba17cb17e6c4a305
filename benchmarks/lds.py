"""Attribution quality on the demo, measured by the linear datamodeling score (LDS).

Setup:

* **Pool**: ``--pool`` (1,000) digits drawn (seeded) from the demo's training split; the model
  attributed is the demo recipe (``retrac.demo.train_ddpm``: ``--epochs`` 40, batch 64, AdamW 2e-3,
  4 checkpoints) trained on the whole pool.
* **Subsets**: ``--subsets`` (64) random halves of the pool (``retrac.lds.LDSRun``, seed 0), each
  retrained with the same recipe and the same seed (same initialisation and per-step draws; half
  the optimizer steps). The first ``--min-subsets`` (32) are trained first, so every table exists
  early; the rest are trained after the cheaper configurations and the tables recomputed.
* **Test samples**: ``--heldout`` (50) digits of the demo's held-out split and ``--generated`` (50)
  digits sampled from the pool model's last checkpoint (1,000 DDPM steps). Half of each kind
  (seeded) is the **validation** split, on which every choice is made (the kernel's ``c``, the
  pixel similarity, the events / dimension / checkpoint setting of each method's headline); every
  reported LDS is on the other half, the **report** split, with a 95% bootstrap interval over its
  test samples.
* **Loss**: each test sample's mean loss (MSE to epsilon) over ``--loss-events`` 50 x 4 fixed
  (timestep, noise) pairs, the same on every model. LDS = mean over test samples of the Spearman
  correlation across subsets of the summed scores of the subset's members with **minus** the loss.
* **Methods**: ``tracin``, ``retrac`` (no kernel), ``trak`` (tracin vectors + kernel, loss store),
  ``dtrak`` (tracin vectors + kernel, ``sqnorm`` store), ``retrac+kernel``; ``c`` from ``--kernel-c``
  (lambda_k = c * mean ||u_k||^2). Flat indexes: every training sample is scored. Factored projector,
  query events 10 x 2.
* **Candidates** (scored and reported, never the default): ``dtrak+retrac``, ``das`` (the kernel score
  weighted by each training sample's residual at the store's events) and ``dtrak-events`` (the kernel
  over every event's features, pooled or per query-timestep bin); see ``CANDIDATES``.
* **Configurations** (cheapest first): events ``stratified:S`` for ``S`` in ``--events`` (1, 4, 10,
  32, 100) at ``--dim`` 512 with all checkpoints; ``--dims`` (128, 2048) at ``S = --dim-events`` (10);
  the last checkpoint alone at ``S = --dim-events``; the ``S = --dim-events`` setting featurized with
  other seeds (``--featurize-seeds``, 1 and 2): how far a method's LDS moves with the random events and
  projections alone; ``--checkpoint-counts`` (e.g. 8) attributes with that many checkpoints of the
  pool model's training (the recipe trained again, saving more often). ``S = 100`` comes last, after
  the counterfactual check. Settings with ``d > N`` score their kernels in the dual form
  (:func:`dual_scores`), and ``dtrak-events`` is left out where ``d`` times the checkpoints exceeds
  4096 x 4.
* **Unprojected reference** (``--unprojected``, on by default): the ``S = --dim-events`` setting scored
  from the per-sample gradients themselves (``d = P``, the ``exact`` projector) at the same train and
  query events as the ``--dim`` setting, the kernels in the dual form ``(U U^T + lambda I)^-1 U q``
  (an ``N x N`` solve). It is what every projection dimension approximates, so it says how much LDS a
  larger ``d`` can still add; it is reported beside the headlines (``unprojected`` in the last JSON
  line) and is never one, since an index cannot hold ``d = P`` vectors at scale.
* **Test-specific LDS** (``retrac.lds.metrics``): the same correlation after removing each subset's
  mean over the test samples from the predicted effects and the losses. A retrained model's losses
  share a part common to every test sample, and a scoring's own common part can match it by chance;
  that moves every test sample's LDS together, which the bootstrap interval over test samples does
  not show. The featurization-seed rows show how large that is; the test-specific column is stable.
* **Baselines**: pixel similarity (``-L2`` distance or cosine, chosen on validation) and random scores.
* **Counterfactual check**: for ``--counterfactual-queries`` (8) report-split test samples, remove
  their top ``--counterfactual-k`` (20) proponents under the recommended method and under pixel
  similarity (and 20 random samples), retrain on the rest of the pool, report the loss change.

Every artifact is cached under ``--out`` (models, losses, stores, indexes, score matrices) and reused;
kill and rerun the same command to resume. Prints one JSON line per stage, the Markdown table, and as
the last line one JSON object with ``lds_default`` (the method with the best validation LDS at its
validation-chosen setting), ``lds_pixel_nn``, ``lds_tracin``, ``lds_retrac``, ``lds_trak``,
``lds_dtrak``, ``lds_retrac_kernel`` (each at its validation-chosen setting, report split, with
``*_ci``), ``n_subsets``, ``n_test`` and the ratio ``lds_default / lds_pixel_nn``; the
``*_test_specific`` keys repeat the figures for the test-specific LDS (each chosen on its own
validation figure), and ``featurize_seeds`` holds each family's LDS under both featurization seeds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/lds.py --out lds-bench --threads 1
    python benchmarks/lds.py --out /tmp/lds-quick --quick      # a smoke run: tiny pool, 4 subsets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrac._io import atomic_save_npy, atomic_save_npz, atomic_write_json, atomic_write_text
from retrac.checkpoints import load_scheduler, load_unet
from retrac.data import ImageDataset, load_dataset
from retrac.demo import DemoConfig, split_digits
from retrac.events import derive_seed
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.lds import DemoTrainer, LDSConfig, LDSRun, attributor_scores, counterfactual_check, lds_score
from retrac.lds.metrics import pixel_scores, random_scores
from retrac.lds.run import images_sha256
from retrac.projection.exact import ExactProjector
from retrac.projection.gradients import projected_gradients
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index, query_event_features
from retrac.query.vectors import VECTOR_KINDS, KernelAccumulator, Method, query_vectors, train_vectors
from retrac.sampling import generate_images
from retrac.task import DiffusionTask

FAMILIES = ("tracin", "retrac", "trak", "dtrak", "retrac+kernel")
# beyond the anchors: scored and reported, never the benchmark's default (retrac does not ship them)
# unless adopted; dtrak+retrac = D-TRAK's sqnorm gradients normalised per event (ReTrac) with the kernel;
# das = a kernel score on the sqnorm store (tracin or retrac vectors, chosen on validation) with each
# training sample's term weighted by its residual r_k(z) at the checkpoint (train_residuals): the
# residual weighting of DAS (Lin et al., ICLR 2025), which D-TRAK's sqnorm features leave out
# dtrak-events = D-TRAK's vectors with the kernel built from every event's features instead of the
# per-sample means: one kernel sum_(z,e) phi phi^T (the Gauss-Newton matrix of the summed objective), or
# one per query timestep bin (each query timestep against the train events in its bin)
CANDIDATES = ("dtrak+retrac", "das", "dtrak-events")
ALL_FAMILIES = FAMILIES + CANDIDATES
# the unprojected reference (--unprojected): the families whose scores are functions of inner products of
# per-sample vectors, so that the dual form (dual_scores) gives them at d = P; never a headline
UNPROJECTED_FAMILIES = FAMILIES + ("dtrak+retrac",)
# dtrak-events inverts one d x d kernel per query-timestep bin, checkpoint and c: scored while d times the
# checkpoints is at most this (d 4096 with 4 checkpoints took 16 minutes on 2 cores), left out above it
MAX_EVENT_KERNEL_COST = 4096 * 4
SQNORM_FAMILIES = ("dtrak", "dtrak+retrac", "das", "dtrak-events")
STARTED = time.perf_counter()


def emit(record: dict) -> None:
    print(json.dumps({**record, "elapsed_s": round(time.perf_counter() - STARTED, 1)}), flush=True)


@dataclass(frozen=True)
class Setting:
    """One featurization setting: events per sample, projection dimension, checkpoints used, and
    the featurization seed (events and projections; ``None`` = ``--seed``)."""

    events: int
    dim: int  # 0: unprojected, the reference every projection approximates (UNPROJECTED)
    checkpoints: str  # "all", "last", or "allK": K checkpoints of the same run (setting_checkpoints)
    seed: int | None = None

    @property
    def name(self) -> str:
        suffix = "" if self.seed is None else f"-seed{self.seed}"
        dim = "unprojected" if self.dim == 0 else f"d{self.dim}"
        return f"S{self.events}-{dim}-{self.checkpoints}{suffix}"


def cached_npy(path: Path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    value = np.asarray(compute())
    atomic_save_npy(path, value)
    return value


# ------------------------------------------------------------------------------------------ data


def build_data(args, out: Path) -> tuple[ImageDataset, ImageDataset]:
    """The pool and the held-out test digits (seeded; saved under ``out/data`` on the first run)."""
    pool_path, heldout_path = out / "data" / "pool.npz", out / "data" / "heldout.npz"
    if not pool_path.is_file():
        train, heldout = split_digits(DemoConfig(seed=args.seed))
        rng = np.random.default_rng(derive_seed("lds-bench-pool", args.seed))
        pool = train.subset(np.sort(rng.choice(len(train), args.pool, replace=False)))
        test = heldout.subset(np.sort(rng.choice(len(heldout), args.heldout, replace=False)))
        pool_path.parent.mkdir(parents=True, exist_ok=True)
        test.save_npz(heldout_path)
        pool.save_npz(pool_path)
    return load_dataset(pool_path), load_dataset(heldout_path)


def generated_images(args, out: Path, last_checkpoint: Path) -> torch.Tensor:
    images = cached_npy(
        out / "data" / "generated.npy",
        lambda: generate_images(
            load_unet(last_checkpoint),
            load_scheduler(last_checkpoint),
            args.generated,
            seed=args.seed,
            num_inference_steps=args.sampling_steps,
            progress=False,
        ).numpy(),
    )
    return torch.from_numpy(images)


def validation_split(num_heldout: int, num_generated: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test rows ``(validation, report)``: a seeded half of each kind (held-out first, then generated)."""
    rng = np.random.default_rng(derive_seed("lds-bench-validation", seed))
    validation, report = [], []
    for offset, count in ((0, num_heldout), (num_heldout, num_generated)):
        order = offset + rng.permutation(count)
        validation.extend(order[: count // 2])
        report.extend(order[count // 2 :])
    return np.sort(validation), np.sort(report)


# ------------------------------------------------------------------------------------------ scores


def variant_names(kernel_cs: list[float]) -> dict[str, list[tuple[str, str, float | None]]]:
    """``{family: [(variant name, vector kind, kernel c or None)]}``; dtrak's come from the sqnorm store."""
    return {
        "tracin": [("tracin", "tracin", None)],
        "retrac": [("retrac", "retrac", None)],
        "trak": [(f"trak-c{c:g}", "tracin", c) for c in kernel_cs],
        "retrac+kernel": [(f"retrac+kernel-c{c:g}", "retrac", c) for c in kernel_cs],
        "dtrak": [(f"dtrak-c{c:g}", "tracin", c) for c in kernel_cs],
        "dtrak+retrac": [(f"dtrak+retrac-c{c:g}", "retrac", c) for c in kernel_cs],
        "das": [(f"das-{kind}-c{c:g}", kind, c) for kind in VECTOR_KINDS for c in kernel_cs],
        "dtrak-events": [
            (f"dtrak-events-{how}-c{c:g}", how, c) for how in ("pooled", "binned") for c in kernel_cs
        ],
    }


def exact_scores(
    store,
    features: list[np.ndarray],
    variants: list[tuple[str, str, float | None]],
    train_weights: np.ndarray | None = None,
    weighted: frozenset[str] = frozenset(),
) -> dict:
    """``{variant: (n, N)}`` scores ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>`` (kernel: ``q_k <-
    (Phi_k^T Phi_k + lambda_k I)^-1 q_k``, ``lambda_k = c mean ||u_k||^2``) from one set of query features.
    ``train_weights`` ``(K, N)``: the terms of the variants named in ``weighted`` are weighted by
    ``r_k(z)`` after the kernel (``das``); each kernel is inverted once for every variant that uses it.

    Computed in float64 with retrac's own ``train_vectors`` / ``query_vectors`` / ``KernelAccumulator``,
    the functions ``build_attribution_index`` and ``Attributor`` use, so that every kernel ``c`` and
    vector kind shares one query-gradient pass; checked against the index path (``check_scores``).
    """
    n = features[0].shape[0]
    out = {name: np.zeros((n, store.num_samples)) for name, _, _ in variants}
    ids = store.ids
    for k, weight in enumerate(store.weights):
        for kind in {kind for _, kind, _ in variants}:
            u = np.concatenate(
                [
                    train_vectors(b.features, b.norms, kind, b.valid, ids[b.start : b.stop])
                    for b in store.blocks(k)
                ]
            ).astype(np.float64)  # (N, d) u_k(z)
            q = query_vectors(features[k], kind).astype(np.float64)  # (n, d) q_k(z')
            gram = KernelAccumulator(store.dim)
            gram.add(u)
            terms = {}  # (n, N) q_c(z') . u_k(z) per kernel c of this kind
            for name, vector_kind, c in variants:
                if vector_kind != kind:
                    continue
                if c not in terms:
                    terms[c] = (q if c is None else q @ gram.preconditioner(c)[0].T) @ u.T
                out[name] += weight * (terms[c] * train_weights[k] if name in weighted else terms[c])
    return out


def event_kernel_scores(
    store, features: list[np.ndarray], variants: list[tuple[str, str, float | None]]
) -> dict:
    """``dtrak-events`` scores from the store's per-event features ``phi_k(z, e)`` and the query's
    per-timestep features ``g_kj``, with ``lambda = c * mean ||phi||^2`` over the kernel's rows:

    * ``pooled``: ``sum_k w_k q_k^T (sum_(z,e) phi phi^T + lambda I)^-1 u_k(z)``, ``q_k = mean_j g_kj``;
    * ``binned``: ``sum_k w_k mean_j g_kj^T (K_kj + lambda_kj I)^-1 sum_(e in bin j) phi_k(z, e) / S``,
      ``K_kj`` over the train events whose timestep lies in query bin ``j`` (``floor(t T_q / T)``).
    """
    n, big_t = features[0].shape[0], store.attrs["task"]["num_train_timesteps"]
    out = {name: np.zeros((n, store.num_samples)) for name, _, _ in variants}
    for k, weight in enumerate(store.weights):
        g = features[k].astype(np.float64).mean(axis=2)  # (n, T_q, d) g_kj
        t_q = g.shape[1]
        phi = np.concatenate([b.features for b in store.blocks(k)]).astype(np.float64)  # (N, S, d)
        times = np.concatenate([b.timesteps for b in store.blocks(k)])  # (N, S)
        bins = times.astype(np.int64) * t_q // big_t  # query bin of every train event
        rows = phi.reshape(-1, phi.shape[2])
        pooled = KernelAccumulator(store.dim)
        pooled.add(rows)
        per_bin = []
        for j in range(t_q):
            mask = bins == j
            gram = KernelAccumulator(store.dim)
            gram.add(phi[mask])
            binned_sum = (phi * mask[..., None]).sum(axis=1)  # (N, d) sum of sample z's events in bin j
            per_bin.append((gram, binned_sum))
        u = phi.mean(axis=1)
        for name, how, c in variants:
            if how == "pooled":
                out[name] += weight * (g.mean(axis=1) @ pooled.preconditioner(c)[0].T) @ u.T
                continue
            for j, (gram, binned_sum) in enumerate(per_bin):
                if gram.count:
                    q_j = g[:, j] @ gram.preconditioner(c)[0].T
                    out[name] += weight * (q_j @ binned_sum.T) / (t_q * phi.shape[1])
    return out


@torch.no_grad()
def train_residuals(store, checkpoints: list[str], pool: ImageDataset) -> np.ndarray:
    """``(K, N)`` residuals ``r_k(z) = sqrt(mean_e ||eps_theta_k(x_t, t) - eps||^2 / D)`` of every pool
    sample at the store's own events (timesteps and noise of ``store.config``): what featurization
    could record at no extra forward pass."""
    config = store.config
    out = np.zeros((len(checkpoints), store.num_samples))
    for k, path in enumerate(checkpoints):
        task = DiffusionTask(load_unet(path), load_scheduler(path), "loss")
        plan = config.schedule.plan(
            store.ids, task.num_train_timesteps, config.seed, [None] * len(checkpoints)
        )
        for start in range(0, store.num_samples, 100):
            rows = list(range(start, min(start + 100, store.num_samples)))
            events = plan.events(k, rows)
            noise = events.noise(tuple(pool.images.shape[1:]))  # (b, S, C, H, W)
            b, s = events.timesteps.shape
            values = task.per_sample_objective(
                pool.images[rows].repeat_interleave(s, dim=0),
                torch.from_numpy(events.timesteps).reshape(-1),
                noise.flatten(0, 1),
            )
            out[k, rows] = values.double().reshape(b, s).mean(dim=1).sqrt().numpy()
    return out


def check_scores(name: str, fast: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference of the fast scores from the index path's, relative to the largest score."""
    error = float(np.abs(fast - reference).max() / np.abs(reference).max())
    if error > 1e-3:
        raise RuntimeError(f"{name}: exact scores differ from the index path by {error:.2e} (relative)")
    return error


def features_key(store, events: QueryEvents, images: torch.Tensor) -> str:
    """What a store's query features depend on: projectors, checkpoints, objective, events, images."""
    record = {
        "projectors": store.attrs["projectors"],
        "checkpoints": [c.sha256 for c in store.checkpoints],
        "objective": store.config.objective,
        "events": events.to_dict(),
        "images": images_sha256(images),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def recipe(args, num_checkpoints: int | None = None) -> DemoConfig:
    """The demo recipe of the pool model and every subset model."""
    default = 4 if not args.quick else 2
    return DemoConfig(seed=args.seed, epochs=args.epochs, num_checkpoints=num_checkpoints or default)


def setting_checkpoints(
    args, out: Path, setting: Setting, checkpoints: list[str], pool: ImageDataset
) -> list[str]:
    """The checkpoints a setting attributes with: the pool model's (``all``), its last (``last``), or
    ``allK``: the same recipe and seed trained again on the pool, saving ``K`` evenly spaced
    checkpoints. Saving does not change the training, so its last checkpoint must equal the pool
    model's, which is checked: the attributed model is the same, only the path sampled is denser."""
    if setting.checkpoints == "all":
        return checkpoints
    if setting.checkpoints == "last":
        return checkpoints[-1:]
    count = int(setting.checkpoints.removeprefix("all"))
    folder = out / "models" / f"pool-{count}-checkpoints"
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.perf_counter()
        DemoTrainer(pool, recipe(args, count))(np.arange(len(pool)), partial)
        partial.rename(folder)
        emit(
            {"stage": "pool model", "checkpoints": count, "seconds": round(time.perf_counter() - started, 1)}
        )
    found = sorted(folder.rglob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    last, reference = load_unet(found[-1]).state_dict(), load_unet(checkpoints[-1]).state_dict()
    if any(not torch.equal(last[name], reference[name]) for name in reference):
        raise RuntimeError(f"{found[-1]} differs from the pool model's last checkpoint {checkpoints[-1]}")
    return [str(p) for p in found]


def setting_store(args, out: Path, setting: Setting, objective: str, used: list[str], pool: ImageDataset):
    """The feature store of ``setting`` for ``objective`` (featurized on first use, reopened after)."""
    seed = args.seed if setting.seed is None else setting.seed
    config = IndexConfig(
        events=f"stratified:{setting.events}", dim=setting.dim, objective=objective, seed=seed
    )
    return featurize_dataset(
        used, pool, out / "stores" / f"{setting.name}-{objective}", config, progress=False
    )


def setting_scores(
    args, out: Path, setting: Setting, checkpoints: list[str], pool: ImageDataset, images: torch.Tensor
) -> dict[str, dict[str, np.ndarray]]:
    """``{family: {variant: (n_test, N) scores}}`` of one setting, cached in ``out/scores/SETTING``.

    Per objective (``loss``; ``sqnorm`` for dtrak): featurize the pool, compute the query features
    once (cached by what they depend on, so the ``S`` sweep shares them), score every variant with
    :func:`exact_scores`; when the features are computed, one variant also goes through a flat index
    and the ``Attributor`` (the path ``retrac lds --index`` takes) and must agree.
    """
    if setting.dim == 0:
        return unprojected_scores(args, out, setting, checkpoints, pool, images)
    folder = out / "scores" / setting.name
    names = variant_names(args.kernel_c)
    used = setting_checkpoints(args, out, setting, checkpoints, pool)
    events = QueryEvents.preset(args.query_events, args.seed)
    affordable = setting.dim * len(used) <= MAX_EVENT_KERNEL_COST
    scored = [f for f in ALL_FAMILIES if f != "dtrak-events" or affordable]
    for objective, families in (
        ("loss", [f for f in scored if f not in SQNORM_FAMILIES]),
        ("sqnorm", [f for f in scored if f in SQNORM_FAMILIES]),
    ):
        variants = [v for f in families for v in names[f]]
        if all((folder / f"{name}.npy").is_file() for name, _, _ in variants):
            continue
        started = time.perf_counter()
        store = setting_store(args, out, setting, objective, used, pool)
        featurized = time.perf_counter()
        cache = out / "query-features" / f"{features_key(store, events, images)}.npz"
        reference = None
        if cache.is_file():
            with np.load(cache) as archive:
                features = [archive[f"k{k}"] for k in range(store.num_checkpoints)]
        else:
            method = Method.named("dtrak") if objective == "sqnorm" else Method.named("tracin")
            directory = out / "indexes" / setting.name / method.name
            build_attribution_index(store, directory, method, index="flat", progress=False)
            attributor = Attributor(directory, query_events=events, progress=False)
            reference = (method, attributor_scores(attributor, images)[method.name])
            features = attributor.query_features(images)
            atomic_save_npz(cache, **{f"k{k}": f for k, f in enumerate(features)})
        queried = time.perf_counter()
        residuals, das = None, frozenset(name for name, _, _ in names["das"])
        if "das" in families:
            residuals = cached_npy(
                out / "residuals" / f"{setting.name}.npy",
                lambda store=store: train_residuals(store, used, pool),
            )
        plain = [v for v in variants if v not in names["dtrak-events"]]
        if setting.dim > store.num_samples:  # the dual form: N x N solves instead of d x d inverses
            terms = projected_terms(store, features)
            scores = dual_scores(terms, store.weights, plain, train_weights=residuals, weighted=das)
        else:
            scores = exact_scores(store, features, plain, train_weights=residuals, weighted=das)
        if "dtrak-events" in families:
            scores.update(event_kernel_scores(store, features, names["dtrak-events"]))
        record = {"stage": "scores", "setting": setting.name, "objective": objective}
        if reference is not None:
            method, matrix = reference
            name = method.name if method.kernel_c is None else f"{method.name}-c{method.kernel_c:g}"
            if name not in scores:  # dtrak's default c is not on the grid: score it too
                scores.update(exact_scores(store, features, [(name, method.vectors, method.kernel_c)]))
            record["max_relative_difference_to_index"] = check_scores(name, scores[name], matrix)
        for name, _, _ in variants:
            atomic_save_npy(folder / f"{name}.npy", scores[name])
        record.update(
            {
                "featurize_s": round(featurized - started, 1),
                "query_s": round(queried - featurized, 1),
                "score_s": round(time.perf_counter() - queried, 1),
            }
        )
        emit(record)
    return {
        family: {name: np.load(folder / f"{name}.npy") for name, _, _ in names[family]} for family in scored
    }


# ------------------------------------------------------------------------------------------ unprojected


def gram_terms(u: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U U^T, U Q^T)`` in float64 of ``(N, d)`` train and ``(n, d)`` query vectors: all that the
    scores of :func:`dual_scores` need, whatever ``d``."""
    u, q = u.astype(np.float64), q.astype(np.float64)
    return u @ u.T, u @ q.T


def dual_scores(
    terms: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    weights: list[float],
    variants: list[tuple[str, str, float | None]],
    train_weights: np.ndarray | None = None,
    weighted: frozenset[str] = frozenset(),
) -> dict:
    """The scores of :func:`exact_scores` in the dual form, from ``terms[kind][k] = (G_k, B_k)``
    (:func:`gram_terms`): ``U (U^T U + lambda I)^-1 q = (U U^T + lambda I)^-1 U q`` (push-through), so a
    kernel is one ``N x N`` solve at any ``d``, ``d = P`` included; ``lambda_k = c mean ||u_k||^2 =
    c tr(G_k) / N`` as in ``KernelAccumulator``; ``train_weights`` and ``weighted`` as there."""
    out = {}
    solved = {}  # (kind, k, c): each kernel solved once for every variant that uses it
    for name, kind, c in variants:
        total = 0.0
        for k, weight in enumerate(weights):
            gram, cross = terms[kind][k]
            if c is not None:
                if (kind, k, c) not in solved:
                    lam = c * np.trace(gram) / gram.shape[0]
                    solved[kind, k, c] = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cross)
                cross = solved[kind, k, c]
            total = total + weight * (cross.T * train_weights[k] if name in weighted else cross.T)
        out[name] = total
    return out


def projected_terms(store, features: list[np.ndarray]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`gram_terms` of a store's train vectors and cached query features, per vector kind."""
    ids = store.ids
    out = {}
    for kind in VECTOR_KINDS:
        out[kind] = []
        for k in range(store.num_checkpoints):
            u = np.concatenate(
                [
                    train_vectors(b.features, b.norms, kind, b.valid, ids[b.start : b.stop])
                    for b in store.blocks(k)
                ]
            )
            out[kind].append(gram_terms(u, query_vectors(features[k], kind)))
    return out


def unprojected_terms(
    store,
    checkpoints: list[str],
    pool: ImageDataset,
    images: torch.Tensor,
    events: QueryEvents,
    batch: int = 20,
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`gram_terms` of the unprojected vectors (the ``exact`` projector, ``d = P``), per vector kind:
    the per-sample gradients at the store's own train events (its plan) and at the query events
    (``Attributor.query_features``'s convention), averaged as ``train_vectors`` / ``query_vectors`` do."""
    config = store.config
    out = {kind: [] for kind in VECTOR_KINDS}
    for k, path in enumerate(checkpoints):
        task = DiffusionTask(load_unet(path), load_scheduler(path), config.objective)
        projector = ExactProjector(task.num_parameters)
        plan = config.schedule.plan(
            store.ids, task.num_train_timesteps, config.seed, [None] * len(checkpoints)
        )
        u = {kind: np.zeros((store.num_samples, projector.dim), np.float32) for kind in VECTOR_KINDS}
        for start in range(0, store.num_samples, batch):
            rows = list(range(start, min(start + batch, store.num_samples)))
            ev = plan.events(k, rows)
            phi, norms = projected_gradients(
                task,
                projector,
                pool.images[rows],
                torch.from_numpy(ev.timesteps),
                ev.noise(task.sample_shape),
                valid=torch.from_numpy(ev.valid),
            )
            for kind in VECTOR_KINDS:
                u[kind][rows] = train_vectors(phi.numpy(), norms.numpy(), kind, ev.valid)
        q = {kind: np.zeros((len(images), projector.dim), np.float32) for kind in VECTOR_KINDS}
        for start in range(0, len(images), 5):  # 5 queries' (T_q, M, P) gradients at a time
            phi = query_event_features(task, projector, images[start : start + 5], events, k)
            for kind in VECTOR_KINDS:
                q[kind][start : start + len(phi)] = query_vectors(phi, kind)
        for kind in VECTOR_KINDS:
            out[kind].append(gram_terms(u[kind], q[kind]))
    return out


def unprojected_scores(
    args, out: Path, setting: Setting, checkpoints: list[str], pool: ImageDataset, images: torch.Tensor
) -> dict[str, dict[str, np.ndarray]]:
    """The reference at ``d = P``: the families of ``UNPROJECTED_FAMILIES`` scored from unprojected
    gradients at the same train and query events as the projected setting at ``--dim``.

    Two checks are recorded: the dual form on that projected setting's vectors gives its primal
    scores (:func:`exact_scores`, the index path's arithmetic) to float64 rounding; and how far the
    projected kernel-free ``tracin`` scores are from the unprojected ones (relative Frobenius)."""
    folder = out / "scores" / setting.name
    names = variant_names(args.kernel_c)
    used = setting_checkpoints(args, out, setting, checkpoints, pool)
    events = QueryEvents.preset(args.query_events, args.seed)
    projected = Setting(setting.events, args.dim, setting.checkpoints, setting.seed)
    for objective, families in (
        ("loss", [f for f in UNPROJECTED_FAMILIES if f not in SQNORM_FAMILIES]),
        ("sqnorm", [f for f in UNPROJECTED_FAMILIES if f in SQNORM_FAMILIES]),
    ):
        variants = [v for f in families for v in names[f]]
        if all((folder / f"{name}.npy").is_file() for name, _, _ in variants):
            continue
        started = time.perf_counter()
        store = setting_store(args, out, projected, objective, used, pool)  # its events; featurized already
        cache = out / "unprojected" / f"{setting.name}-{objective}.npz"
        if cache.is_file():
            with np.load(cache) as archive:
                terms = {
                    kind: [(archive[f"g_{kind}_{k}"], archive[f"b_{kind}_{k}"]) for k in range(len(used))]
                    for kind in VECTOR_KINDS
                }
        else:
            terms = unprojected_terms(store, used, pool, images, events)
            atomic_save_npz(
                cache,
                **{
                    f"{x}_{kind}_{k}": t[i]
                    for kind, ts in terms.items()
                    for k, t in enumerate(ts)
                    for i, x in enumerate("gb")
                },
            )
        gradients = time.perf_counter()
        scores = dual_scores(terms, store.weights, variants)
        record = {"stage": "scores", "setting": setting.name, "objective": objective}
        with np.load(out / "query-features" / f"{features_key(store, events, images)}.npz") as archive:
            features = [archive[f"k{k}"] for k in range(store.num_checkpoints)]
        check = next(v for v in variants if v[2] is not None)
        primal = exact_scores(store, features, [check])[check[0]]
        record["dual_vs_primal_max_relative_difference"] = check_scores(
            check[0], dual_scores(projected_terms(store, features), store.weights, [check])[check[0]], primal
        )
        plain = ("inner-product", "tracin", None)  # tracin's score on this store
        reference = dual_scores(terms, store.weights, [plain])[plain[0]]
        approx = exact_scores(store, features, [plain])[plain[0]]
        record[f"inner_product_projected_d{args.dim}_relative_difference"] = float(
            np.linalg.norm(approx - reference) / np.linalg.norm(reference)
        )
        for name, _, _ in variants:
            atomic_save_npy(folder / f"{name}.npy", scores[name])
        record.update(
            {
                "gradients_s": round(gradients - started, 1),
                "score_s": round(time.perf_counter() - gradients, 1),
            }
        )
        emit(record)
    return {
        family: {name: np.load(folder / f"{name}.npy") for name, _, _ in names[family]}
        for family in UNPROJECTED_FAMILIES
    }


# ------------------------------------------------------------------------------------------ LDS


def subset_losses(run: LDSRun, images: torch.Tensor, count: int) -> np.ndarray:
    """``(count, n_test)`` mean losses on the first ``count`` subset models (trained if missing)."""
    started = time.perf_counter()
    before = len(run.trained)
    out = np.stack(
        [
            run.model_losses(name, rows, images).mean(axis=1)
            for name, rows in zip(run.subset_names[:count], run.subsets[:count], strict=True)
        ]
    )
    if len(run.trained) > before:
        emit(
            {
                "stage": "subset models",
                "count": count,
                "trained_now": len(run.trained) - before,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return out


class Evaluator:
    """LDS of score matrices on the validation and report splits against the first M subsets."""

    def __init__(
        self,
        masks: np.ndarray,
        losses: np.ndarray,
        validation: np.ndarray,
        report: np.ndarray,
        kinds: dict,
        bootstrap: int,
    ) -> None:
        self.masks, self.losses = masks, losses
        self.validation, self.report, self.kinds = validation, report, kinds
        self.bootstrap = bootstrap

    def validation_lds(self, scores: np.ndarray, centered: bool = False) -> float:
        return lds_score(
            "v", scores, self.masks, self.losses, self.validation, num_resamples=10, centered=centered
        ).lds

    def report_record(self, name: str, scores: np.ndarray, centered: bool = False) -> dict:
        """Report-split LDS (or test-specific LDS) with its interval, by test kind, and on validation."""
        result = lds_score(
            name, scores, self.masks, self.losses, self.report, self.bootstrap, centered=centered
        )
        record = {
            "lds": result.lds,
            "ci": [result.ci_low, result.ci_high],
            "validation_lds": self.validation_lds(scores, centered),
        }
        for kind, rows in self.kinds.items():
            rows = np.intersect1d(rows, self.report)
            record[f"lds_{kind}"] = lds_score(
                name, scores, self.masks, self.losses, rows, num_resamples=10, centered=centered
            ).lds
        return record

    def best_variant(self, variants: dict[str, np.ndarray], centered: bool = False) -> str:
        """The variant (kernel c, pixel similarity) with the best validation LDS."""
        values = {name: self.validation_lds(s, centered) for name, s in variants.items()}
        return max(values, key=values.get)

    def chosen_record(self, name: str, variants: dict[str, np.ndarray]) -> dict:
        """Report records of the validation-chosen variant, for the LDS and the test-specific LDS."""
        chosen, specific = self.best_variant(variants), self.best_variant(variants, centered=True)
        return {
            "variant": chosen,
            **self.report_record(name, variants[chosen]),
            "test_specific": {
                "variant": specific,
                **self.report_record(name, variants[specific], centered=True),
            },
        }


def evaluate(evaluator: Evaluator, all_scores: dict[str, dict], baselines: dict[str, np.ndarray]) -> dict:
    """Per setting and family: the validation-chosen variant and its report LDS (and test-specific
    LDS, chosen on its own validation figure); each family's headline setting; the baselines; and
    how far each family moves between featurization seeds of one setting."""
    table = {
        setting: {family: evaluator.chosen_record(family, variants) for family, variants in families.items()}
        for setting, families in all_scores.items()
    }
    headlines, headlines_specific = {}, {}
    projected = [s for s in table if "-unprojected-" not in s]  # the d = P reference is never a headline
    for family in ALL_FAMILIES:
        scored = [s for s in projected if family in table[s]]  # dtrak-events is left out at large d
        setting = max(scored, key=lambda s, f=family: table[s][f]["validation_lds"])
        headlines[family] = {"setting": setting, **table[setting][family]}
        setting = max(scored, key=lambda s, f=family: table[s][f]["test_specific"]["validation_lds"])
        headlines_specific[family] = {"setting": setting, **table[setting][family]["test_specific"]}
    pixels = {k: v for k, v in baselines.items() if k.startswith("pixel")}
    base = {
        "pixel_nn": evaluator.chosen_record("pixel", pixels),
        "random": {
            **evaluator.report_record("random", baselines["random"]),
            "test_specific": evaluator.report_record("random", baselines["random"], centered=True),
        },
    }
    seeds = {}
    for setting in table:
        head, sep, seed = setting.rpartition("-seed")
        if sep and head in table:
            seeds[setting] = {
                family: {
                    "lds": [table[head][family]["lds"], table[setting][family]["lds"]],
                    "test_specific": [
                        table[head][family]["test_specific"]["lds"],
                        table[setting][family]["test_specific"]["lds"],
                    ],
                }
                for family in table[setting]
            }
    return {
        "table": table,
        "headlines": headlines,
        "headlines_test_specific": headlines_specific,
        "baselines": base,
        "featurize_seeds": seeds,
    }


def _c(variant: str) -> str:
    return variant.rpartition("-c")[2] if "-c" in variant else ""


def markdown(result: dict, n_subsets: int) -> str:
    lines = [
        f"LDS on the report split ({n_subsets} subsets, 50 test samples; 95% bootstrap CI over test samples; "
        "kernel c chosen on the validation split, separately for each column)",
        "",
        "| setting | method | c | LDS | 95% CI | held-out | generated | c | test-specific LDS | 95% CI |",
        "|---|---|---|---:|---|---:|---:|---|---:|---|",
    ]

    def row(setting: str, label: str, r: dict) -> str:
        t = r["test_specific"]
        return (
            f"| {setting} | {label} | {_c(r.get('variant', ''))} | {r['lds']:.3f} | "
            f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['lds_heldout']:.3f} | {r['lds_generated']:.3f} | "
            f"{_c(t.get('variant', ''))} | {t['lds']:.3f} | [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] |"
        )

    for setting, families in result["table"].items():
        lines.extend(row(setting, family, r) for family, r in families.items())
    for name, r in result["baselines"].items():
        label = f"{name} ({r['variant']})" if "variant" in r else name
        lines.append(row("-", label, r))
    return "\n".join(lines)


def label_share(scores: np.ndarray, query_labels: np.ndarray, pool_labels: np.ndarray, k: int) -> float:
    """Share of each query's ``k`` highest-scoring pool samples whose label is the query's."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((pool_labels[top] == query_labels[:, None]).mean())


def summary(result: dict, n_subsets: int, n_test: int, n_report: int) -> dict:
    heads, specific, base = result["headlines"], result["headlines_test_specific"], result["baselines"]
    default = max(FAMILIES, key=lambda f: heads[f]["validation_lds"])
    default_specific = max(FAMILIES, key=lambda f: specific[f]["validation_lds"])
    best = max(heads, key=lambda f: heads[f]["lds"])
    record = {
        "default_method": default,
        "default_setting": heads[default]["setting"],
        "lds_default": heads[default]["lds"],
        "lds_default_ci": heads[default]["ci"],
        "lds_pixel_nn": base["pixel_nn"]["lds"],
        "lds_pixel_nn_ci": base["pixel_nn"]["ci"],
        "pixel_nn_similarity": base["pixel_nn"]["variant"],
        "lds_random": base["random"]["lds"],
    }
    for family in ALL_FAMILIES:
        key = "lds_" + family.replace("+", "_").replace("-", "_")
        record[key] = heads[family]["lds"]
        record[key + "_ci"] = heads[family]["ci"]
        record[key + "_setting"] = f"{heads[family]['setting']} {heads[family]['variant']}"
    record["best_on_report"] = best
    record["default_within_ci_of_best"] = heads[best]["lds"] <= heads[default]["ci"][1]
    record["ratio_default_to_pixel_nn"] = (
        record["lds_default"] / record["lds_pixel_nn"] if record["lds_pixel_nn"] > 0 else None
    )
    record["default_method_test_specific"] = default_specific
    record["default_setting_test_specific"] = specific[default_specific]["setting"]
    for family in ALL_FAMILIES:
        key = "lds_" + family.replace("+", "_").replace("-", "_") + "_test_specific"
        record[key] = specific[family]["lds"]
        record[key + "_ci"] = specific[family]["ci"]
        record[key + "_setting"] = f"{specific[family]['setting']} {specific[family]['variant']}"
    record["lds_pixel_nn_test_specific"] = base["pixel_nn"]["test_specific"]["lds"]
    record["lds_pixel_nn_test_specific_ci"] = base["pixel_nn"]["test_specific"]["ci"]
    record["lds_random_test_specific"] = base["random"]["test_specific"]["lds"]
    record["featurize_seeds"] = result["featurize_seeds"]
    for setting, families in result["table"].items():  # the d = P reference, beside the headlines
        if "-unprojected-" in setting:
            record["unprojected"] = {
                "setting": setting,
                **{
                    family: {
                        "variant": r["variant"],
                        "lds": r["lds"],
                        "ci": r["ci"],
                        "test_specific": r["test_specific"]["lds"],
                    }
                    for family, r in families.items()
                },
            }
            if base["pixel_nn"]["lds"] > 0:
                record["ratio_unprojected_dtrak_to_pixel_nn"] = (
                    families["dtrak"]["lds"] / base["pixel_nn"]["lds"]
                )
    record.update(
        {"n_subsets": n_subsets, "n_test": n_test, "n_report": n_report, "n_validation": n_test - n_report}
    )
    return record


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lds-bench", help="artifact folder, reused (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 60-sample pool, 4 subsets, tiny settings"
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--pool", type=int, default=1000, help="training pool size (default: %(default)s)")
    parser.add_argument(
        "--subsets", type=int, default=64, help="random half subsets in all (default: %(default)s)"
    )
    parser.add_argument(
        "--min-subsets", type=int, default=32, help="subsets trained first (default: %(default)s)"
    )
    parser.add_argument("--heldout", type=int, default=50, help="held-out test digits (default: %(default)s)")
    parser.add_argument(
        "--generated", type=int, default=50, help="generated test digits (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=40, help="demo recipe epochs (default: %(default)s)")
    parser.add_argument("--sampling-steps", type=int, default=1000, help="DDPM steps of the generated digits")
    parser.add_argument(
        "--events", default="1,4,10,32,100", help="events per sample S (default: %(default)s)"
    )
    parser.add_argument(
        "--dim", type=int, default=512, help="projection dim of the S sweep (default: %(default)s)"
    )
    parser.add_argument(
        "--dims", default="128,2048", help="other dims, at --dim-events (default: %(default)s)"
    )
    parser.add_argument("--dim-events", type=int, default=10, help="S of the dim and checkpoint sweeps")
    parser.add_argument(
        "--checkpoint-counts",
        default="",
        help="more checkpoints of the pool model's training (e.g. 8,16: the recipe trained again saving "
        "that many), at --dim-events and --dim (default: none)",
    )
    parser.add_argument(
        "--featurize-seeds",
        default="1,2",
        help="other featurization seeds (events, projections) of the --dim-events setting: how much a "
        "method's LDS moves with the random events alone (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-c", default="0.001,0.01,0.1,1", help="kernel c candidates (default: %(default)s)"
    )
    parser.add_argument("--query-events", default="default", choices=["default", "fast", "paper"])
    parser.add_argument("--loss-events", default="50x4", help="loss events TxM (default: %(default)s)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)"
    )
    parser.add_argument(
        "--counterfactual-k", type=int, default=20, help="proponents removed (default: %(default)s)"
    )
    parser.add_argument(
        "--counterfactual-queries", type=int, default=8, help="(default: %(default)s); 0 = skip"
    )
    parser.add_argument(
        "--unprojected",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the --dim-events setting from unprojected gradients (d = P, the dual form): "
        "the reference every projection dimension approximates; never a headline (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    try:
        args.checkpoint_counts = [int(x) for x in args.checkpoint_counts.split(",") if x]
    except ValueError:
        parser.error(f"--checkpoint-counts takes whole numbers like 8,16, not {args.checkpoint_counts!r}")
    if any(count < 1 for count in args.checkpoint_counts):
        parser.error("--checkpoint-counts: each count must be at least 1")
    if args.quick:
        args.pool, args.subsets, args.min_subsets, args.heldout, args.generated = 60, 4, 3, 4, 4
        args.epochs, args.sampling_steps, args.events, args.dims = 2, 20, "1,2", "32"
        args.dim, args.dim_events, args.loss_events, args.bootstrap = 64, 1, "4x1", 100
        args.counterfactual_k, args.counterfactual_queries, args.kernel_c = 3, 2, "0.1,1"
        args.featurize_seeds = "1"
    torch.set_num_threads(args.threads)
    args.kernel_c = [float(c) for c in args.kernel_c.split(",")]
    events = [int(s) for s in args.events.split(",")]
    dims = [int(d) for d in args.dims.split(",") if d]
    loss_t, _, loss_m = args.loss_events.partition("x")
    out = Path(args.out)

    pool, heldout = build_data(args, out)
    config = LDSConfig(args.subsets, 0.5, args.seed, int(loss_t), int(loss_m))
    run = LDSRun(out / "run", pool, DemoTrainer(pool, recipe(args)), config, progress=False)
    started = time.perf_counter()
    last = run.model("full", np.arange(len(pool)))
    checkpoints = sorted((last.parent).glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    checkpoints = [str(p) for p in checkpoints]
    images = torch.cat([heldout.images, generated_images(args, out, last)])
    n_test = len(images)
    validation, report = validation_split(len(heldout), args.generated, args.seed)
    kinds = {"heldout": np.arange(len(heldout)), "generated": np.arange(len(heldout), n_test)}
    emit(
        {
            "stage": "setup",
            "pool": len(pool),
            "checkpoints": len(checkpoints),
            "n_test": n_test,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )

    baselines = {
        "pixel (-L2)": pixel_scores(images, pool.images, "neg_l2"),
        "pixel (cosine)": pixel_scores(images, pool.images, "cosine"),
        "random": random_scores(n_test, len(pool), args.seed),
    }
    settings = [Setting(s, args.dim, "all") for s in events if s <= args.dim_events]
    settings += [Setting(args.dim_events, d, "all") for d in dims if d < args.dim]
    settings += [Setting(args.dim_events, args.dim, "last")]
    settings += [Setting(s, args.dim, "all") for s in events if args.dim_events < s <= 32]
    settings += [Setting(args.dim_events, d, "all") for d in dims if d > args.dim]
    settings += [Setting(args.dim_events, args.dim, f"all{count}") for count in args.checkpoint_counts]
    if args.unprojected:  # after the setting whose train and query events it reuses
        if args.dim_events not in events:
            settings.insert(0, Setting(args.dim_events, args.dim, "all"))
        settings += [Setting(args.dim_events, 0, "all")]
    seeds = [int(x) for x in args.featurize_seeds.split(",") if x and int(x) != args.seed]
    settings += [Setting(args.dim_events, args.dim, "all", seed) for seed in seeds]
    late = [Setting(s, args.dim, "all") for s in events if s > 32]

    all_scores: dict[str, dict] = {}
    checks: dict[str, dict] = {}

    def report_now(count: int) -> dict:
        losses = subset_losses(run, images, count)
        evaluator = Evaluator(run.masks()[:count], losses, validation, report, kinds, args.bootstrap)
        result = evaluate(evaluator, all_scores, baselines)
        record = summary(result, count, n_test, len(report))
        atomic_write_json(out / "results.json", {"summary": record, **result, "counterfactual": checks})
        atomic_write_text(out / "table.md", markdown(result, count) + "\n")
        emit({"stage": "lds", "settings": list(all_scores), **record})
        return result

    def counterfactual(result: dict) -> dict:
        """Remove the top-k proponents under the default method and under pixel similarity."""
        heads = result["headlines"]
        method = summary(result, 0, n_test, len(report))["default_method"]
        setting, variant = heads[method]["setting"], heads[method]["variant"]
        half = args.counterfactual_queries // 2  # held-out and generated test samples alike
        rows = np.concatenate(
            [
                np.intersect1d(report, kinds["heldout"])[: args.counterfactual_queries - half],
                np.intersect1d(report, kinds["generated"])[:half],
            ]
        )
        pixel = result["baselines"]["pixel_nn"]["variant"]
        started = time.perf_counter()
        out_checks = {}
        for name, matrix, label in (
            (method, all_scores[setting][method][variant], f"{setting} {variant}"),
            ("pixel_nn", baselines[pixel], pixel),
        ):
            check = counterfactual_check(run, matrix[rows], images[rows], args.counterfactual_k, name)
            out_checks[name] = {"scores": label, **check.to_dict()}
        emit(
            {
                "stage": "counterfactual",
                "k": args.counterfactual_k,
                "rows": rows.tolist(),
                "seconds": round(time.perf_counter() - started, 1),
                **{
                    f"{n}_{key}": c[key]
                    for n, c in out_checks.items()
                    for key in ("scores", "mean_delta_top", "mean_delta_random", "share_top_above_random")
                },
            }
        )
        return out_checks

    count = min(args.min_subsets, args.subsets)
    for setting in settings:
        all_scores[setting.name] = setting_scores(args, out, setting, checkpoints, pool, images)
        result = report_now(count)
    count = args.subsets  # every subset before the counterfactual check and the most expensive settings
    result = report_now(count)
    if args.counterfactual_queries:
        checks.update(counterfactual(result))
        result = report_now(count)
    for setting in late:
        all_scores[setting.name] = setting_scores(args, out, setting, checkpoints, pool, images)
        result = report_now(count)
    default = summary(result, count, n_test, len(report))["default_method"]
    if args.counterfactual_queries and default not in checks:  # the late settings changed the default
        checks.clear()
        checks.update(counterfactual(result))
        result = report_now(count)

    print(markdown(result, count), flush=True)
    final = summary(result, count, n_test, len(report))
    # the label check: top-10 proponents of the held-out test digits (report split) sharing the query's label
    rows = np.intersect1d(report, kinds["heldout"])
    heads = result["headlines"]
    matrices = {f: all_scores[heads[f]["setting"]][f][heads[f]["variant"]] for f in ALL_FAMILIES}
    matrices["pixel_nn"] = baselines[result["baselines"]["pixel_nn"]["variant"]]
    final["label_share_top10"] = {
        name: label_share(matrix[rows], heldout.labels.numpy()[rows], pool.labels.numpy(), 10)
        for name, matrix in matrices.items()
    }
    for name, check in checks.items():
        final[f"counterfactual_{name.replace('+', '_')}"] = {
            k: check[k]
            for k in (
                "scores",
                "k",
                "n_test",
                "mean_delta_top",
                "mean_delta_random",
                "share_top_above_random",
            )
        }
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
