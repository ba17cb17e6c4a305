"""The paper's timestep-induced bias, measured: Diffusion-TracIn vs Diffusion-ReTrac on the demo.

Setup (Xie et al., TMLR 2024, section 5, scaled down to the demo):

* **Data and model**: the demo DDPM (``retrac.demo.train_digits_ddpm``) trained on scikit-learn's
  digits with ``--outliers`` (default 32, 2% of the training set) planted out-of-distribution photo
  patches, ids ``outlier-NNN`` (the paper plants MNIST zeros among CIFAR-10 images). Default training:
  the demo's 40 epochs, 4 checkpoints, MSE on epsilon; the training-event log is kept.
* **Events**: two stores over the same checkpoints, with the IndexConfig default projector and dim:
  ``replay`` -- the paper's Diffusion-TracIn uses the timestep each sample actually saw, one event
  per sample per checkpoint. The demo saves a checkpoint every 10 epochs, so the log holds 10 events
  per sample per interval, and ``replay`` would average all of them. The benchmark therefore writes a
  thinned log (``events-last.npz``) with each sample's *last* event before each checkpoint, so
  ``replay`` gives exactly one logged ``(t, noise)`` per sample per checkpoint, as in the paper.
  ``stratified:1`` -- one timestep drawn uniformly per sample and checkpoint (fresh noise), the
  same count of events from a seeded draw instead of the log.
* **Queries**: ``Q`` = ``--heldout`` held-out digits + ``--generated`` digits sampled from the last
  checkpoint (default 32 + 32), query events ``T_q x M`` = 10 x 2.
* **Measurements** (``retrac.bias``): top-``k`` proponents under TracIn and ReTrac (flat indexes,
  exact): distinct samples over all lists, generally influential samples (in the top-k of at least
  ``max(2, ceil(0.1 Q))`` queries), the share of planted outliers in the top-k lists, the Spearman
  correlation of norm and timestep over the replay events, and of a sample's mean influence with the
  mean gradient norm (and the mean timestep) of its events.

Prints one JSON line per stage and, as the last line, one JSON object with ``unique_topk_tracin``,
``unique_topk_retrac``, ``general_influential_tracin``, ``general_influential_retrac``,
``outlier_share_tracin``, ``outlier_share_retrac``, ``norm_timestep_spearman`` (replay events) and
the ratios ReTrac / TracIn; the ``*_stratified`` keys repeat the figures on the stratified store.
With ``--paper-setting``, the official code's choices instead: L1 objective, replayed events, query
events 100 x 16, and two stores, the last checkpoint alone (``*_paper_last``) and all checkpoints
(``*_paper_all``).

Usage::

    python benchmarks/paper.py --out /tmp/paper --threads 1      # 31 min measured on 2 shared, busy cores:
                                                                 # stores 10 + 5 min, queries 2 min, 2 x 6 min
    python benchmarks/paper.py --out /tmp/paper-quick --quick    # 4 epochs, 3 checkpoints, 8 + 8 queries

``--out`` keeps every artifact (trained demo, stores, indexes, the query images
``queries-H-G.npy``, ``report/bias-replay.html`` and ``report/bias-stratified.html``); a trained
demo of the same configuration found there is reused, as are complete stores, indexes and queries.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from retrac.bias import measure_bias
from retrac.checkpoints import load_scheduler, load_unet
from retrac.data import load_dataset
from retrac.demo import DemoConfig, train_digits_ddpm
from retrac.events import TrainingEventLog
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index
from retrac.sampling import generate_images


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


TRAINING_FIELDS = (
    "seed",
    "epochs",
    "batch_size",
    "learning_rate",
    "num_checkpoints",
    "num_heldout",
    "num_train_timesteps",
    "planted_outliers",
    "duplicated_samples",
    "duplicate_copies",
)


def trained_demo(config: DemoConfig, out: Path) -> dict:
    """Train the demo under ``out`` unless a run with the same training settings is already there
    (the demo's store and report settings do not matter here)."""
    summary_path = out / "demo.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        recorded, wanted = summary.get("config", {}), asdict(config)
        if all(recorded.get(f) == wanted[f] for f in TRAINING_FIELDS) and "events" in summary:
            return summary
    return train_digits_ddpm(config, out, progress=False)


def last_event_log(log_path: str | Path, out: Path) -> Path:
    """A copy of the training-event log with only each sample's last event in each checkpoint interval."""
    log = TrainingEventLog.load(log_path)
    order = np.lexsort((log.step, log.sample_id, log.interval))  # by interval, sample, then step
    keys = np.char.add(log.interval[order].astype(str), np.char.add("/", log.sample_id[order].astype(str)))
    last = order[np.r_[keys[1:] != keys[:-1], True]]  # the last step of each (interval, sample)
    last = np.sort(last)
    thinned = TrainingEventLog(
        sample_id=log.sample_id[last],
        timestep=log.timestep[last],
        noise_seed=log.noise_seed[last],
        step=log.step[last],
        interval=log.interval[last],
        checkpoint_steps=log.checkpoint_steps,
    )
    path = out / "events-last.npz"
    if not path.is_file():  # a rewrite would change nothing but could race a reader
        thinned.save(path)
    return path


def store_and_indexes(
    checkpoints, train_path, out: Path, events: str, objective: str = "loss"
) -> tuple[FeatureStore, list[Path]]:
    store = featurize_dataset(
        checkpoints,
        train_path,
        out / "store",
        IndexConfig(events=events, objective=objective),
        progress=False,
    )
    indexes = []
    for method in ("tracin", "retrac"):
        directory = out / f"index-{method}"
        if not (directory / "manifest.json").is_file():
            build_attribution_index(store, directory, method, index="flat", progress=False)
        indexes.append(directory)
    return store, indexes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="paper-bench", help="artifact folder, reused (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="4 epochs, 3 checkpoints, 8 + 8 queries")
    parser.add_argument("--outliers", type=int, default=32, help="planted outliers (default: %(default)s)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out queries (default: 32, quick 8)")
    parser.add_argument(
        "--generated", type=int, default=None, help="generated queries (default: 32, quick 8)"
    )
    parser.add_argument("--k", type=int, default=10, help="top-k proponents per query (default: %(default)s)")
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="generally influential: in >= this share of top-k lists"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-report", action="store_true", help="skip writing report/bias.html")
    parser.add_argument(
        "--paper-setting",
        action="store_true",
        help="the official code's choices instead: L1 objective, replayed events, 100 x 16 query events, "
        "the last checkpoint alone and all checkpoints (stores paper-last/ and paper-all/)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    config = DemoConfig(**{**asdict(base), "planted_outliers": args.outliers})
    num_heldout = args.heldout if args.heldout is not None else (8 if args.quick else 32)
    num_generated = args.generated if args.generated is not None else (8 if args.quick else 32)
    out = Path(args.out)
    started = time.perf_counter()

    summary = trained_demo(config, out / "demo")
    checkpoints = [c["path"] for c in summary["checkpoints"]]
    emit({"stage": "train", "seconds": round(time.perf_counter() - started, 1), "config": asdict(config)})
    planted = json.loads((out / "demo" / "planted.json").read_text())["outliers"]

    replay_log = last_event_log(summary["events"], out / "demo")
    # name -> (events, objective, checkpoints)
    schedules = {
        "replay": (f"replay:{replay_log}", "loss", checkpoints),
        "stratified": ("stratified:1", "loss", checkpoints),
    }
    query_events = QueryEvents()  # 10 x 2
    if args.paper_setting:
        schedules = {
            "paper-last": (f"replay:{replay_log}", "l1", checkpoints[-1:]),
            "paper-all": (f"replay:{replay_log}", "l1", checkpoints),
        }
        query_events = QueryEvents.preset("paper")  # 100 timesteps x 16 noise draws
    built = {}
    for name, (events, objective, used) in schedules.items():
        began = time.perf_counter()
        built[name] = store_and_indexes(used, summary["train"], out / name, events, objective)
        store = built[name][0]
        emit(
            {
                "stage": f"store {name}",
                "events": events,
                "objective": objective,
                "samples": store.num_samples,
                "checkpoints": store.num_checkpoints,
                "events_per_sample": store.num_events,
                "dim": store.dim,
                "projector": store.config.projector,
                "seconds": round(time.perf_counter() - began, 1),
            }
        )

    began = time.perf_counter()
    heldout = load_dataset(summary["heldout"]).subset(range(num_heldout))
    queries_path = out / f"queries-{num_heldout}-{num_generated}.npy"  # held-out then generated
    if queries_path.is_file():
        queries = torch.from_numpy(np.load(queries_path))
    else:
        final = checkpoints[-1]
        generated = generate_images(
            load_unet(final), load_scheduler(final), max(num_generated, 1), seed=config.seed, progress=False
        )[:num_generated]
        queries = torch.cat([heldout.images, generated])
        np.save(queries_path, queries.numpy())
    captions = [f"held-out {i} (label {int(y)})" for i, y in zip(heldout.ids, heldout.labels, strict=True)]
    captions += [f"generated {i}" for i in range(num_generated)]
    emit(
        {
            "stage": "queries",
            "heldout": num_heldout,
            "generated": num_generated,
            "seconds": round(time.perf_counter() - began, 1),
        }
    )

    measured = {}
    for name, (_store, indexes) in built.items():
        began = time.perf_counter()
        attributor = Attributor(indexes, query_events=query_events, progress=False)
        measured[name] = measure_bias(
            attributor, queries, args.k, outlier_ids=planted, fraction=args.fraction
        )
        emit(
            {
                "stage": f"measure {name}",
                **measured[name].to_dict(),
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
        if not args.no_report:
            from retrac.report.bias import write_bias_report

            train = load_dataset(summary["train"])
            write_bias_report(
                out / "report",
                measured[name],
                list(zip(captions, queries, strict=True)),
                train,
                title=f"Timestep-induced bias: {name} events",
                filename=f"bias-{name}.html",
            )

    final_record: dict = {
        "benchmark": "paper",
        "k": args.k,
        "queries": len(queries),
        "fraction": args.fraction,
        "query_events": query_events.to_dict(),
    }
    for name in built:
        suffix = "" if name == "replay" else "_" + name.replace("-", "_")
        m = measured[name]
        tracin, retrac = m.topk["tracin"], m.topk["retrac"]
        final_record.update(
            {
                f"unique_topk_tracin{suffix}": tracin.unique,
                f"unique_topk_retrac{suffix}": retrac.unique,
                f"general_influential_tracin{suffix}": tracin.general_influential,
                f"general_influential_retrac{suffix}": retrac.general_influential,
                f"general_ratio_retrac_over_tracin{suffix}": (
                    round(retrac.general_influential / tracin.general_influential, 4)
                    if tracin.general_influential
                    else None
                ),
                f"unique_ratio_retrac_over_tracin{suffix}": round(retrac.unique / max(tracin.unique, 1), 4),
                f"outlier_share_tracin{suffix}": round(tracin.outlier_share, 6),
                f"outlier_share_retrac{suffix}": round(retrac.outlier_share, 6),
                f"general_outliers_tracin{suffix}": tracin.general_outliers,
                f"general_outliers_retrac{suffix}": retrac.general_outliers,
                f"norm_timestep_spearman{suffix}": round(m.norm_timestep_spearman, 4),
                f"influence_norm_spearman_tracin{suffix}": round(m.influence_norm_spearman["tracin"], 4),
                f"influence_norm_spearman_retrac{suffix}": round(m.influence_norm_spearman["retrac"], 4),
                f"influence_timestep_spearman_tracin{suffix}": round(
                    m.influence_timestep_spearman["tracin"], 4
                ),
                f"influence_timestep_spearman_retrac{suffix}": round(
                    m.influence_timestep_spearman["retrac"], 4
                ),
                f"max_frequency_share_tracin{suffix}": round(tracin.max_frequency_share, 4),
                f"max_frequency_share_retrac{suffix}": round(retrac.max_frequency_share, 4),
            }
        )
    final_record["outlier_base_rate"] = round(
        next(iter(measured.values())).topk["tracin"].outlier_base_rate, 6
    )
    final_record["seconds"] = round(time.perf_counter() - started, 1)
    emit(final_record)


if __name__ == "__main__":
    main()
