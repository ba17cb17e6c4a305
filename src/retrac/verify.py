"""``retrac verify PATH``: check a feature store (or an index folder) against its recorded digests.

A store is whole when its ids match ``integrity.ids_sha256`` and every shard of every checkpoint has a
ledger entry whose sha256 matches the shard's data (docs/design.md section 3); ledger files that name
no shard of the store are never read and only noted. The check streams the store one shard at a
time. An index folder is checked against the digests its manifest records (streamed), its manifest
against its seal and format version, and, when its store is found, the method its manifest names against
the vectors of its rows (``retrac.query.provenance``, docs/design.md section 6).

Each kind of artifact has one verifier in ``VERIFIERS``: a function ``(path, progress) ->
VerifyReport`` and a test of whether a path holds that kind; :func:`verify` picks the one that fits.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from retrac._io import file_sha256, read_json
from retrac.errors import ConfigError, DataError, IndexDamagedError, StoreDamagedError, StoreMismatchError
from retrac.indexer.location import is_url, open_location
from retrac.indexer.store import LEDGER_NAME, FeatureStore, checkpoint_group


@dataclass(frozen=True)
class Problem:
    """One thing that is not whole: ``where`` (a shard, a file) and what is wrong with it."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found.

    Attributes:
        kind: ``"store"`` or ``"index"``.
        path: the artifact.
        checked: how many units were checked (shards for a store, files for an index).
        problems: one :class:`Problem` per damaged unit (empty when whole).
        remedy: how to repair a damaged artifact.
        notes: what could not be checked, and why.
    """

    kind: str
    path: Path
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    remedy: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per problem and note, then the verdict (with the remedy when damaged)."""
        out = [f"{self.path}: {problem}" for problem in self.problems]
        out += [f"{self.path}: note: {note}" for note in self.notes]
        units = "shards" if self.kind == "store" else "files"
        if self.problems:
            return [
                *out,
                f"{self.kind} {self.path} is damaged ({len(self.problems)} problems); {self.remedy}",
            ]
        return [*out, f"{self.kind} {self.path} is whole ({self.checked} {units} checked)"]


def _stray_ledger_entries(store: FeatureStore) -> list[Path]:
    """Files in ``ledger/`` that name no shard of ``store`` (a checkpoint or shard out of range)."""
    if not store.location.is_local:
        return []  # object storage: entries are listed by name; strays are never read either
    root = store.path / "ledger"
    known = {checkpoint_group(k) for k in range(store.num_checkpoints)}
    strays = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name not in known or not folder.is_dir():
            strays.append(folder)
            continue
        for file in sorted(folder.iterdir()):
            if file.name.startswith("."):
                continue  # the temporary file of an interrupted ledger write
            match = LEDGER_NAME.fullmatch(file.name)
            if not match or int(match.group(1)) >= store.num_shards:
                strays.append(file)
    return strays


def verify_store(path: str | Path, progress: bool = False) -> VerifyReport:
    """Check every shard of every checkpoint of a store against its ledger digest (streamed).

    Args:
        path: the store folder.
        progress: show a progress bar over the shards.

    Returns:
        The :class:`VerifyReport`; its ``remedy`` is the ``retrac index`` command that recomputes
        the damaged shards.

    Raises:
        DataError: ``path`` holds no readable retrac store of this format version.
    """
    store = FeatureStore.open(path)
    report = VerifyReport("store", store.path, remedy=store.recompute_hint())
    problem = store.ids_problem()
    if problem:
        report.problems.append(Problem("ids", problem))
    for stray in _stray_ledger_entries(store):  # never read, so they change no result
        report.notes.append(
            f"{stray.relative_to(store.path)} names no checkpoint or shard of this store (ignored)"
        )
    total = store.num_checkpoints * store.num_shards
    name = store.url.rstrip("/").rpartition("/")[2]
    with tqdm(total=total, desc=f"verify {name}", unit="shard", disable=not progress) as bar:
        for k in range(store.num_checkpoints):
            for shard in range(store.num_shards):
                start, stop = store.shard_range(shard)
                where = f"shard {shard} (rows {start}-{stop}) of {checkpoint_group(k)}"
                try:
                    store.read_shard(k, shard)
                except StoreDamagedError as error:
                    report.problems.append(Problem(where, getattr(error, "problem", str(error))))
                report.checked += 1
                bar.update()
    return report


