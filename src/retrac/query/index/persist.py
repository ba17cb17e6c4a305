"""Saving and loading an index folder: the FAISS file, its companions and ``manifest.json``.

docs/design.md section 6. An index folder is published whole: :func:`save_index` writes every file into
a temporary sibling folder and renames it into place (``retrac._io.publish_directory``), so a reader
finds the old complete folder or the new one, never a mix of the two.

The manifest holds the index's own entries (format and version, kind, factory, metric, score
meaning, dimension, rows, build and search parameters, recall, FAISS version, file name and size)
and the caller's (method, store fingerprint, checkpoints, ...). Format version 2 adds two entries:

* ``digests``: ``{file name: {"sha256", "bytes"}}`` of ``index.faiss`` and of every companion file
  (``kernel.npz``), streamed when saved and checked at every load, before the file is used;
* ``seal``: the sha256 of the manifest's canonical JSON without the seal itself, the tunable
  ``search_params``, the informative ``recall`` and every location (keys named ``path`` or ending in
  ``_path``, so that a moved index stays valid). An edited entry (a relabelled method, another store
  fingerprint, a rewritten digest) breaks the seal and the folder is refused.

A seal is not a signature: whoever recomputes it after an edit passes it. Where a wrong entry would
give wrong answers, the entry is therefore also checked against what was built
(``retrac.query.provenance``: the vectors of ``index.faiss`` against the store, ``c`` inside
``kernel.npz``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import faiss

from retrac._io import (
    atomic_write_json,
    atomic_write_via,
    file_sha256,
    publish_directory,
    read_json,
    record_differences,
)
from retrac.errors import ConfigError, DataError, IndexDamagedError, StoreMismatchError
from retrac.query.index.checks import _check_device
from retrac.query.index.ondisk import ONDISK_FILENAME, move_lists, ondisk_file
from retrac.query.index.search_index import INDEX_FORMAT, INDEX_FORMAT_VERSION, SearchIndex

INDEX_FILENAME = "index.faiss"
MANIFEST_FILENAME = "manifest.json"
UNSEALED_KEYS = ("seal", "search_params", "recall")  # entries a seal does not cover (besides locations)

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
    "digests",
    "seal",
)


def save_index(
    index: SearchIndex,
    directory: str | os.PathLike,
    manifest: dict[str, Any] | None = None,
    files: Mapping[str, Callable[[str], None]] | None = None,
) -> Path:
    """Publish an index folder: the FAISS file, companion files and ``manifest.json``, as one rename.

    Everything is written into a temporary sibling folder, digested (sha256, streamed) and sealed,
    then renamed to ``directory``; an existing index folder there is replaced only then, so an
    interrupted save leaves the old folder whole (``retrac._io.publish_directory``).

    Args:
        index: The index to save (its CPU copy is written).
        directory: The index folder: new, empty, or an index folder (it is replaced).
        manifest: The caller's entries (method, store fingerprint, checkpoints, ...), JSON-serialisable,
            merged with the index's own (format, kind, factory, dim, num_vectors, build and search
            parameters, recall, digests, seal), whose names they may not reuse.
        files: Companion files ``{name: write(path)}`` (e.g. ``{"kernel.npz": ...}``): each ``write``
            writes the whole file at the path it is given; they are digested like the FAISS file.

    Returns:
        The directory.

    Raises:
        ConfigError: A caller key collides with an index key or is not JSON-serialisable (NaN and
            infinity included); a companion file name is not a plain file name; ``directory`` holds
            files but is not an index folder (it is never replaced).
    """
    extra = dict(manifest or {})
    clash = sorted(set(extra) & set(_RESERVED_MANIFEST_KEYS))
    if clash:
        raise ConfigError(f"manifest keys {clash} are written by save_index itself; rename them.")
    files = dict(files or {})
    for name in files:
        if Path(name).name != name or name in (INDEX_FILENAME, MANIFEST_FILENAME) or name.startswith("."):
            raise ConfigError(
                f"companion file name {name!r} must be a plain file name other than {INDEX_FILENAME} and "
                f"{MANIFEST_FILENAME}."
            )
    lists_file = ondisk_file(index.index)  # on-disk IVF lists are moved into the folder beside index.faiss
    if lists_file is not None and ONDISK_FILENAME not in files:
        files[ONDISK_FILENAME] = lambda p, source=lists_file: move_lists(source, p)
    content = {**index.describe(), **extra, "index_file": INDEX_FILENAME}
    try:
        json.dumps(content, allow_nan=False)  # refused before anything on disk changes
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"manifest is not JSON-serialisable ({error}); pass str/int/float/list/dict values."
        ) from None
    directory = Path(directory)
    _check_replaceable(directory)
    with publish_directory(directory) as staging:
        index_path = atomic_write_via(staging / INDEX_FILENAME, lambda p: faiss.write_index(index.index, p))
        for name, write in files.items():
            atomic_write_via(staging / name, write)
        content["index_file_bytes"] = index_path.stat().st_size
        content["digests"] = {
            name: {"sha256": file_sha256(staging / name), "bytes": (staging / name).stat().st_size}
            for name in (INDEX_FILENAME, *files)
        }
        content["seal"] = manifest_seal(content)
        atomic_write_json(staging / MANIFEST_FILENAME, content)
    return directory


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace a folder that holds files but no index (a user's folder is never deleted)."""
    if not directory.is_dir() or (directory / MANIFEST_FILENAME).is_file():
        return
    if any(directory.iterdir()):
        raise ConfigError(
            f"{directory} holds files but is not an index folder (no {MANIFEST_FILENAME}); an index is "
            "published as a whole folder that replaces its target, so give a new or empty folder."
        )


