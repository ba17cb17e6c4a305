"""The bias page: gradient norm against timestep, TracIn vs ReTrac counts, generally influential
samples and the top-k grids of every query under both methods (PNG figures via matplotlib Agg)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from retrac.data import ImageDataset
from retrac.report.attribution import SCORE_NOTE, attribution_table
from retrac.report.html import image_cell, save_png, write_page

DEFAULT_TITLE = "retrac: timestep-induced bias"
GENERAL_NOTE = (
    "A training sample is <b>generally influential</b> when it is among the top-{k} proponents of at least "
    "{threshold} of the {q} queries (max({min_queries}, ceil({fraction:g} &times; Q))). Under Diffusion-TracIn the "
    "gradient norm n_k(z, e) grows or shrinks with the timestep of the event, so samples whose training "
    "events fall on large-norm timesteps, and outliers, top many queries; Diffusion-ReTrac normalises every "
    "gradient and should leave fewer, query-specific proponents."
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: str | Path) -> Path:
    """Grid, legend, tight layout; save the figure to ``path`` and close it."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_norm_timestep(profiles, path: str | Path) -> Path:
    """Mean gradient norm per timestep bin (line) and its 10-90% band, one colour per checkpoint (log y)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for profile in profiles:
        x = profile.bin_centers
        (line,) = ax.plot(x, profile.mean, marker="o", markersize=3, label=f"checkpoint {profile.checkpoint}")
        ax.fill_between(x, profile.q10, profile.q90, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("timestep t of the training event")
    ax.set_ylabel("gradient norm n_k(z, e)")
    ax.set_yscale("log")
    ax.set_title("Per-sample gradient norm vs timestep (mean, 10-90% band)")
    return _finish(plt, fig, ax, path)


def plot_topk_frequency(topk: dict, path: str | Path, shown: int = 60) -> Path:
    """Top-k appearances of the most frequent training samples per method, with the general threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    threshold = None
    for method, stats in topk.items():
        frequency = np.sort(stats.frequency)[::-1][:shown]
        ax.plot(np.arange(1, frequency.size + 1), frequency, marker=".", label=method)
        threshold = stats.threshold
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="generally influential")
    ax.set_xlabel("training samples, most frequent first")
    ax.set_ylabel("queries with the sample in top-k")
    ax.set_title("How often the same samples top the queries")
    return _finish(plt, fig, ax, path)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def counts_table(measurement) -> str:
    """HTML table of the top-k statistics, one column per method."""
    methods = list(measurement.topk)
    stats = measurement.topk
    rows = [
        ("queries Q / top-k", lambda s: f"{s.num_queries} / {s.k}"),
        (
            "distinct samples over all top-k lists",
            lambda s: f"{s.unique} of {min(s.num_train, s.num_queries * s.k)}",
        ),
        ("generally influential samples", lambda s: _fmt(s.general_influential)),
        ("most frequent sample: share of queries", lambda s: _fmt(s.max_frequency_share)),
    ]
    if any(s.num_outliers for s in stats.values()):
        rows += [
            ("planted outliers in top-k slots (share)", lambda s: _fmt(s.outlier_share)),
            ("&nbsp;&nbsp;share if drawn at random", lambda s: _fmt(s.outlier_base_rate)),
            ("queries with a planted outlier in top-k", lambda s: _fmt(s.outlier_query_share)),
            ("generally influential planted outliers", lambda s: f"{s.general_outliers} of {s.num_outliers}"),
        ]
    head = "<tr><th></th>" + "".join(f'<th class="method">{html.escape(m)}</th>' for m in methods) + "</tr>"
    body = [
        f"<tr><td>{label}</td>" + "".join(f"<td>{cell(stats[m])}</td>" for m in methods) + "</tr>"
        for label, cell in rows
    ]
    body.append(
        "<tr><td>Spearman(mean influence over queries, mean event gradient norm)</td>"
        + "".join(f"<td>{_fmt(measurement.influence_norm_spearman.get(m))}</td>" for m in methods)
        + "</tr>"
    )
    body.append(
        "<tr><td>Spearman(mean influence over queries, mean event timestep)</td>"
        + "".join(f"<td>{_fmt(measurement.influence_timestep_spearman.get(m))}</td>" for m in methods)
        + "</tr>"
    )
    return f"<table>{head}{''.join(body)}</table>"