def verify_index(path: str | Path, progress: bool = False) -> VerifyReport:
    """Check an index folder: its manifest reads, its files exist, and match the digests it records.

    The manifest's ``digests`` (``{file name: sha256}``) are checked with streamed reads; a manifest
    that records none is reported in ``notes`` (only presence and sizes were checked).

    Raises:
        DataError: ``path`` holds no readable manifest.
    """
    directory = Path(path)
    manifest = read_json(directory / "manifest.json", "index manifest", DataError)
    if not isinstance(manifest, dict):
        raise DataError(f"{directory / 'manifest.json'} is not an index manifest (not a JSON object).")
    from retrac.query.index import rebuild_command

    report = VerifyReport("index", directory, remedy=rebuild_command(manifest, directory))
    files = {manifest.get("index_file", "index.faiss"): manifest.get("index_file_bytes")}
    if manifest.get("kernel"):
        files[manifest["kernel"].get("file", "kernel.npz")] = None
    digests = manifest.get("digests") or {}
    if not digests:
        report.notes.append("the manifest records no file digests: only presence and sizes were checked")
    for name in sorted(set(files) | set(digests)):
        target = directory / name
        report.checked += 1
        if not target.is_file():
            report.problems.append(Problem(name, "missing"))
            continue
        size = files.get(name)
        if size is not None and target.stat().st_size != size:
            report.problems.append(
                Problem(name, f"{target.stat().st_size} bytes, the manifest records {size}")
            )
            continue
        recorded = digests.get(name)
        recorded = recorded.get("sha256") if isinstance(recorded, dict) else recorded
        if recorded is not None and (actual := file_sha256(target)) != recorded:
            report.problems.append(
                Problem(name, f"sha256 {actual[:12]}..., the manifest records {str(recorded)[:12]}...")
            )
    if not report.problems:
        _check_index_build(directory, manifest, report)
    return report


def _check_index_build(directory: Path, manifest: dict, report: VerifyReport) -> None:
    """The manifest's format and seal, a kernel file it does not list, and (when the store is here)
    the method it names against the index's rows: the checks ``Attributor`` makes at load."""
    from retrac.query.index import check_manifest, open_index
    from retrac.query.provenance import KERNEL_FILENAME, derive_method

    try:
        check_manifest(directory, manifest)
    except (StoreMismatchError, IndexDamagedError) as error:
        report.problems.append(Problem("manifest.json", str(error).split(";")[0]))
        return
    if (directory / KERNEL_FILENAME).is_file() and KERNEL_FILENAME not in (manifest.get("digests") or {}):
        report.problems.append(Problem(KERNEL_FILENAME, "not part of the build record (no digest)"))
        return
    recorded = manifest.get("store") if isinstance(manifest.get("store"), dict) else {}
    try:
        store = FeatureStore.open(recorded.get("path", ""))
    except (DataError, OSError, TypeError):
        report.notes.append(
            f"its store {recorded.get('path')!r} is not readable here: the method was not checked against the rows"
        )
        return
    if store.fingerprint != recorded.get("fingerprint"):
        report.notes.append(
            f"the store at {store.path} is another store: the method was not checked against the rows"
        )
        return
    try:
        derive_method(directory, manifest, open_index(directory, manifest, "cpu", mmap=True), store)
    except (IndexDamagedError, StoreDamagedError) as error:
        report.problems.append(Problem("method", str(error).split(": ", 1)[-1].split("; ")[0]))
    except DataError as error:
        report.problems.append(Problem(manifest.get("index_file", "index.faiss"), str(error).split(";")[0]))


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _is_index(path: Path) -> bool:
    return (path / "manifest.json").is_file()


VERIFIERS: dict[str, tuple[Callable[[Path], bool], Callable[..., VerifyReport]]] = {
    "store": (_is_store, verify_store),
    "index": (_is_index, verify_index),
}


def verify(path: str | Path, progress: bool = False) -> VerifyReport:
    """Verify a feature store or an index folder, whichever ``path`` holds.

    Raises:
        ConfigError: ``path`` is neither.
    """
    if is_url(path) and not str(path).startswith("file://"):
        return verify_store(str(path), progress)  # an object-storage store (s3://, gs://, memory://)
    path = open_location(path).path if is_url(path) else Path(path)
    for is_kind, verifier in VERIFIERS.values():
        if path.is_dir() and is_kind(path):
            return verifier(path, progress)
    raise ConfigError(
        f"{str(path)!r} is neither a feature store (zarr.json) nor an index folder (manifest.json); "
        "give the folder `retrac index` or `retrac build` wrote."
    )


def add_verify_command(sub) -> None:
    """Register ``retrac verify PATH`` (called by :func:`retrac.cli.build_parser`)."""
    p = sub.add_parser(
        "verify",
        help="check a feature store (or an index folder) against its recorded digests",
        description="Recompute the sha256 of every shard of a store (streamed) and compare it with the ledger; "
        "check the ids too. Prints one line per problem and the command that repairs them; exit code 2 when "
        "damaged, 0 when whole.",
    )
    p.add_argument("path", help="a store folder (`retrac index`) or an index folder (`retrac build`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    report = verify(args.path, progress=not args.no_progress)
    print("\n".join(report.lines()))
    return 0 if report.whole else 2