def _without_locations(value: Any) -> Any:
    """``value`` without the entries that say where things are (keys ``path`` or ``*_path``)."""
    if isinstance(value, dict):
        return {
            key: _without_locations(item)
            for key, item in value.items()
            if not (str(key) == "path" or str(key).endswith("_path"))
        }
    if isinstance(value, list):
        return [_without_locations(item) for item in value]
    return value


def manifest_seal(manifest: dict[str, Any]) -> str:
    """The seal of a manifest: sha256 of its canonical JSON, minus ``UNSEALED_KEYS`` and locations."""
    covered = _without_locations({k: v for k, v in manifest.items() if k not in UNSEALED_KEYS})
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rebuild_command(manifest: dict[str, Any], directory: str | os.PathLike) -> str:
    """The ``retrac build`` command that rebuilds the index a manifest describes (as far as it says)."""
    method = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    store = manifest.get("store") if isinstance(manifest.get("store"), dict) else {}
    if not method.get("name") or not store.get("path"):
        return f"rebuild it (retrac build --store STORE --method METHOD --out {directory})"
    name = str(method["name"])
    base = name.split("+")[0]
    kernel = f" --kernel {method['kernel_c']}" if method.get("kernel_c") is not None else ""
    kind = manifest.get("kind")
    kind = manifest.get("factory") if kind == "factory" else kind
    kind_option = f" --kind {kind!r}" if kind and kind != "auto" else ""
    return f"rebuild it: retrac build --store {store['path']} --method {base}{kernel}{kind_option} --out {directory}"


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
    manifest = read_json(path, "index manifest", DataError)
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not an index manifest (not a JSON object); build the index again.")
    return manifest


