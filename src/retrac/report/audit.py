"""The audit report: flagged images first, each next to its nearest training images and top proponents."""

from __future__ import annotations

import html
from pathlib import Path

from retrac.data import ImageDataset
from retrac.report.html import TrainThumbnails, image_cell, save_png, write_page

VERDICT_ORDER = {"copy": 0, "near": 1, "novel": 2}


def write_audit_report(out_dir: str | Path, result, train: ImageDataset, title: str = "retrac audit") -> Path:
    """Write ``out_dir/index.html`` (and PNGs under ``out_dir/images/``) for an ``AuditResult``.

    Rows are sorted by verdict (``copy``, ``near``, ``novel``), then by relative distance; at most
    ``report_images`` rows (the summary's config) are drawn, every image is in ``audit.jsonl``.

    Returns:
        The path of the page.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    train_png = TrainThumbnails(train.images, images_dir)

    summary = result.summary
    records = sorted(result.records, key=lambda r: (VERDICT_ORDER[r["verdict"]], r["relative_distance"]))
    limit = summary.get("report_images", len(records))
    methods = summary["methods"]
    thresholds = summary["thresholds"]
    counts = summary["verdict_counts"]
    intro = (
        f"<p>{summary['num_images']} images audited against {summary['training_data']['num_samples']} training "
        f"samples ({summary['training_data']['num_distinct']} distinct images). Verdicts: "
        + ", ".join(f"<b>{html.escape(v)}</b> {c}" for v, c in counts.items())
        + f" (copy rate {summary['copy_rate']:.1%}).</p>"
        f'<p class="note">Relative distance r = d<sub>1</sub> / mean of the distances to the '
        f"{summary['num_neighbours']} nearest distinct training images (Carlini et al. 2023); "
        f"copy if r &lt; {thresholds['copy']:.3g}, near if r &lt; {thresholds['near']:.3g}, else novel. "
        "Distances are L2 over all pixel values in [-1, 1]. Proponent scores: I(z, z') = sum_k w_k "
        "&lt;u_k(z), q_k(z')&gt;, positive = proponent; a proponent marked = has the pixels of the nearest "
        "training image.</p>"
    )
    hot = "".join(
        image_cell(
            train_png(h["row"]),
            [h["id"], f"{h['outputs']} outputs", f"nearest of {h['as_nearest']}"]
            + [f"top-1 {m}: {c}" for m, c in h["as_top1"].items()]
            + ([f"x{h['duplicates']} in training"] if h["duplicates"] > 1 else []),
        )
        for h in summary["hot_spots"]
    )
    body = [
        intro,
        "<h2>Hot spots: training images nearest to, or top-1 proponent of, the most outputs</h2>",
        hot,
    ]
    if "self_influence_top" in summary:
        cells = "".join(
            image_cell(train_png(s["row"]), [f"#{s['rank']} {s['id']}", f"SI {s['self_influence']:.3g}"])
            for s in summary["self_influence_top"]
        )
        body += [
            "<h2>Highest self-influence (memorization risk, no generated image needed)</h2>",
            f'<p class="note">{html.escape(summary["meaning"]["self_influence"])}</p>',
            cells,
        ]
    head = "<tr><th>audited image</th><th>nearest training images (L2)</th>" + "".join(
        f'<th class="method">{html.escape(m)}: top proponents</th>' for m in methods
    )
    rows = [head + "</tr>"]
    for record in records[:limit]:
        i = record["image"]
        save_png(result.images[i], images_dir / f"audited-{i}.png")
        caption = [
            record["id"],
            record["verdict"],
            f"r = {record['relative_distance']:.3f}",
            f"d1 = {record['nn_distance']:.3f}",
        ]
        css = ' class="flag"' if record["verdict"] != "novel" else ""
        cells = [f"<td{css}>{image_cell(f'images/audited-{i}.png', caption)}</td>"]
        nearest = [
            image_cell(
                train_png(n["row"]),
                [n["id"], f"d = {n['distance']:.3f}"]
                + ([f"x{n['duplicates']}"] if n["duplicates"] > 1 else []),
            )
            for n in record["nearest"]
        ]
        cells.append(f"<td>{''.join(nearest)}</td>")
        for method in methods:
            p = record["proponents"].get(method)
            if p is None:
                cells.append("<td></td>")
                continue
            pictures = [
                image_cell(
                    train_png(row),
                    [sample_id, f"{score:.3g}"] + (["= nearest"] if p["nn_rank"] == rank + 1 else []),
                )
                for rank, (row, sample_id, score) in enumerate(
                    zip(p["rows"], p["ids"], p["scores"], strict=True)
                )
            ]
            cells.append(f"<td>{''.join(pictures)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    shown = min(limit, len(records))
    body.append(
        f"<h2>Audited images ({shown} of {len(records)} shown, flagged first)</h2><table>{''.join(rows)}</table>"
    )
    return write_page(out_dir / "index.html", title, "".join(body))
