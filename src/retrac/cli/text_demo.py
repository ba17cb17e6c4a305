"""``retrac demo --text``: the text-conditioned digits demo (:mod:`retrac.demo_text`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrac._io import atomic_write_text, publish_directory


def run_text_demo_command(args: argparse.Namespace) -> int:
    """Train the tiny text model, index, build, attribute by prompt and by step; print the shares."""
    from retrac.demo_text import TextDemoConfig, run_text_demo

    config = TextDemoConfig.quick(args.seed) if args.quick else TextDemoConfig(seed=args.seed)
    if args.epochs is not None:
        config = TextDemoConfig(**{**config.__dict__, "epochs": args.epochs})
    out = Path(args.out)
    if out.is_dir() and any(
        out.iterdir()
    ):  # --overwrite (checked): the new demo replaces the old in one step
        with publish_directory(out) as staging:
            run_text_demo(config, staging, progress=not args.no_progress, device=args.device)
            summary = _as_published(staging, out)
    else:
        summary = run_text_demo(config, out, progress=not args.no_progress, device=args.device)
    shares = summary["top_k_caption_share"]
    k = config.top_k
    print(
        f"trained {len(summary['checkpoints'])} checkpoints in {summary['train_seconds']} s "
        f"(final loss {summary['final_loss']:.4f}); indexed and built in {summary['index_seconds']} s"
    )
    print(f"store {summary['store']}; indexes {', '.join(summary['indexes'])}")
    print(
        f"share of the top {k} proponents whose caption names the query's digit (chance {summary['chance']}):"
    )
    for method in shares["own_caption"]:
        other = shares["other_caption"][method]
        steps = ", ".join(f"t={t}: {s}" for t, s in shares["steps"][method].items())
        print(
            f"  {method}: held-out digits by their own caption {shares['own_caption'][method]}; by another "
            f"digit's caption {other['share_naming_the_image_digit']} (naming the prompt's digit: "
            f"{other['share_naming_the_prompt_digit']}); generated samples per step {steps}"
        )
    audit = summary["audit"]
    counts = ", ".join(f"{v} {c}" for v, c in audit["verdict_counts"].items())
    print(f"audit of samples generated from the captions: {counts} -> {audit['folder']}")
    print(f"timestep-bias report of the held-out queries: {summary['report']['page']}")
    print(f"summary: {out / 'text-demo.json'} ({summary['total_seconds']} s in all)")
    print(
        f'try: retrac query --index {summary["indexes"][1]} --prompt "a handwritten seven" '
        "--query-steps 900,500,100 --k 5"
    )
    return 0


def _as_published(staging: Path, out: Path) -> dict:
    """``staging/text-demo.json`` with its paths as they will be once ``staging`` is published at ``out``
    (the store and indexes find their parts relative to where they are: ``retrac.relocate``)."""
    text = (staging / "text-demo.json").read_text()
    for old, new in ((str(staging.absolute()), str(out.absolute())), (str(staging), str(out))):
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    atomic_write_text(staging / "text-demo.json", text)
    return json.loads(text)
