"""The attribution report: each query next to its top-k proponents under several methods, side by side."""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from retrac.data import ImageDataset
from retrac.report.html import TrainThumbnails, image_cell, save_png, write_page

SCORE_NOTE = (
    "Score I(z, z') = sum_k w_k &lt;u_k(z), q_k(z')&gt;: positive = proponent (a training step on z lowers the "
    "loss on the query z'). TracIn scores carry gradient magnitudes; ReTrac normalises every gradient "
    "per timestep, so its scores lie in [-sum w_k, sum w_k]; with the kernel (dtrak, trak, retrac+kernel) the "
    "query is preconditioned by (Phi^T Phi + lambda I)^-1, so those scores are on the TRAK scale. Scores compare "
    "across queries of one method, not across methods."
)


def attribution_table(
    out_dir: str | Path,
    queries: Sequence[tuple[str, Tensor]],
    results: Mapping[str, object],
    train: ImageDataset,
    flagged: Collection[int] = (),
    query_prefix: str = "query",
) -> str:
    """The HTML table of queries (rows) and top-k proponents per method (columns); PNGs under ``out_dir/images``.

    Args:
        out_dir: folder of the page that embeds the table (image paths are relative to it).
        queries: ``(caption, image (C, H, W))`` per query, in the order of the results' rows.
        results: method name -> ``AttributionResult`` with ``(n_query, k)`` indices, scores, ids.
        train: the training set the indices refer to.
        flagged: training rows drawn highlighted (e.g. planted outliers).
        query_prefix: file-name prefix of the query PNGs (pages in one folder with other queries
            need their own).
    """
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    flagged = set(flagged)
    train_png = TrainThumbnails(train.images, images_dir)

    methods = list(results)
    head = "<tr><th>query</th>" + "".join(
        f'<th class="method">{html.escape(m)}: top proponents</th>' for m in methods
    )
    rows = [head + "</tr>"]
    for q, (caption, image) in enumerate(queries):
        save_png(image, images_dir / f"{query_prefix}-{q}.png")
        cells = [f"<td>{image_cell(f'images/{query_prefix}-{q}.png', [caption])}</td>"]
        for method in methods:
            result = results[method]
            pictures = [
                image_cell(
                    train_png(int(i)),
                    [sample_id, f"{score:.3g}"],
                    "cell flag" if int(i) in flagged else "cell",
                )
                for i, sample_id, score in zip(
                    result.indices[q], result.ids[q], result.scores[q], strict=True
                )
            ]
            cells.append(f"<td>{''.join(pictures)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{''.join(rows)}</table>"


def write_attribution_report(
    out_dir: str | Path,
    queries: Sequence[tuple[str, Tensor]],
    results: Mapping[str, object],
    train: ImageDataset,
    title: str = "retrac attribution report",
    intro: str = "",
) -> Path:
    """Write ``out_dir/index.html`` with one row per query and one column of top-k per method.

    Args:
        out_dir: folder for the page and its PNG images (``images/``).
        queries: ``(caption, image (C, H, W))`` per query, in the order of the results' rows.
        results: method name -> ``AttributionResult`` with ``(n_query, k)`` indices, scores, ids.
        train: the training set the indices refer to.
        intro: HTML placed above the table.

    Returns:
        The path of the page.
    """
    out_dir = Path(out_dir)
    table = attribution_table(out_dir, queries, results, train)
    body = f'{intro}<p class="note">{SCORE_NOTE}</p>{table}'
    return write_page(out_dir / "index.html", title, body)