def _check_format(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreMismatchError(
            f"{directory} holds format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this retrac reads {INDEX_FORMAT!r} version {INDEX_FORMAT_VERSION} (files checked by sha256, a "
            f"sealed manifest): {rebuild_command(manifest, directory)}."
        )


def check_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Refuse a manifest of another format version, or one edited since it was sealed.

    Raises:
        StoreMismatchError: Another format or version (names the rebuild command).
        IndexDamagedError: The seal does not match the entries.
    """
    _check_format(directory, manifest)
    try:
        expected = manifest_seal(manifest)
    except (TypeError, ValueError):  # pragma: no cover - a JSON file holds only JSON values
        expected = None
    if manifest.get("seal") != expected:
        raise IndexDamagedError(
            f"{Path(directory) / MANIFEST_FILENAME} was edited after the index was built (its seal does not "
            "match its entries: method, kernel, store, checkpoints, file digests, build settings); an edited "
            f"manifest is never trusted: {rebuild_command(manifest, directory)}."
        )


def check_digests(
    directory: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None
) -> None:
    """Check files of an index folder against the sha256 digests its manifest records (streamed).

    Args:
        directory: The index folder.
        manifest: Its manifest (sealed: see :func:`check_manifest`).
        names: The files to check (default: every file the manifest records).

    Raises:
        IndexDamagedError: A recorded file that is missing, of another size or of another sha256
            (names the file and the rebuild command).
    """
    digests = manifest.get("digests") or {}
    for name in sorted(digests) if names is None else names:
        recorded = digests.get(name)
        path = Path(directory) / name
        if not isinstance(recorded, dict):
            raise IndexDamagedError(
                f"{path} has no digest in its manifest; {rebuild_command(manifest, directory)}."
            )
        if not path.is_file():
            raise IndexDamagedError(f"{path} is missing; {rebuild_command(manifest, directory)}.")
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            raise IndexDamagedError(
                f"{path} has {size} bytes, its manifest records {recorded.get('bytes')}: the file was changed "
                f"or torn after the build; {rebuild_command(manifest, directory)}."
            )
        actual = file_sha256(path)
        if actual != recorded.get("sha256"):
            raise IndexDamagedError(
                f"{path} has sha256 {actual[:12]}..., its manifest records {str(recorded.get('sha256'))[:12]}...: "
                f"the file was changed after the build; {rebuild_command(manifest, directory)}."
            )


def load_index(
    directory: str | os.PathLike,
    expect: dict[str, Any] | None = None,
    device: str = "auto",
    mmap: bool = False,
) -> SearchIndex:
    """Load an index saved by ``save_index``, refusing a damaged one or one that does not match ``expect``.

    Before FAISS reads anything, the manifest's seal is checked and every file it records is checked
    against its sha256 (streamed, ``DIGEST_CHUNK_BYTES`` at a time; ``benchmarks/integrity.py``
    measures the cost against ``faiss.read_index``).

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
        IndexDamagedError: An edited manifest, or a file whose size or sha256 differs from the
            manifest's.
        DataError: Missing or unreadable files.
    """
    _check_device(device)
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_format(directory, manifest)
    if expect:  # before the seal: a difference from what the caller needs is named entry by entry
        normalized = json.loads(json.dumps(expect, default=str))
        diffs = record_differences(normalized, manifest, actual_name="index has")
        if diffs:
            raise StoreMismatchError(
                f"index {directory} was built with other settings: "
                + "; ".join(diffs)
                + ". Rebuild the index for these settings (retrac build) or load the matching one."
            )
    check_manifest(directory, manifest)
    name = manifest.get("index_file", INDEX_FILENAME)
    if name not in (manifest.get("digests") or {}):
        raise IndexDamagedError(
            f"{directory / str(name)} has no digest in its manifest; {rebuild_command(manifest, directory)}."
        )
    check_digests(directory, manifest)
    return open_index(directory, manifest, device, mmap)


def open_index(
    directory: str | os.PathLike, manifest: dict[str, Any], device: str = "auto", mmap: bool = False
) -> SearchIndex:
    """Read the FAISS file of an index folder as its manifest describes it, checking nothing else.

    Use :func:`load_index`, which checks the seal and the digests first; this is its last step (and
    ``retrac verify``'s, after its own digest pass).

    Raises:
        DataError: A FAISS file FAISS cannot read, or of another size or dimension than the manifest's.
    """
    directory = Path(directory)
    path = directory / manifest.get("index_file", INDEX_FILENAME)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    flags |= faiss.IO_FLAG_ONDISK_SAME_DIR  # on-disk IVF lists: index.ivfdata of this folder, memory-mapped
    try:
        faiss_index = faiss.read_index(str(path), flags)
    except RuntimeError as error:  # FAISS refuses a corrupt file
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise DataError(
            f"{path} is corrupt ({reason[:200]}); {rebuild_command(manifest, directory)}."
        ) from None
    build_params = dict(manifest.get("build_params") or {})
    max_norm = build_params.get("mips_max_norm")
    stored_dim = manifest.get("dim", -1) + (0 if max_norm is None else 1)
    if faiss_index.d != stored_dim or faiss_index.ntotal != manifest.get("num_vectors"):
        raise DataError(
            f"{path} holds {faiss_index.ntotal} vectors of dimension {faiss_index.d}, its manifest says "
            f"{manifest.get('num_vectors')} of {stored_dim}; {rebuild_command(manifest, directory)}."
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
