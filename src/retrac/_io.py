"""Every artifact retrac writes goes through here (docs/design.md section 7).

Files are written to a temporary sibling and moved into place with ``os.replace``, so a reader sees
the old file or the new one, never a torn one. Whole output folders (an index, an audit, a report)
are written into a temporary sibling folder and published with one rename by
:func:`publish_directory`; a half-written folder is never read. :func:`record_differences` is the
one walker that names how two records (configs, manifests) differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrac.errors import ConfigError

DIGEST_CHUNK_BYTES = 8 << 20  # streamed file digests read this much at a time


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_via(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path`` in one rename.

    Args:
        path: The final file.
        write: Writes the whole file at the path it is given (e.g. ``faiss.write_index``).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write_via(path, lambda p: Path(p).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_via(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, record: Any, *, indent: int | None = 2) -> Path:
    """Write ``record`` as JSON (sorted keys, strict: NaN and infinity are refused) atomically.

    Raises:
        ConfigError: ``record`` is not JSON-serialisable or holds a non-finite float.
    """
    try:
        text = json.dumps(record, indent=indent, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{Path(path).name} is not valid JSON ({error}).") from None
    return atomic_write_text(path, text + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz`` file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write_via(path, write)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write one array to a ``.npy`` file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    return atomic_write_via(path, write)


@contextlib.contextmanager
def publish_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder elsewhere, then publish it at ``target`` in one atomic step.

    Yields a fresh temporary sibling of ``target``; when the block finishes without an error it takes
    the place of ``target``: by one ``rename`` when ``target`` does not exist, else by one atomic
    exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old folder
    is removed. At every instant ``target`` is the old complete folder or the new complete one; on
    an error it keeps its old content and the temporary folder is removed; after a kill the
    temporary folder is left as a hidden ``.NAME.tmp-PID-*`` sibling that no reader opens and the
    next publish of ``target`` removes.

    Where the exchange is not supported (another OS or file system), the old folder is first renamed
    to a hidden ``.NAME.old-PID-*`` sibling and the new one renamed into place: two renames, with an
    instant between them in which ``target`` is absent; the next publish restores an old folder a
    kill left there.

    Raises:
        ConfigError: ``target`` exists and is not a folder, or its parent cannot be written.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target} is an existing file; choose a folder path.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_siblings(target)
        staging = _temporary_sibling(target)
        staging.mkdir()
    except OSError as error:
        raise ConfigError(
            f"cannot write beside {target} ({error.strerror}); choose a writable --out."
        ) from None
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
        elif _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale_siblings(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by killed writers; restore an old folder a kill
    left between the two renames of the fallback publish."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for sibling in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        match = pattern.fullmatch(sibling.name)
        if not match or process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists():
            os.replace(sibling, target)
        elif sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, streamed in ``DIGEST_CHUNK_BYTES`` reads."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str, error_class: type[Exception] = ConfigError) -> Any:
    """Read a JSON file, turning a missing or corrupt file into ``error_class`` naming ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error_class(f"{what} {path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise error_class(f"{what} {path} is not valid JSON ({error}); it is damaged, rebuild it.") from None


def record_differences(
    expected: Any,
    actual: Any,
    prefix: str = "",
    *,
    expected_name: str = "expected",
    actual_name: str = "found",
    both_ways: bool = False,
) -> list[str]:
    """Every place where ``actual`` differs from ``expected``, as ``"a.b[1]: expected X, found Y"``.

    Dictionaries are walked key by key: the keys of ``expected`` (``actual`` may hold more), or with
    ``both_ways`` the keys of either, sorted; a key that one side lacks reads ``none`` there. Lists of
    equal length are walked item by item; other values are compared with ``==``.

    Args:
        expected: The record asked for (e.g. the settings given).
        actual: The record found (e.g. a manifest read from disk).
        prefix: Name of the position of both records (``""`` at the top).
        expected_name: How the lines name ``expected``'s values (``"stored"``, say).
        actual_name: How the lines name ``actual``'s values (``"given"``, ``"index has"``, say).
        both_ways: Also name keys that only ``actual`` holds.

    Returns:
        One line per differing leaf; empty when the records agree.
    """
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(expected) | set(actual), key=str) if both_ways else list(expected)
        out: list[str] = []
        for key in keys:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in actual:
                out.append(f"{name}: {expected_name} {expected[key]!r}, {actual_name} none")
            elif key not in expected:
                out.append(f"{name}: {expected_name} none, {actual_name} {actual[key]!r}")
            else:
                out.extend(
                    record_differences(
                        expected[key],
                        actual[key],
                        name,
                        expected_name=expected_name,
                        actual_name=actual_name,
                        both_ways=both_ways,
                    )
                )
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        out = []
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            out.extend(
                record_differences(
                    a,
                    b,
                    f"{prefix}[{i}]",
                    expected_name=expected_name,
                    actual_name=actual_name,
                    both_ways=both_ways,
                )
            )
        return out
    if expected != actual:
        return [f"{prefix}: {expected_name} {expected!r}, {actual_name} {actual!r}"]
    return []
