"""The JSON documents retrac prints and writes, under one versioned schema (docs/design.md section 10).

Every document starts with ``{"schema": NAME, "schema_version": SCHEMA_VERSION}``:

* ``retrac.query``: ``retrac query --json``, ``AttributionResult.to_dict()``, ``POST /attribute`` of
  ``retrac serve`` (which adds image URLs). Always ``results: {method: ...}``, one entry per index.
* ``retrac.audit``: ``OUT/summary.json`` of ``retrac audit``, ``retrac audit --json``,
  ``AuditResult.to_dict()``; the lines of ``OUT/audit.jsonl`` are its records.
* ``retrac.report``: ``OUT/bias.json`` of ``retrac report``, ``retrac report --json``,
  ``BiasMeasurement.to_dict()``.

The field-by-field form lives in :mod:`retrac.schema.models` (pydantic models; ``json_schema(name)``
gives the JSON Schema, ``validate_document`` checks a document). ``SCHEMA_VERSION`` changes whenever a
field is removed, renamed or changes meaning; added optional fields keep it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
QUERY_SCHEMA = "retrac.query"
AUDIT_SCHEMA = "retrac.audit"
REPORT_SCHEMA = "retrac.report"
SCHEMA_NAMES = (QUERY_SCHEMA, AUDIT_SCHEMA, REPORT_SCHEMA)
SCORE_MEANING = "I(z, z') = sum_k w_k <u_k(z), q_k(z')>; positive = proponent, negative = opponent"

__all__ = [
    "AUDIT_SCHEMA",
    "QUERY_SCHEMA",
    "REPORT_SCHEMA",
    "SCHEMA_NAMES",
    "SCHEMA_VERSION",
    "SCORE_MEANING",
    "header",
    "query_document",
    "typed_ids",
]


def header(name: str) -> dict[str, Any]:
    """``{"schema": name, "schema_version": SCHEMA_VERSION}``, the first two keys of every document."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; one of {SCHEMA_NAMES}")
    return {"schema": name, "schema_version": SCHEMA_VERSION}


def query_document(results: Iterable, query_ids: Sequence | None = None) -> dict[str, Any]:
    """The ``retrac.query`` document of one or more :class:`AttributionResult` of the same queries.

    Args:
        results: attribution results, one per method, of the same query images.
        query_ids: one id per query (default: each result's ``query_ids``, else row numbers ``0..n-1``).
    """
    results = list(results)
    if not results:
        raise ValueError("query_document needs at least one result")
    n = results[0].indices.shape[0]
    ids = query_ids if query_ids is not None else results[0].query_ids
    ids = list(range(n)) if ids is None else [_plain(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} query ids for {n} queries")
    by_method: dict[str, Any] = {}
    for result in results:
        if result.indices.shape[0] != n:
            raise ValueError("results of one document must answer the same queries")
        if result.method in by_method:
            raise ValueError(f"two results of method {result.method!r}")
        by_method[result.method] = {
            "method": result.method,
            "opponents": bool(result.opponents),
            "k": int(result.indices.shape[1]),
            "indices": np.asarray(result.indices).tolist(),
            "scores": np.asarray(result.scores, dtype=np.float64).tolist(),
            "ids": [[_plain(i) for i in row] for row in result.ids],
        }
        if getattr(result, "search_note", None):
            by_method[result.method]["search_note"] = str(result.search_note)
    return {**header(QUERY_SCHEMA), "score_meaning": SCORE_MEANING, "query_ids": ids, "results": by_method}


def _plain(value):
    """A JSON value of an id: numpy integers become ``int``, everything else its ``str``."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return str(value)


def typed_ids(ids: Sequence[str], source: str | Path | None = None) -> list:
    """Sample ids with the type the input file gave them: ``int`` for ``.npy`` row numbers and for a
    ``.npz`` whose ``ids`` array is integer (or absent), ``str`` otherwise (file names, string ids).

    ``load_dataset`` keeps every id as a string; this restores the integer ones for JSON output so that
    ``ids`` read back from ``retrac query --json`` equal the ones in the input file, type included.
    """
    path = Path(source) if source else None
    integer = False
    if path is not None and path.is_file():
        if path.suffix == ".npy":
            integer = True
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                integer = "ids" not in archive.files or archive["ids"].dtype.kind in "iu"
    if integer and all(_is_int_text(i) for i in ids):
        return [int(i) for i in ids]
    return [str(i) for i in ids]


def _is_int_text(value) -> bool:
    text = str(value)
    return text.lstrip("-").isdigit()
