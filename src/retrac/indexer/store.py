"""The feature store (docs/design.md section 3): one Zarr v3 group per featurization.

A store lives in a local folder or under an object-storage prefix (``s3://``, ``gs://``, ``memory://``,
``file://``; :mod:`retrac.indexer.location`); the ledger and the claims of work stealing are small
JSON objects beside the arrays, each written whole. ``layout`` ``compact`` keeps ``vectors`` instead
of ``features`` (:mod:`retrac.indexer.layout`).

Layout of a store ``STORE/``::

    zarr.json                          root group; attributes below
    ids                                (N,) str       sample ids, in row order
    checkpoint-KK/features             (N, S, d)      float16 | float32   phi_k(z, e)
    checkpoint-KK/norms                (N, S)         float32             n_k(z, e)
    checkpoint-KK/timesteps            (N, S)         int32               t of each event (-1: padding)
    checkpoint-KK/valid                (N, S)         bool                False for replay padding slots
    ledger/checkpoint-KK/shard-SSSSSS.json            completion ledger: one entry per shard of rows

Rows are split into shards of ``shard_rows`` samples. A shard is the unit of work: one writer
computes it whole and writes each array's region of it, which is exactly one Zarr shard (``features``,
inner chunks of at least about 1 MB) or one chunk (the small arrays), so two writers never share a
file. Only then is the ledger entry written (atomically, through ``retrac._io``); a shard without an
entry may be torn and is rewritten whole by a resumed run.

Root attributes: ``format`` (name, version), ``config`` (:class:`IndexConfig` less runtime
fields), ``task``, ``projectors`` (per checkpoint: kind, dim, seed, backend, norm kind),
``norm_kind``, ``events`` (the resolved schedule with ``num_events``), ``checkpoints`` (path,
weight, sha256, step, scheduler config), ``dataset`` (size, fingerprint, source), ``layout``,
``integrity`` (the sha256 of the ids) and library ``versions``.

Integrity: each ledger entry records the sha256 of its shard's data (``features``, ``norms``,
``timesteps``, ``valid`` in their stored dtypes, row-major, in that order). Every read of a whole
shard (:meth:`FeatureStore.read_shard`, :meth:`FeatureStore.blocks`, which the index build streams)
recomputes it, so a changed, missing (read back as fill values) or truncated chunk, or a ledger entry
for data that was never written, is refused with :class:`~retrac.errors.StoreDamagedError` naming the
checkpoint, the shard and the ``retrac index`` command that recomputes it; a resumed ``retrac index``
recomputes every shard that fails its digest. ``retrac verify STORE`` checks them all.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from retrac._io import atomic_write_text, record_differences
from retrac.checkpoints import Checkpoint
from retrac.errors import (
    CompactStoreError,
    ConfigError,
    DataError,
    GradientError,
    StoreDamagedError,
    StoreMismatchError,
)
from retrac.indexer.block import FeatureBlock
from retrac.indexer.config import IndexConfig
from retrac.indexer.create import create_local, create_remote
from retrac.indexer.integrity import (
    ids_digest,
    ids_digest_problem,
    index_command,
    ledger_entry_problem,
    shard_digest,
    unreadable_ids,
)
from retrac.indexer.layout import checkpoint_group, shard_arrays
from retrac.indexer.location import LocalLocation, ObjectLocation, open_location
from retrac.query.vectors import train_vectors

FORMAT_NAME = "retrac-feature-store"
FORMAT_VERSION = 2  # 2: ids digest in the root attributes, scheduler config per checkpoint record
LOCATION_KEYS = ("path", "log", "source")  # where things live, not what they are: not compared
COMPARED_KEYS = ("format", "config", "task", "projectors", "events", "checkpoints", "dataset")
LEDGER_NAME = re.compile(r"shard-(\d+)\.json")


def _strip_locations(value):
    if isinstance(value, dict):
        return {k: _strip_locations(v) for k, v in value.items() if k not in LOCATION_KEYS}
    if isinstance(value, list):
        return [_strip_locations(v) for v in value]
    return value


def comparable(attrs: dict) -> dict:
    """The part of a store's attributes that identifies its content (no file locations, no versions)."""
    return _strip_locations({k: attrs.get(k) for k in COMPARED_KEYS})


