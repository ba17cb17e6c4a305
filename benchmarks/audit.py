"""Memorization audit on the planted-duplicates demo: do the audit's verdicts and attributions find the copies?

The demo DDPM is trained on scikit-learn's digits with ``--duplicated-samples`` digits repeated
``--duplicate-copies`` times each (``DemoConfig.duplicated_samples`` / ``duplicate_copies``; heavy
duplication makes diffusion models memorize). Then: featurize the training set, build flat TracIn
and ReTrac indexes, sample ``--generate`` digits from the last checkpoint (DDPM with
``--sampling-steps`` reverse steps) and audit them with ``retrac.audit.run_audit``.

Figures (the last line printed is one JSON object with all of them):

* ``copy_rate``: share of generated images with verdict ``copy``;
* ``copy_of_planted_rate``: share of those whose nearest training image is a planted duplicate;
* ``top1_retrac_hits_copied`` / ``top1_tracin_hits_copied``: for those, how often the top-1 ReTrac /
  TracIn proponent is the duplicated digit (the original or any of its copies); the chance level of
  a uniformly drawn training row is ``chance_top1_planted_group`` (copies / N);
* ``top1_default_hits_copied`` / ``top1_default_hits_flagged``: the same for the default method
  (``dtrak``, on a ``sqnorm`` store of its own, auditing the same generated images);
* ``flagged_*``: the same figures for the images flagged ``copy`` or ``near``; ``nn_in_top_k_*``: how
  often the nearest training image is among the top-k proponents; ``top1_*_most_common``: the
  training sample that is top-1 proponent of the most outputs (TracIn's timestep-induced bias);
* ``planted_in_top_self_influence``: planted digits with a row (original or copy) in the top 1% of
  the self-influence ranking ``SI(z) = sum_k w_k ||u_k(z)||^2``; ``planted_self_influence_ranks``
  gives each planted digit's best rank and its rows' median rank; ``*_chance`` is the expected count
  if the ranking were a random permutation.

Intermediate JSON lines report each stage and its seconds. Usage::

    python benchmarks/audit.py --out /tmp/audit-demo            # reuses what /tmp/audit-demo already holds
    python benchmarks/audit.py --out DIR --generate 300 --sampling-steps 100 --events stratified:1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from retrac.audit import AuditConfig, run_audit
from retrac.demo import DemoConfig, train_digits_ddpm
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.indexer.store import FeatureStore
from retrac.query.attribution import QueryEvents, build_attribution_index
from retrac.query.vectors import DEFAULT_SQNORM_METHOD


def mean_or_none(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def trained(config: DemoConfig, out: Path) -> dict:
    """Train the demo into ``out``, or reuse the training already there when its config matches."""
    demo_json = out / "demo.json"
    if demo_json.is_file():
        summary = json.loads(demo_json.read_text())
        if summary.get("config") == config.__dict__:
            emit(stage="train", reused=str(out), final_loss=summary["final_loss"], seconds=0.0)
            return summary
        raise SystemExit(f"{out} holds a demo trained with another config; give another --out.")
    started = time.perf_counter()
    summary = train_digits_ddpm(config, out, progress=False)
    emit(stage="train", final_loss=summary["final_loss"], seconds=round(time.perf_counter() - started, 1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="audit-demo", help="work folder, reused when it holds earlier stages"
    )
    parser.add_argument("--duplicated-samples", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--duplicate-copies", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=40, help="demo training epochs (default: %(default)s)")
    parser.add_argument("--events", default="stratified:1", help="training events (default: %(default)s)")
    parser.add_argument("--projector", default="dense", help="(default: %(default)s)")
    parser.add_argument("--dim", type=int, default=None, help="projection dim (default: IndexConfig's)")
    parser.add_argument(
        "--checkpoints", type=int, default=None, help="index only the last C checkpoints (default: all)"
    )
    parser.add_argument("--generate", type=int, default=300, help="generated images (default: %(default)s)")
    parser.add_argument(
        "--sampling-steps", type=int, default=100, help="DDPM reverse steps (default: %(default)s)"
    )
    parser.add_argument(
        "--query-events", default="fast", choices=["default", "fast", "paper"], help="(default: %(default)s)"
    )
    parser.add_argument("--k", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total_started = time.perf_counter()

    config = DemoConfig(
        duplicated_samples=args.duplicated_samples, duplicate_copies=args.duplicate_copies, epochs=args.epochs
    )
    summary = trained(config, out)
    planted = json.loads((out / "planted.json").read_text())["duplicated"]
    group_of = {i: original for original, copies in planted.items() for i in [original, *copies]}

    started = time.perf_counter()
    checkpoints = [c["path"] for c in summary["checkpoints"]]
    if args.checkpoints:
        checkpoints = checkpoints[-args.checkpoints :]
    index_config = IndexConfig(events=args.events, projector=args.projector, dim=args.dim, seed=0)
    store = featurize_dataset(checkpoints, summary["train"], out / "store", index_config, progress=False)
    sample_events = store.num_samples * store.num_checkpoints * store.num_events
    seconds = time.perf_counter() - started
    emit(
        stage="featurize",
        samples=store.num_samples,
        checkpoints=store.num_checkpoints,
        events=args.events,
        projector=store.config.projector,
        dim=store.dim,
        seconds=round(seconds, 1),
        sample_events_per_s=round(sample_events / seconds, 1),
    )

    started = time.perf_counter()
    indexes = []
    for method in ("retrac", "tracin"):
        indexes.append(out / f"index-{method}")
        if not (indexes[-1] / "manifest.json").is_file():
            build_attribution_index(
                FeatureStore.open(store.path), indexes[-1], method, index="flat", progress=False
            )
    emit(stage="build", seconds=round(time.perf_counter() - started, 1))

    started = time.perf_counter()
    audit = run_audit(
        indexes,
        out / "audit",
        generate=args.generate,
        seed=1,
        sampling_steps=args.sampling_steps,
        config=AuditConfig(k=args.k),
        query_events=QueryEvents.preset(args.query_events),
        progress=False,
    )
    emit(stage="audit", seconds=round(time.perf_counter() - started, 1), verdicts=audit["verdict_counts"])

    # the default method (dtrak: a sqnorm store of its own) on the same generated images
    started = time.perf_counter()
    default_store = featurize_dataset(
        checkpoints,
        summary["train"],
        out / "store-sqnorm",
        replace(index_config, objective="sqnorm"),
        progress=False,
    )
    default_index = out / f"index-{DEFAULT_SQNORM_METHOD}"
    if not (default_index / "manifest.json").is_file():
        build_attribution_index(
            FeatureStore.open(default_store.path),
            default_index,
            DEFAULT_SQNORM_METHOD,
            index="flat",
            progress=False,
        )
    run_audit(
        [default_index],
        out / "audit-default",
        images=out / "audit" / "generated.npz",
        config=AuditConfig(k=args.k),
        query_events=QueryEvents.preset(args.query_events),
        progress=False,
    )
    emit(stage="audit-default", method=DEFAULT_SQNORM_METHOD, seconds=round(time.perf_counter() - started, 1))

    records = [json.loads(line) for line in (out / "audit" / "audit.jsonl").read_text().splitlines()]
    default_records = (out / "audit-default" / "audit.jsonl").read_text().splitlines()
    for record, line in zip(records, default_records, strict=True):  # same images, same order
        other = json.loads(line)
        assert other["nearest_id"] == record["nearest_id"] and other["verdict"] == record["verdict"]
        record["proponents"]["default"] = other["proponents"][DEFAULT_SQNORM_METHOD]
    ranking = [json.loads(line) for line in (out / "audit" / "self_influence.jsonl").read_text().splitlines()]
    n = len(records)
    copies = [r for r in records if r["verdict"] == "copy"]
    of_planted = [r for r in copies if r["nearest_id"] in group_of]

    flagged = [r for r in records if r["verdict"] != "novel"]
    flagged_of_planted = [r for r in flagged if r["nearest_id"] in group_of]

    def top1_hits(method: str, subset: list[dict]) -> float | None:
        """Share of ``subset`` whose top-1 proponent is the duplicated digit of its nearest image."""
        if not subset:
            return None
        return sum(
            group_of.get(r["proponents"][method]["ids"][0]) == group_of[r["nearest_id"]] for r in subset
        ) / len(subset)

    def top1_planted_any(method: str, subset: list[dict]) -> float | None:
        """Share of ``subset`` whose top-1 proponent is any planted row (the bias baseline)."""
        return (
            sum(r["proponents"][method]["ids"][0] in group_of for r in subset) / len(subset)
            if subset
            else None
        )

    novel = [r for r in records if r["verdict"] == "novel"]
    top = max(1, len(ranking) // 100)
    ranks: dict[str, list[int]] = {original: [] for original in planted}
    for entry in ranking:
        if entry["id"] in group_of:
            ranks[group_of[entry["id"]]].append(entry["rank"])
    planted_ranks = {
        original: {"best": min(r), "median": statistics.median(r), "rows": len(r)}
        for original, r in ranks.items()
    }
    # chance: planted digits with a row in the top 1% if the ranking were a random permutation
    chance_in_top = sum(
        1 - math.comb(len(ranking) - len(r), top) / math.comb(len(ranking), top) for r in ranks.values()
    )
    tracin_top1 = Counter(r["proponents"]["tracin"]["ids"][0] for r in records)
    retrac_top1 = Counter(r["proponents"]["retrac"]["ids"][0] for r in records)
    nearest_planted = sum(r["nearest_id"] in group_of for r in records)
    emit(
        stage="figures",
        n_generated=n,
        copy_rate=len(copies) / n,
        near_rate=audit["verdict_counts"]["near"] / n,
        copy_of_planted_rate=len(of_planted) / len(copies) if copies else None,
        nearest_is_planted_rate=nearest_planted / n,
        num_copied=len(copies),
        num_copied_planted=len(of_planted),
        top1_retrac_hits_copied=top1_hits("retrac", of_planted),
        top1_tracin_hits_copied=top1_hits("tracin", of_planted),
        flagged_rate=len(flagged) / n,
        flagged_of_planted_rate=len(flagged_of_planted) / len(flagged) if flagged else None,
        top1_retrac_hits_flagged=top1_hits("retrac", flagged_of_planted),
        top1_tracin_hits_flagged=top1_hits("tracin", flagged_of_planted),
        default_method=DEFAULT_SQNORM_METHOD,
        top1_default_hits_copied=top1_hits("default", of_planted),
        top1_default_hits_flagged=top1_hits("default", flagged_of_planted),
        nn_in_top_k_default_flagged=mean_or_none(
            [r["proponents"]["default"]["nn_rank"] is not None for r in flagged_of_planted]
        ),
        nn_in_top_k_retrac_flagged=mean_or_none(
            [r["proponents"]["retrac"]["nn_rank"] is not None for r in flagged_of_planted]
        ),
        nn_in_top_k_tracin_flagged=mean_or_none(
            [r["proponents"]["tracin"]["nn_rank"] is not None for r in flagged_of_planted]
        ),
        top1_tracin_most_common=tracin_top1.most_common(1)[0],
        top1_retrac_most_common=retrac_top1.most_common(1)[0],
        nn_rank_retrac_copied=[r["proponents"]["retrac"]["nn_rank"] for r in of_planted][:50],
        top1_retrac_planted_on_novel=top1_planted_any("retrac", novel),
        top1_tracin_planted_on_novel=top1_planted_any("tracin", novel),
        chance_top1_planted_group=args.duplicate_copies / len(ranking),
        planted_in_top_self_influence=sum(p["best"] <= top for p in planted_ranks.values()),
        planted_in_top_self_influence_chance=round(chance_in_top, 2),
        planted_median_rank_fraction=round(
            statistics.median(rank for r in ranks.values() for rank in r) / len(ranking), 3
        ),
        top_1_percent=top,
        planted_self_influence_ranks=planted_ranks,
        num_train=len(ranking),
        sampling_steps=args.sampling_steps,
        query_events=args.query_events,
        events=args.events,
        report=audit["files"]["report"],
        total_seconds=round(time.perf_counter() - total_started, 1),
    )


if __name__ == "__main__":
    main()
