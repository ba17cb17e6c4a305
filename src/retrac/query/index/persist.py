"""Saving and loading an index: the FAISS file and its ``manifest.json`` (docs/design.md section 6).

The manifest holds the index's own entries (format and version, kind, factory, metric, score
meaning, dimension, rows, build and search parameters, recall, FAISS version, file name and size)
and the caller's (method, store fingerprint, checkpoints, ...). It is written last, so a directory
whose write was interrupted has no manifest and is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss

from retrac._io import atomic_write_json, atomic_write_via, read_json, record_differences
from retrac.errors import ConfigError, DataError, StoreMismatchError
from retrac.query.index.checks import _check_device
from retrac.query.index.search_index import INDEX_FORMAT, INDEX_FORMAT_VERSION, SearchIndex

INDEX_FILENAME = "index.faiss"
MANIFEST_FILENAME = "manifest.json"

_RESERVED_MANIFEST_KEYS = (
    "format",
    "format_version",
    "kind",
    "factory",
    "metric",
    "dim",
    "num_vectors",
    "build_params",
    "search_params",
    "recall",
    "index_file",
    "index_file_bytes",
    "faiss_version",
    "score",
)


def save_index(
    index: SearchIndex, directory: str | os.PathLike, manifest: dict[str, Any] | None = None
) -> Path:
    """Write the FAISS file and ``manifest.json`` into ``directory``, each atomically.

    The old manifest is removed first and the new one written last, so a directory whose write was
    interrupted has no manifest and ``load_index`` refuses it.

    Args:
        index: The index to save (its CPU copy is written).
        directory: Target directory (created).
        manifest: The caller's entries (method, store fingerprint, checkpoints, ...), JSON-serialisable,
            merged with the index's own (format, kind, factory, dim, num_vectors, build and search
            parameters, recall), whose names they may not reuse.

    Returns:
        The directory.

    Raises:
        ConfigError: A caller key collides with an index key, or is not JSON-serialisable (NaN and
            infinity included).
    """
    extra = dict(manifest or {})
    clash = sorted(set(extra) & set(_RESERVED_MANIFEST_KEYS))
    if clash:
        raise ConfigError(f"manifest keys {clash} are written by save_index itself; rename them.")
    content = {**index.describe(), **extra, "index_file": INDEX_FILENAME}
    try:
        json.dumps(content, allow_nan=False)  # refused before anything on disk changes
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"manifest is not JSON-serialisable ({error}); pass str/int/float/list/dict values."
        ) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST_FILENAME
    if manifest_path.exists():
        manifest_path.unlink()
    index_path = atomic_write_via(directory / INDEX_FILENAME, lambda p: faiss.write_index(index.index, p))
    content["index_file_bytes"] = index_path.stat().st_size
    atomic_write_json(manifest_path, content)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved index directory.

    Raises:
        DataError: No manifest (not an index, or an interrupted write) or an unreadable one.
    """
    path = Path(directory) / MANIFEST_FILENAME
    if not path.is_file():
        raise DataError(
            f"{directory} has no {MANIFEST_FILENAME}: not a retrac index, or its write was interrupted; "
            "build it again (retrac build / save_index)."
        )
    return read_json(path, "index manifest", DataError)


def load_index(
    directory: str | os.PathLike,
    expect: dict[str, Any] | None = None,
    device: str = "auto",
    mmap: bool = False,
) -> SearchIndex:
    """Load an index saved by ``save_index``, refusing one that does not match ``expect``.

    Args:
        directory: The index directory.
        expect: Manifest entries the caller requires (method, store fingerprint, dim, ...); nested
            dicts are compared key by key, lists item by item.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` for searches.
        mmap: Memory-map the FAISS file instead of reading it (indexes larger than RAM).

    Returns:
        The ``SearchIndex`` with its saved search parameters and recall.

    Raises:
        StoreMismatchError: Another format version, or entries that differ from ``expect`` (all
            differing keys are named).
        DataError: Missing or damaged files.
    """
    _check_device(device)
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreMismatchError(
            f"{directory} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this retrac reads {INDEX_FORMAT!r} version {INDEX_FORMAT_VERSION}. Rebuild the index."
        )
    if expect:
        normalized = json.loads(json.dumps(expect, default=str))
        diffs = record_differences(normalized, manifest, actual_name="index has")
        if diffs:
            raise StoreMismatchError(
                f"index {directory} was built with other settings: "
                + "; ".join(diffs)
                + ". Rebuild the index for these settings (retrac build) or load the matching one."
            )
    path = directory / manifest.get("index_file", INDEX_FILENAME)
    if not path.is_file():
        raise DataError(f"{path} is missing; build the index again.")
    if "index_file_bytes" in manifest and path.stat().st_size != manifest["index_file_bytes"]:
        raise DataError(
            f"{path} has {path.stat().st_size} bytes, its manifest says {manifest['index_file_bytes']}; "
            "the file was changed or torn. Build the index again."
        )
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        faiss_index = faiss.read_index(str(path), flags)
    except RuntimeError as error:  # FAISS refuses a corrupt file
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise DataError(f"{path} is corrupt ({reason[:200]}); build the index again.") from None
    build_params = dict(manifest.get("build_params") or {})
    max_norm = build_params.get("mips_max_norm")
    stored_dim = manifest.get("dim", -1) + (0 if max_norm is None else 1)
    if faiss_index.d != stored_dim or faiss_index.ntotal != manifest.get("num_vectors"):
        raise DataError(
            f"{path} holds {faiss_index.ntotal} vectors of dimension {faiss_index.d}, its manifest says "
            f"{manifest.get('num_vectors')} of {stored_dim}; build the index again."
        )
    return SearchIndex(
        faiss_index,
        manifest["kind"],
        manifest["factory"],
        int(manifest["dim"]),
        build_params,
        dict(manifest.get("search_params") or {}),
        manifest.get("recall"),
        device,
        None if max_norm is None else float(max_norm),
    )