def fingerprint_of(attrs: dict) -> str:
    """sha256 of the canonical JSON of :func:`comparable` ``(attrs)``."""
    text = json.dumps(comparable(attrs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureStore:
    """A featurization on disk: read API for the query side, shard writes for the indexer.

    Open an existing store with :meth:`open`. Attributes: ``attrs`` (root attributes), ``config``
    (:class:`IndexConfig`), ``checkpoints`` (:class:`Checkpoint` list), ``ids``, ``num_samples``,
    ``num_checkpoints``, ``num_events`` (``S``), ``dim`` (``d``), ``norm_kind``, ``fingerprint``,
    ``layout`` (``full`` / ``compact``), ``location`` and ``url`` (a local path or an object-storage URL;
    ``path`` is the local ``Path``, or the URL).
    """

    def __init__(self, location: LocalLocation | ObjectLocation, group) -> None:
        self.location = location
        self.path: Path | str = location.path if location.is_local else location.url
        self.url: str = str(location.path.resolve()) if location.is_local else location.url
        self._group = group
        self.attrs: dict = dict(group.attrs)
        self.config = IndexConfig.from_dict(self.attrs["config"])
        self.checkpoints = [Checkpoint(**c) for c in self.attrs["checkpoints"]]
        layout = self.attrs["layout"]
        self.num_samples: int = int(layout["num_samples"])
        self.num_events: int = int(layout["num_events"])
        self.dim: int = int(layout["dim"])
        self.shard_rows: int = int(layout["shard_rows"])
        self.num_shards: int = int(layout["num_shards"])
        self.norm_kind: str = self.attrs["norm_kind"]
        self.layout: str = layout.get("kind", "full")
        self.shard_arrays: tuple[str, ...] = shard_arrays(self.layout)
        self.fingerprint: str = fingerprint_of(self.attrs)
        self._ids: list[str] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a store for reading (complete or not; see :attr:`is_complete`).

        Args:
            path: a folder, or a ``file://``, ``s3://``, ``gs://`` or ``memory://`` URL.

        Raises:
            DataError: no retrac store at ``path``, one of another format version, or an
                object-storage URL that cannot be reached.
        """
        import zarr

        location = open_location(path)
        path = location.path if location.is_local else location.url
        if not location.is_local and not location.exists("zarr.json"):  # network errors: a DataError
            raise DataError(
                f"{str(path)!r} is not a retrac feature store (no zarr.json); create one with `retrac index`."
            )
        try:
            group = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
        except Exception as exc:
            raise DataError(
                f"{str(path)!r} is not a retrac feature store ({type(exc).__name__}: {exc}); "
                "create one with `retrac index`."
            ) from exc
        fmt = dict(group.attrs).get("format", {})
        if fmt.get("name") != FORMAT_NAME:
            raise DataError(f"{str(path)!r} is a Zarr group but not a retrac feature store (format {fmt!r}).")
        if fmt.get("version") != FORMAT_VERSION:
            raise DataError(
                f"store {str(path)!r} has format version {fmt.get('version')}, this retrac reads version "
                f"{FORMAT_VERSION} (version 1 recorded no digest of the ids nor the scheduler's config, which "
                "are now checked); featurize again with `retrac index` into a new --out."
            )
        return cls(location, group)

    @classmethod
    def create_or_open(cls, path: str | Path, attrs: dict, ids: list[str]) -> FeatureStore:
        """Create the store (atomically) or open it and check it matches.

        A local store is built in a hidden sibling folder and renamed into place; on object storage
        the metadata is built in memory, copied, and the root ``zarr.json`` is created last with a
        conditional PUT, so a store is visible only once whole and two creators cannot both win.

        Raises:
            ConfigError: ``path`` is a file, a non-store folder or prefix, or cannot be written.
            StoreMismatchError: the store exists with other settings; every difference is named.
            DataError: an object-storage URL that cannot be reached.
        """
        location = open_location(path)
        if location.is_local:
            path = location.path
            if path.is_file():
                raise ConfigError(f"--out {str(path)!r} is a file; give a folder path for the store.")
            if not (path.is_dir() and (path / "zarr.json").is_file()):
                # re-check zarr.json: another process may have renamed a finished store into place meanwhile
                if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").is_file():
                    raise ConfigError(
                        f"--out {str(path)!r} is a non-empty folder that is not a retrac store; give a new path."
                    )
                create_local(path, attrs, ids)
        elif not location.exists("zarr.json"):
            create_remote(location, attrs, ids)
        store = cls.open(location)
        diffs = record_differences(
            comparable(store.attrs),
            comparable(attrs),
            expected_name="stored",
            actual_name="given",
            both_ways=True,
        )
        if diffs:
            raise StoreMismatchError(
                f"the store {store.url!r} was written with other settings; differences (stored vs given):\n  "
                + "\n  ".join(diffs)
                + "\nrerun with the store's settings, or give a new --out."
            )
        return store

    # ------------------------------------------------------------------ facts
    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def ids(self) -> list[str]:
        """The ``N`` sample ids in row order (checked against the recorded digest).

        Raises:
            StoreDamagedError: the ids cannot be read or differ from the ones the store was made with.
        """
        if self._ids is None:
            try:
                ids = [str(i) for i in self._group["ids"][:]]
                problem = ids_digest_problem([ids], self.num_samples, self.attrs)
            except Exception as exc:  # a missing array or a truncated chunk
                problem = unreadable_ids(exc)
            self._raise_if_damaged_ids(problem)  # raises whenever there is a problem, so ids is bound below
            self._ids = ids
        return self._ids

    def ids_problem(self, chunk_rows: int = 1 << 16) -> str | None:
        """Why the stored ids cannot be trusted (``None``: they match their digest); streamed by chunks."""

        def read():
            array = self._group["ids"]
            for start in range(0, array.shape[0], chunk_rows):
                yield array[start : start + chunk_rows]

        return ids_digest_problem(read(), self.num_samples, self.attrs)

    def check_ids(self) -> None:
        """:meth:`ids_problem` as an error: raises StoreDamagedError naming the command that repairs it."""
        self._raise_if_damaged_ids(self.ids_problem())

    def _raise_if_damaged_ids(self, problem: str | None) -> None:
        if problem:
            raise StoreDamagedError(f"store {self.url!r} is damaged: {problem}; {self.recompute_hint()}")

    def rewrite_ids(self, ids: list[str]) -> None:
        """Write the ids again (a resumed featurization repairing a damaged ids chunk).

        Raises:
            StoreMismatchError: ``ids`` are not the ones whose digest the store recorded.
        """
        if ids_digest(ids) != (self.attrs.get("integrity") or {}).get("ids_sha256"):
            raise StoreMismatchError(f"these ids are not the ones the store {self.url!r} was made with.")
        self._writable_group()["ids"][:] = np.asarray(ids, dtype=str)
        self._ids = None

    def recompute_hint(self, k: int | None = None, shard: int | None = None) -> str:
        """The remedy for damage: rerun the store's ``retrac index`` command, naming what it recomputes."""
        what = "the damaged data will be rewritten"
        if k is not None and shard is not None:
            what = f"shard {shard} of {checkpoint_group(k)} will be recomputed"
        try:
            command = index_command(self.attrs, self.path)
        except Exception:  # attributes too damaged to spell the command out
            command = f"retrac index ... --out {self.url}"
        return f"rerun `retrac index` with the same arguments (`{command}`): {what}"

    @property
    def weights(self) -> list[float]:
        """``w_k`` of every checkpoint."""
        return [c.weight for c in self.checkpoints]

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``shard``."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_samples)

    # ------------------------------------------------------------------ ledger
    def _ledger_key(self, k: int, shard: int) -> str:
        return f"ledger/{checkpoint_group(k)}/shard-{shard:06d}.json"

    def completed_shards(self, k: int) -> set[int]:
        """Shards of checkpoint ``k`` whose ledger entry exists (their data was written whole).

        Cheap: the data is not read (one listing). :meth:`shard_problem` checks a shard's digest.
        """
        names = self.location.list(f"ledger/{checkpoint_group(k)}")
        return {int(m.group(1)) for name in names if (m := LEDGER_NAME.fullmatch(name))}

    def ledger_entry(self, k: int, shard: int) -> dict | None:
        """The ledger entry of shard ``shard`` of checkpoint ``k`` (``None``: not computed yet).

        Raises:
            StoreDamagedError: the entry is unreadable or describes another shard.
        """
        key = self._ledger_key(k, shard)
        name = key.rpartition("/")[2]
        try:
            text = self.location.read_text(key)
            if text is None:
                return None
            entry = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged(k, shard, f"its ledger entry {name} cannot be read ({exc})") from None
        problem = ledger_entry_problem(entry, k, shard, self.shard_range(shard))
        if problem:
            raise self._damaged(k, shard, f"its ledger entry {name} is not valid: {problem}")
        return entry

    def drop_ledger_entry(self, k: int, shard: int) -> None:
        """Forget that shard ``shard`` of checkpoint ``k`` was computed (before recomputing it)."""
        self.location.delete(self._ledger_key(k, shard))

    def _write_ledger_entry(self, k: int, shard: int, entry: dict) -> None:
        text = json.dumps(entry, sort_keys=True)
        if self.location.is_local:  # through retrac._io: temporary file, then one rename
            atomic_write_text(self.location.file(self._ledger_key(k, shard)), text)
        else:  # one whole-object PUT is atomic
            self.location.write_text(self._ledger_key(k, shard), text)

    def missing(self) -> list[tuple[int, int]]:
        """``(checkpoint, shard)`` pairs not yet in the ledger."""
        return [
            (k, s)
            for k in range(self.num_checkpoints)
            for s in sorted(set(range(self.num_shards)) - self.completed_shards(k))
        ]

    @property
    def is_complete(self) -> bool:
        """Whether every shard of every checkpoint is in the ledger."""
        return not self.missing()

    def require_complete(self) -> None:
        """Raise ``DataError`` naming the missing shards unless the store is complete."""
        missing = self.missing()
        if missing:
            raise DataError(
                f"store {self.url!r} is incomplete: {len(missing)} (checkpoint, shard) pairs are missing, "
                f"e.g. {missing[:3]}; rerun the same `retrac index` command (every --shard I/N) to finish it."
            )

    # ------------------------------------------------------------------ writing
    def write_shard(
        self,
        k: int,
        shard: int,
        features: np.ndarray,
        norms: np.ndarray,
        timesteps: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """Write one whole shard of checkpoint ``k``, then its ledger entry (atomically).

        ``features`` ``(n, S, d)`` float32 are stored as they are (full layout) or turned into the
        TracIn and ReTrac train vectors first (compact layout, :func:`~retrac.indexer.layout.compact_vectors`).
        """
        from retrac.indexer.layout import compact_vectors

        start, stop = self.shard_range(shard)
        group = self._writable_group()[checkpoint_group(k)]
        first = self.shard_arrays[0]
        if self.layout == "compact":
            features = compact_vectors(
                np.asarray(features, dtype=np.float32), norms, valid, self.ids[start:stop]
            )
        arrays = {
            first: np.ascontiguousarray(features, dtype=self.attrs["layout"]["dtype"]),
            "norms": np.ascontiguousarray(norms, dtype=np.float32),
            "timesteps": np.ascontiguousarray(timesteps, dtype=np.int32),
            "valid": np.ascontiguousarray(valid, dtype=bool),
        }
        for name, data in arrays.items():
            self._write_region(group[name], start, stop, data)
        # the digest of the shard's data, recorded in its ledger entry and checked by read_shard
        digest = shard_digest(arrays, self.shard_arrays)
        entry = {"checkpoint": k, "shard": shard, "rows": [start, stop], "sha256": digest}
        # the ledger entry appears only once the data is whole
        self._write_ledger_entry(k, shard, entry)

    @staticmethod
    def _write_region(array, start: int, stop: int, data: np.ndarray) -> None:
        array[start:stop] = data

    def _writable_group(self):
        import zarr

        if not hasattr(self, "_write_group"):
            self._write_group = zarr.open_group(
                self.location.zarr_store(read_only=False), mode="r+", zarr_format=3
            )
        return self._write_group

    # ------------------------------------------------------------------ reading
    def _array(self, k: int, name: str):
        if not 0 <= k < self.num_checkpoints:
            raise ConfigError(f"checkpoint index {k} is out of range; the store has {self.num_checkpoints}.")
        return self._group[f"{checkpoint_group(k)}/{name}"]

    def _read(self, k: int, name: str, rows: slice) -> np.ndarray:
        """Rows ``rows`` of array ``name`` of checkpoint ``k`` in the stored dtype."""
        if not 0 <= k < self.num_checkpoints:
            raise ConfigError(f"checkpoint index {k} is out of range; the store has {self.num_checkpoints}.")
        try:
            return np.asarray(self._array(k, name)[rows])
        except Exception as exc:  # a missing array, a truncated or otherwise unreadable chunk
            raise StoreDamagedError(
                f"store {self.url!r} is damaged: {checkpoint_group(k)}/{name} rows {rows.start}-{rows.stop} "
                f"cannot be read ({type(exc).__name__}: {exc}); {self.recompute_hint()}"
            ) from None

    def features(self, k: int, rows: slice = slice(None)) -> np.ndarray:
        """``phi_k`` of rows ``rows``: ``(n, S, d)`` float32 (not digest-checked: :meth:`read_shard` is).

        Raises:
            CompactStoreError: a compact store keeps no per-event features.
        """
        self.require_events("reading per-event features (FeatureStore.features)")
        return np.asarray(self._read(k, "features", rows), dtype=np.float32)

    def require_events(self, use: str) -> None:
        """Refuse ``use`` on a compact store: it needs every event's features, which only a full store keeps."""
        if self.layout == "compact":
            raise CompactStoreError(
                f"{use} needs every event's features, but the store {self.url!r} is compact (it keeps only the "
                "per-sample TracIn and ReTrac train vectors and the per-event norms); featurize again with "
                "--layout full into a new --out."
            )

    def train_vectors(self, k: int, kind: str, rows: slice = slice(None)) -> np.ndarray:
        """``u_k(z)`` of ``kind`` (``tracin`` / ``retrac``) for rows ``rows``: ``(n, d)`` float32.

        A full store forms them from the features (:func:`~retrac.query.vectors.train_vectors`); a
        compact store reads the ones it kept. Both give the same bits for a float32 store.
        """
        if self.layout == "compact":
            block = FeatureBlock(0, 0, None, self.norms(k, rows), None, self.valid(k, rows))
            block.vectors = np.asarray(self._read(k, "vectors", rows), dtype=np.float32)
            return block.train_vectors(kind)
        ids = self.ids[rows]
        return train_vectors(self.features(k, rows), self.norms(k, rows), kind, self.valid(k, rows), ids)

    def vector_blocks(
        self, k: int, kind: str, block_rows: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Stream ``(start, u_k)`` blocks of checkpoint ``k``: ``u_k`` is ``(n, d)`` float32, unweighted.

        Digest-checked as :meth:`blocks` is (``rows`` too); works on full and compact stores alike. The
        ids are read only to name a sample in an error, so memory does not grow with ``N``.
        """
        for block in self.blocks(k, block_rows, rows=rows):
            try:
                vectors = block.train_vectors(kind)
            except GradientError:  # again, naming the sample
                vectors = block.train_vectors(kind, self.ids[block.start : block.stop])
            yield block.start, vectors

    def norms(self, k: int, rows: slice = slice(None)) -> np.ndarray:
        """``n_k`` of rows ``rows``: ``(n, S)`` float32 (exact or projected: see ``norm_kind``)."""
        return np.asarray(self._read(k, "norms", rows), dtype=np.float32)

    def timesteps(self, k: int, rows: slice = slice(None)) -> np.ndarray:
        """Timesteps of the events of rows ``rows``: ``(n, S)`` int32, ``-1`` in padding slots."""
        return self._read(k, "timesteps", rows)

    def valid(self, k: int, rows: slice = slice(None)) -> np.ndarray:
        """Which event slots of rows ``rows`` hold an event: ``(n, S)`` bool."""
        return np.asarray(self._read(k, "valid", rows), dtype=bool)

    def _damaged(self, k: int, shard: int, problem: str) -> StoreDamagedError:
        """The error for a damaged shard; ``.where`` and ``.problem`` hold its parts (``retrac verify``)."""
        start, stop = self.shard_range(shard)
        where = f"shard {shard} (rows {start}-{stop}) of {checkpoint_group(k)}"
        error = StoreDamagedError(
            f"store {self.url!r} is damaged: {where}: {problem}; {self.recompute_hint(k, shard)}"
        )
        error.where, error.problem = where, problem
        return error

    def read_shard(self, k: int, shard: int, verify: bool = True) -> FeatureBlock:
        """Read one whole shard of checkpoint ``k``, checking it against its ledger digest.

        Costs one sha256 pass over data that is read anyway (docs/design.md section 3).

        Args:
            k: the checkpoint.
            shard: the shard (rows :meth:`shard_range` ``(shard)``).
            verify: check the ledger entry and the digest (``False``: read as is).

        Returns:
            The shard as a :class:`FeatureBlock` of float32 / int32 / bool arrays.

        Raises:
            StoreDamagedError: no ledger entry (never computed), an unreadable chunk, or data whose
                sha256 differs from the ledger's (a changed or missing chunk, a forged entry).
        """
        start, stop = self.shard_range(shard)
        entry = self.ledger_entry(k, shard) if verify else None
        if verify and entry is None:
            raise self._damaged(k, shard, "it has no ledger entry (it was never computed)")
        raw = {}
        for name in self.shard_arrays:
            try:
                raw[name] = np.asarray(self._group[f"{checkpoint_group(k)}/{name}"][start:stop])
            except KeyError:
                raise self._damaged(k, shard, f"array {name} is missing") from None
            except Exception as exc:  # a truncated or otherwise unreadable chunk
                raise self._damaged(
                    k, shard, f"array {name} cannot be read ({type(exc).__name__}: {exc})"
                ) from None
        if verify:
            actual = shard_digest(raw, self.shard_arrays)
            if actual != entry["sha256"]:
                raise self._damaged(
                    k,
                    shard,
                    f"its data has sha256 {actual[:12]}..., its ledger entry records {entry['sha256'][:12]}... "
                    "(a changed or missing chunk, or an entry for data never written)",
                )
        read_dtypes = (np.float32, np.float32, np.int32, bool)  # features | vectors, norms, timesteps, valid
        arrays = {n: np.asarray(raw[n], dtype=t) for n, t in zip(self.shard_arrays, read_dtypes, strict=True)}
        return FeatureBlock(start, stop, arrays.pop("features", None), **arrays)

    def shard_problem(self, k: int, shard: int) -> str | None:
        """Why shard ``shard`` of checkpoint ``k`` is not whole (``None``: it matches its digest)."""
        try:
            self.read_shard(k, shard)
        except StoreDamagedError as exc:
            return getattr(exc, "problem", str(exc))
        return None

    def blocks(
        self, k: int, block_rows: int | None = None, verify: bool = True, rows: tuple[int, int] | None = None
    ) -> Iterator[FeatureBlock]:
        """Stream checkpoint ``k`` (its rows ``[start, stop)`` given ``rows``) in blocks of ``block_rows``.

        Shards (those holding the rows) are read whole and, with ``verify``, checked against their ledger
        digests as they stream (:meth:`read_shard`), so a damaged store is refused before a block of it is
        used. A block is one shard unless ``block_rows`` is given.

        Raises:
            StoreDamagedError: a shard fails its digest (names the checkpoint, the shard and the fix).
        """
        step = block_rows or self.shard_rows
        if step < 1:
            raise ConfigError(f"block_rows={block_rows} must be at least 1.")
        start, stop = (0, self.num_samples) if rows is None else rows
        buffer = None
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
            block = self.read_shard(k, shard, verify)
            block = block.rows(max(block.start, start), min(block.stop, stop))  # a view; whole unless rows
            buffer = block if buffer is None else buffer.join(block)
            while buffer.stop - buffer.start >= step:
                yield buffer.rows(buffer.start, buffer.start + step)
                buffer = buffer.rows(buffer.start + step, buffer.stop)
        if buffer is not None and buffer.stop > buffer.start:
            yield buffer

    def projector(self, k: int, task):
        """Rebuild ``P_k`` (recorded kind, dim, seed, backend) for the query side.

        Features the query side makes with it and :func:`retrac.projection.projected_gradients` are
        identical to the stored ones for the same model, sample and events.

        Raises:
            StoreMismatchError: ``task`` counts another number of parameters than the store's.
        """
        from retrac.projection import projector_from_dict

        record = self._projector_record(k)
        if task.num_parameters != record["num_parameters"]:
            raise StoreMismatchError(
                f"the task counts {task.num_parameters} parameters, the store's projector was built for "
                f"{record['num_parameters']}; use the same model and include/exclude patterns as the store "
                f"({self.attrs['task']['include']} / {self.attrs['task']['exclude']})."
            )
        return projector_from_dict(record, task)

    def _projector_record(self, k: int) -> dict:
        if not 0 <= k < self.num_checkpoints:
            raise ConfigError(f"checkpoint index {k} is out of range; the store has {self.num_checkpoints}.")
        return self.attrs["projectors"][k]

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, N={self.num_samples}, K={self.num_checkpoints}, "
            f"S={self.num_events}, d={self.dim}, complete={self.is_complete})"
        )
