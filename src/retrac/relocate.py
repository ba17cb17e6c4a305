"""Finding recorded files after their folder tree moved (docs/design.md section 7).

An index records its store's absolute path and, when both lie under a common root folder (not the
file system root), the store's path relative to the index folder. A store records its checkpoints'
and training data's absolute paths. After a move (``mv project/ elsewhere/``, a copy to another
machine), a recorded absolute path no longer exists; the file is then looked up *where the move put
it*: the store by its relative path from the index, and a checkpoint or the data by its position
relative to the store's old path, applied to the store's new path. Whatever is found is still
checked (the store by its fingerprint, a checkpoint by the sha256 of its weights, the data by its
fingerprint), so a wrong file is refused, never used.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from retrac.errors import DataError


def relative_record(target: str | os.PathLike, base: str | os.PathLike) -> str | None:
    """``target`` relative to folder ``base`` when both lie under one folder other than the file system
    root (``None`` otherwise, or for URLs): what an artifact records beside an absolute path."""
    if "://" in str(target) or "://" in str(base):
        return None
    target, base = Path(target).absolute(), Path(base).absolute()
    try:
        common = Path(os.path.commonpath([target, base]))
    except ValueError:  # different drives
        return None
    if common == Path(common.anchor):
        return None
    return os.path.relpath(target, base)


def recorded_path(
    recorded: str | os.PathLike,
    relative: str | None = None,
    relative_to: str | os.PathLike | None = None,
) -> Path:
    """Where a recorded file is now: ``relative_to / relative`` when that exists and differs from the
    recorded absolute path (the tree moved), else the recorded path (the caller reports it missing)."""
    if relative is not None and relative_to is not None and "://" not in str(relative_to):
        candidate = Path(os.path.normpath(Path(relative_to).absolute() / relative))
        if candidate.exists():
            return candidate
    return Path(recorded)


def displaced_path(
    recorded: str | os.PathLike, old_base: str | os.PathLike | None, new_base: str | os.PathLike | None
) -> Path:
    """``recorded`` moved the way ``old_base`` moved to ``new_base`` (a store's checkpoints and data follow
    the store): the displaced path when the base moved and it exists there, else ``recorded``."""
    if old_base is None or new_base is None or "://" in str(old_base) or "://" in str(new_base):
        return Path(recorded)
    old_base, new_base = Path(old_base).absolute(), Path(new_base).absolute()
    if old_base == new_base:
        return Path(recorded)
    relative = relative_record(recorded, old_base)
    return recorded_path(recorded, relative, new_base)


SEARCH_DEPTH = 4  # folder levels below a search path that are looked at


def search_folders(roots, max_depth: int = SEARCH_DEPTH):
    """Every folder under the ``roots`` (themselves included) down to ``max_depth`` levels, in sorted order,
    hidden (``.``) folders skipped."""
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        level = [root]
        for depth in range(max_depth + 1):
            below = []
            for folder in level:
                yield folder
                if depth < max_depth:
                    with contextlib.suppress(OSError):
                        below += sorted(
                            p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                        )
            level = below


def _store_fingerprint(folder: Path) -> str | None:
    from retrac.indexer.store import FeatureStore

    if not any((folder / marker).exists() for marker in ("zarr.json", ".zattrs", ".zgroup")):
        return None
    try:
        return FeatureStore.open(folder).fingerprint
    except (ValueError, OSError):  # not a readable store: passed over
        return None


def _checkpoint_sha256(folder: Path) -> str | None:
    from retrac.checkpoints import resolve_checkpoint

    try:
        return resolve_checkpoint(str(folder), weight=1.0).sha256
    except (ValueError, OSError):  # not a checkpoint folder: passed over
        return None


@dataclass
class SearchPath:
    """Folders searched (``--search-path``) for a store or checkpoints not found where recorded: a store is
    taken only when its fingerprint equals the recorded one, a checkpoint only when the sha256 of its
    weights does; each place taken is named on stderr."""

    roots: list[str | os.PathLike] | None = None
    _checkpoints: dict[str, Path] | None = None

    def store(self, given, recorded: dict, index_dir: str | os.PathLike):
        """``given`` (``--store``), else the store recorded by an index manifest (``recorded``: its ``store``
        entry) at its recorded or index-relative place, else, when none is there, the searched store."""
        if given:
            return given
        path = recorded_path(recorded["path"], recorded.get("relative_path"), index_dir)
        fingerprint = recorded["fingerprint"]
        if not self.roots or "://" in str(path) or Path(path).exists():
            return path
        found = next((f for f in search_folders(self.roots) if _store_fingerprint(f) == fingerprint), None)
        if found is None:
            raise DataError(
                f"the store is not at its recorded place {str(path)!r}, and no store under --search-path "
                f"{', '.join(map(str, self.roots))} has its fingerprint {fingerprint[:12]}...; give the store "
                "with --store, or a --search-path that holds it."
            )
        print(f"retrac: store found by fingerprint at {found} (--search-path)", file=sys.stderr)
        return found

    def checkpoint(self, store, k: int, recorded_store_path: str | None) -> Path:
        """Checkpoint ``k`` of ``store``: its recorded path moved as the store moved from
        ``recorded_store_path`` when it exists (or no search path is given), else the searched folder of
        its weights' sha256 (that path when none matches: the caller reports it missing). Every checkpoint
        is looked for in one walk."""
        path = displaced_path(store.checkpoints[k].path, recorded_store_path, store.url)
        sha256, recorded = store.checkpoints[k].sha256, [c.sha256 for c in store.checkpoints]
        if not self.roots or path.exists():
            return path
        if self._checkpoints is None:
            self._checkpoints, wanted = {}, set(recorded)
            for folder in search_folders(self.roots):
                digest = _checkpoint_sha256(folder)
                if digest in wanted and digest not in self._checkpoints:
                    self._checkpoints[digest] = folder
                    print(f"retrac: checkpoint found by sha256 at {folder} (--search-path)", file=sys.stderr)
                if wanted <= self._checkpoints.keys():
                    break
        return self._checkpoints.get(sha256, path)
