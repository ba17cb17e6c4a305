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

import os
from pathlib import Path


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
