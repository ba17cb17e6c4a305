"""The index of each method an ``Attributor`` searches: one index folder, or N parts merged by score.

docs/design.md section 6, "Parts". ``retrac build --part I/N`` indexes the I-th of N contiguous row
ranges of a store (``retrac.query.partition``). The ``Attributor`` takes the parts as it takes index
folders (``Attributor([part0, part1, ...])``, a folder whose subfolders are the parts, or the URL of a
part server, ``retrac.query.remote``) and checks, per method, that they are of one method, store and
checkpoints and cover every store row exactly once. A query vector ``Q(z')`` is computed once (the
kernel folded in, from the first part's ``kernel.npz``); :class:`PartedIndex` searches every part for
its top ``k`` and keeps the best ``k`` of their union by score (most negative first for opponents;
ties by store row). Each part's top ``k`` holds the part's share of the overall top ``k``, so with
exact (Flat) parts the result is the one a Flat index over the whole store gives: the same rows and
the same scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrac._io import read_json, record_differences
from retrac.errors import ConfigError, DataError, IndexDamagedError, StoreMismatchError
from retrac.query.building import index_manifest, train_vector_blocks
from retrac.query.index import MANIFEST_FILENAME, SearchIndex, check_manifest, load_index, rebuild_command
from retrac.query.index.checks import _as_queries, _check_int_in_range
from retrac.query.index.rerank import VectorRows, open_rerank_vectors
from retrac.query.partition import PART_KEY, IndexPart, PartHits, check_cover
from retrac.query.provenance import Kernel, derive_method
from retrac.query.remote import PartServer, RemoteIndexPart, is_remote
from retrac.query.vectors import DEFAULT_METHOD, Method

MAX_PART_THREADS = 16  # parts searched at once (remote parts wait on the network)
KERNEL_RTOL = 1e-6  # the parts' lambda_k, each accumulated over the whole store, agree to float rounding


@dataclass
class LoadedIndex:
    """The index of one method, as the ``Attributor`` searches it.

    Attributes:
        directory: the index folder (for parts: the first part's folder or server).
        manifest: its manifest (for parts: the first part's).
        method: the method, re-derived from what was built (docs/design.md section 6).
        index: a ``SearchIndex`` (one folder), or a :class:`PartedIndex` (parts, or a part server).
        preconditioners: ``(K, d, d)`` float64 kernel folded into queries, or ``None``.
        vectors: the folder's exact train vectors ``(N, D)`` (``retrac build --rerank-vectors``),
            read row by row, that re-ranking reads (for local parts all built with them, a
            :class:`PartVectors`); ``None``: re-ranking reads the store's shards.
    """

    directory: Path | str
    manifest: dict
    method: Method
    index: Any
    preconditioners: np.ndarray | None = None
    vectors: Any = None


@dataclass
class IndexSource:
    """One index (or part) as given: a folder and its manifest, or a part held by a part server."""

    where: str
    manifest: dict
    remote: RemoteIndexPart | None = None


def read_index_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an attribution index folder.

    Raises:
        DataError: no manifest, or not an attribution index's (no method / store).
    """
    path = directory / MANIFEST_FILENAME
    if not path.is_file():
        raise DataError(
            f"{str(directory)!r} holds no manifest.json: not a retrac index; build one with `retrac build`."
        )
    manifest = read_json(path, "index manifest", DataError)
    store = manifest.get("store") if isinstance(manifest, dict) else None
    if "method" not in manifest or not isinstance(store, dict) or not isinstance(store.get("path"), str):
        raise DataError(
            f"{str(path)!r} is not an attribution index manifest (no method / store); build it with `retrac build`."
        )
    return manifest


def index_folders(path: Path) -> list[Path]:
    """``path`` when it is an index folder, else its subfolders that are index parts (a parts folder)."""
    if (path / MANIFEST_FILENAME).is_file() or not path.is_dir():
        return [path]
    parts = []
    for sub in sorted(p for p in path.iterdir() if (p / MANIFEST_FILENAME).is_file()):
        manifest = read_json(sub / MANIFEST_FILENAME, "index manifest", DataError)
        if isinstance(manifest, dict) and PART_KEY in manifest:
            parts.append(sub)
    return parts or [path]


def open_sources(given: Sequence[str | Path]) -> list[IndexSource]:
    """The indexes and parts of ``--index`` values: folders, folders of parts, part server URLs.

    Raises:
        DataError: a folder that is no index, a server that cannot be reached or holds no part.
    """
    sources = []
    for item in given:
        if is_remote(item):
            server = PartServer(str(item))
            entries = server.listing().get("parts") or []
            if not entries:
                raise DataError(
                    f"index part server {server.url} holds no index part; start it with --index PART."
                )
            for entry in entries:
                part = RemoteIndexPart(server, entry)
                sources.append(IndexSource(part.where, part.manifest, part))
        else:
            for directory in index_folders(Path(item)):
                sources.append(IndexSource(str(directory), read_index_manifest(directory)))
    return sources


def store_expectation(store) -> dict:
    """The manifest entries an index of ``store`` must hold (its store, the store's path aside, and its
    checkpoints): what the ``Attributor`` would write itself."""
    expect = index_manifest(store, Method.named(DEFAULT_METHOD), None)
    expect = {"store": expect["store"], "checkpoints": expect["checkpoints"]}
    expect["store"].pop("path")  # the store may have moved; its fingerprint must match
    return expect


def load_local(
    directory: str | Path, manifest: dict, store, expect: dict
) -> tuple[SearchIndex, Method, Kernel | None, IndexPart]:
    """Load an index folder (whole or a part) of ``store``: seal and digests, then the method re-derived.

    Returns:
        ``(index, method, kernel, part)``; the index's exact fallback streams the part's own rows.

    Raises:
        StoreMismatchError, IndexDamagedError, DataError: as ``load_index`` and ``derive_method``.
    """
    index = load_index(directory, expect=expect)  # seal and file digests checked first
    # The method is re-derived from what was built (the rows against the store, kernel.npz),
    # never taken from the manifest alone: docs/design.md section 6.
    method, kernel = derive_method(directory, manifest, index, store)
    part = IndexPart.from_manifest(manifest)
    if index.num_vectors != part.num_rows or part.stop > store.num_samples:
        raise IndexDamagedError(
            f"{directory}: {part.label} does not fit its {index.num_vectors} vectors or the store's "
            f"{store.num_samples} rows; {rebuild_command(manifest, directory)}."
        )
    rows = None if part.count == 1 else (part.start, part.stop)
    index.vector_source = lambda: train_vector_blocks(store, method, rows=rows)
    return index, method, kernel, part


def _check_remote(source: IndexSource, expect: dict) -> Method:
    """A part server's manifest: of this store and checkpoints, sealed, of a method."""
    normalized = json.loads(json.dumps(expect, default=str))
    diffs = record_differences(normalized, source.manifest, actual_name="index has")
    if diffs:
        raise StoreMismatchError(
            f"index part {source.where} was built with other settings: " + "; ".join(diffs) + ". Serve the "
            "parts of this store's index (retrac build --part I/N)."
        )
    check_manifest(source.where, source.manifest)  # format version and seal
    return Method(**source.manifest["method"])  # re-derived by the part server when it loaded the part


def _check_one_build(name: str, members: list) -> None:
    """Parts of one method must have one method entry and kernels that agree (float rounding aside)."""
    first_source, _, first_method, _ = members[0]
    first_kernel = first_source.manifest.get("kernel")
    for source, _, method, _ in members[1:]:
        kernel = source.manifest.get("kernel")
        same_kernel = (kernel is None) == (first_kernel is None) and (
            kernel is None
            or np.allclose(kernel["lambdas"], first_kernel["lambdas"], rtol=KERNEL_RTOL, atol=0.0)
        )
        if method.to_dict() != first_method.to_dict() or not same_kernel:
            raise ConfigError(
                f"the {name} index parts {first_source.where} and {source.where} come from different builds "
                f"(method {first_method.to_dict()} / {method.to_dict()}, kernel lambdas differ or not); "
                "give the parts of one build."
            )


def load_indexes(sources: Sequence[IndexSource], store) -> dict[str, LoadedIndex]:
    """The index of each method: a folder as it is, parts checked and merged into a :class:`PartedIndex`.

    Raises:
        ConfigError: two whole indexes of one method; parts that do not cover the store exactly once
            (the missing or overlapping part named), or come from different builds.
        StoreMismatchError, IndexDamagedError, DataError: an index or part of another store or
            checkpoints, damaged or unreadable.
    """
    expect = store_expectation(store)
    groups: dict[str, list[tuple[IndexSource, Any, Method, Kernel | None]]] = {}
    for source in sources:
        if source.remote is not None:
            method = _check_remote(source, expect)
            groups.setdefault(method.name, []).append((source, source.remote, method, None))
            continue
        index, method, kernel, part = load_local(source.where, source.manifest, store, expect)
        vectors = open_rerank_vectors(source.where, source.manifest, index.num_vectors, index.dim)
        local = LocalIndexPart(index, part, vectors)
        groups.setdefault(method.name, []).append((source, local, method, kernel))
    loaded = {}
    for name, members in groups.items():
        source, part, method, kernel = members[0]
        if len(members) > 1 and all(m[1].part.count == 1 for m in members):
            raise ConfigError(f"two indexes of method {name!r}; give one index per method.")
        if len(members) == 1 and source.remote is None and part.part.count == 1:  # one folder, as it is
            preconditioners = None if kernel is None else kernel.preconditioners
            loaded[name] = LoadedIndex(
                Path(source.where), source.manifest, method, part.index, preconditioners, part.vectors
            )
            continue
        order = check_cover(name, [(m[0].where, m[1].part) for m in members], store.num_samples)
        members = [members[i] for i in order]
        _check_one_build(name, members)
        source, part, method, kernel = members[0]
        if kernel is None and method.uses_kernel:  # the first part is remote: its kernel.npz, checked
            kernel = part.kernel()
        preconditioners = None if kernel is None else kernel.preconditioners
        parted = PartedIndex([m[1] for m in members])
        vectors = PartVectors.of(members)
        loaded[name] = LoadedIndex(source.where, source.manifest, method, parted, preconditioners, vectors)
    return loaded


class PartVectors:
    """The ``vectors.npy`` of local parts (``--rerank-vectors``), indexed by store rows like one array."""

    def __init__(self, parts: list[tuple[IndexPart, VectorRows]]) -> None:
        self.parts = parts  # in row order, covering the store once (check_cover)
        self.starts = np.array([part.start for part, _ in parts])

    @classmethod
    def of(cls, members: list) -> PartVectors | None:
        """The parts' vectors when every part is a local folder built with them, else ``None``."""
        parts = [m[1] for m in members]
        if any(not isinstance(p, LocalIndexPart) or p.vectors is None for p in parts):
            return None
        return cls([(p.part, p.vectors) for p in parts])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((rows.shape[0], self.parts[0][1].shape[1]), dtype=np.float32)
        for number in np.unique(which):
            where = np.flatnonzero(which == number)
            part, vectors = self.parts[number]
            out[where] = vectors[rows[where] - part.start]
        return out


class LocalIndexPart:
    """A loaded index folder searched as a part: rows returned are store rows (``part.start`` added);
    ``vectors``: its ``vectors.npy`` rows (``open_rerank_vectors``), or ``None``."""

    def __init__(self, index: SearchIndex, part: IndexPart, vectors=None) -> None:
        self.index, self.part, self.vectors = index, part, vectors
        self.num_vectors, self.dim = index.num_vectors, index.dim
        self.kind, self.factory, self.exact = index.kind, index.factory, index.exact
        self.recall, self.search_params = index.recall, index.search_params

    def find(
        self, queries: np.ndarray, k: int, opponents: bool = False, ef_search: int | None = None
    ) -> PartHits:
        found = self.index.find(queries, k, opponents=opponents, ef_search=ef_search)
        return PartHits(found.scores, found.indices + self.part.start, found.note)


@dataclass(frozen=True)
class MergedResult:
    """The best ``k`` of every part's top ``k``: what ``SearchIndex.find`` returns, for parts.

    Attributes:
        scores: ``(n_query, k)`` float32 ``<U(z), Q(z')>``, best first (ascending for opponents).
        indices: ``(n_query, k)`` int64 store rows.
        k: results per query.
        note: how parts filled short queries (each part's note, named), or ``None``.
    """

    scores: np.ndarray
    indices: np.ndarray
    k: int
    note: str | None = None


def merge_hits(hits: Sequence[PartHits], k: int, opponents: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the parts' hits per query: by score (descending; ascending for opponents),
    ties by store row. Returns ``scores (n, k)`` float32 and ``rows (n, k)`` int64."""
    scores = np.concatenate([h.scores for h in hits], axis=1)
    rows = np.concatenate([h.rows for h in hits], axis=1)
    order = np.lexsort((rows, scores if opponents else -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class PartedIndex:
    """N index parts (local or on part servers) searched as one index over the whole store.

    Offers what the ``Attributor`` and ``retrac serve`` read of a ``SearchIndex``: ``find``,
    ``num_vectors``, ``dim``, ``kind`` (``"parts"``), ``factory``, ``exact``, ``recall`` (the lowest
    part's ``recall_at_10``, with every part's record), ``search_params`` (the parts' when they agree).

    Args:
        parts: :class:`LocalIndexPart` / ``RemoteIndexPart`` in row order, covering the store once.
    """

    kind = "parts"

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.num_vectors = sum(p.num_vectors for p in self.parts)
        self.dim = self.parts[0].dim
        self.factory = " | ".join(dict.fromkeys(p.factory for p in self.parts))
        self.exact = all(p.exact for p in self.parts)
        recalls = [p.recall for p in self.parts]
        known = [r["recall_at_10"] for r in recalls if r and "recall_at_10" in r]
        self.recall = None if not known else {"recall_at_10": min(known), "parts": recalls}
        params = [p.search_params for p in self.parts]
        self.search_params = params[0] if all(p == params[0] for p in params) else {}

    def find(
        self, queries: np.ndarray, k: int, opponents: bool = False, ef_search: int | None = None
    ) -> MergedResult:
        """Top ``k`` over every part: each part's top ``min(k, its rows)``, merged by score.

        Args and raises: as ``SearchIndex.find`` (``k`` at most the store's rows).
        """
        _check_int_in_range(
            "k", k, self.num_vectors, "the number of vectors in the index parts; ask for fewer"
        )
        queries = _as_queries(queries, self.dim)  # checked once, at the front

        def search(part) -> PartHits:
            return part.find(queries, min(int(k), part.num_vectors), opponents, ef_search)

        if len(self.parts) == 1:
            hits = [search(self.parts[0])]
        else:
            with ThreadPoolExecutor(min(len(self.parts), MAX_PART_THREADS)) as pool:
                hits = list(pool.map(search, self.parts))
        scores, rows = merge_hits(hits, int(k), opponents)
        notes = [f"{p.part.label}: {h.note}" for p, h in zip(self.parts, hits, strict=True) if h.note]
        return MergedResult(scores, rows, int(k), " ".join(notes) or None)