def profile_table(profiles) -> str:
    """Per-checkpoint summary of the norm profiles."""
    head = "<tr><th>checkpoint</th><th>events</th><th>Spearman(norm, t)</th><th>largest / smallest bin mean</th></tr>"
    rows = "".join(
        f"<tr><td>{p.checkpoint}</td><td>{p.num_events}</td><td>{_fmt(p.spearman)}</td><td>{_fmt(p.max_over_min)}</td></tr>"
        for p in profiles
    )
    return f"<table>{head}{rows}</table>"


def write_bias_report(
    out_dir: str | Path,
    measurement,
    queries: Sequence[tuple[str, Tensor]],
    train: ImageDataset,
    title: str = DEFAULT_TITLE,
    intro: str = "",
    filename: str = "bias.html",
    general_shown: int = 24,
) -> Path:
    """Write ``out_dir/<filename>`` for a :class:`~retrac.bias.BiasMeasurement`, PNGs under ``out_dir/images``.

    Args:
        out_dir: folder of the page (may hold other reports: file names carry the page's stem).
        measurement: from :func:`retrac.bias.measure_bias`.
        queries: ``(caption, image (C, H, W))`` per query, in the rows' order of ``measurement.results``.
        train: the training set of the store (thumbnails).
        intro: HTML placed under the title.
        general_shown: generally influential samples drawn per method (most frequent first).

    Returns:
        The path of the page.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(filename).stem
    norm_png = plot_norm_timestep(measurement.profiles, images_dir / f"{stem}-norm-timestep.png")
    freq_png = plot_topk_frequency(measurement.topk, images_dir / f"{stem}-topk-frequency.png")
    row_of = {sid: r for r, sid in enumerate(train.ids)}
    flagged = {row_of[sid] for sid in measurement.outlier_ids if sid in row_of}
    first = next(iter(measurement.topk.values()))

    sections = [intro]
    sections.append(
        "<h2>Gradient norm against timestep</h2>"
        f'<img src="images/{norm_png.name}" alt="gradient norm vs timestep">'
        f'<p class="note">Spearman correlation of n_k(z, e) and t over the training events, mean over checkpoints: '
        f"{_fmt(measurement.norm_timestep_spearman)}.</p>{profile_table(measurement.profiles)}"
    )
    note = GENERAL_NOTE.format(
        k=first.k,
        threshold=first.threshold,
        q=first.num_queries,
        fraction=first.fraction,
        min_queries=first.min_queries,
    )
    sections.append(
        f'<h2>TracIn vs ReTrac</h2><p class="note">{note}</p>{counts_table(measurement)}'
        f'<img src="images/{freq_png.name}" alt="top-k frequency">'
    )
    general = ["<h2>Generally influential samples</h2>"]
    if flagged:
        general.append('<p class="note">Planted outliers are highlighted.</p>')
    for method, stats in measurement.topk.items():
        cells = []
        for row in stats.general_rows[:general_shown]:
            name = f"train-{row}.png"
            save_png(train.images[row], images_dir / name)
            cells.append(
                image_cell(
                    f"images/{name}",
                    [train.ids[row], f"{stats.frequency[row]} of {stats.num_queries}"],
                    "cell flag" if row in flagged else "cell",
                )
            )
        shown = f" (first {general_shown})" if len(stats.general_rows) > general_shown else ""
        general.append(
            f'<p><span class="method">{html.escape(method)}</span>: {stats.general_influential} samples{shown}</p>'
            + ("".join(cells) or "<p>none</p>")
        )
    sections.append("".join(general))
    table = attribution_table(
        out_dir, queries, measurement.results, train, flagged, query_prefix=f"{stem}-query"
    )
    sections.append(
        f'<h2>Queries and their top-{first.k} proponents</h2><p class="note">{SCORE_NOTE}</p>{table}'
    )
    return write_page(out_dir / filename, title, "".join(sections))
