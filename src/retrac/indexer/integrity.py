"""What a feature store's integrity checks compare (docs/design.md section 3).

Each ledger entry records :func:`shard_digest` of its shard's data; the root attributes record
:func:`ids_digest` of the ids. :func:`ledger_entry_problem` says whether an entry describes the shard
it is filed under, and :func:`index_command` spells out the ``retrac index`` command that made a
store, which is the remedy for any damage: rerunning it recomputes every shard that fails its digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex

import numpy as np

from retrac.indexer.config import IndexConfig

SHARD_ARRAYS = ("features", "norms", "timesteps", "valid")  # the order the shard digest covers them in
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _ids_sha256(chunks) -> tuple[str, int]:
    """sha256 of the canonical JSON list of the ids given chunk by chunk, and how many there were."""
    digest, count = hashlib.sha256(b"["), 0
    for chunk in chunks:
        items = [str(i) for i in chunk]
        if items:  # one chunk's JSON list without its brackets, joined to the previous chunk by a comma
            text = json.dumps(items, separators=(",", ":"))[1:-1]
            digest.update((b"," if count else b"") + text.encode())
            count += len(items)
    digest.update(b"]")
    return digest.hexdigest(), count


def ids_digest(ids) -> str:
    """sha256 of the canonical JSON list of the sample ids (recorded as ``integrity.ids_sha256``)."""
    return _ids_sha256([ids])[0]


def unreadable_ids(error: Exception) -> str:
    """The problem reported when the ids array cannot be read."""
    return f"the ids cannot be read ({type(error).__name__}: {error})"


def ids_digest_problem(chunks, num_samples: int, attrs: dict) -> str | None:
    """Why the ids given chunk by chunk fail the digest recorded in ``attrs`` (``None``: whole).

    ``chunks`` may be a lazy reader: an error while reading it is reported as unreadable ids.
    """
    try:
        digest, count = _ids_sha256(chunks)
    except Exception as exc:  # a missing array or a truncated chunk
        return unreadable_ids(exc)
    if count != num_samples or digest != (attrs.get("integrity") or {}).get("ids_sha256"):
        return "the ids do not match their recorded sha256 (a changed or missing ids chunk)"
    return None


def shard_digest(arrays: dict[str, np.ndarray], names: tuple[str, ...] = SHARD_ARRAYS) -> str:
    """sha256 of one shard's arrays: ``names`` in order, C-contiguous bytes of the stored dtypes.

    Args:
        arrays: ``features`` ``(n, S, d)`` float16/float32 (a compact store: ``vectors`` ``(n, 2, d)``),
            ``norms`` ``(n, S)`` float32, ``timesteps`` ``(n, S)`` int32 and ``valid`` ``(n, S)`` bool, as
            written to the store.
        names: the arrays in digest order (``retrac.indexer.layout.shard_arrays``).
    """
    digest = hashlib.sha256()
    for name in names:
        digest.update(memoryview(np.ascontiguousarray(arrays[name]).reshape(-1)).cast("B"))
    return digest.hexdigest()


def ledger_entry_problem(entry, k: int, shard: int, rows: tuple[int, int]) -> str | None:
    """Why ``entry`` is not a ledger entry of shard ``shard`` (rows ``rows``) of checkpoint ``k``."""
    expected = {"checkpoint": k, "shard": shard, "rows": list(rows)}
    if not isinstance(entry, dict) or any(entry.get(key) != value for key, value in expected.items()):
        return f"it describes another shard ({entry!r}, expected {expected})"
    if not (isinstance(entry.get("sha256"), str) and SHA256_HEX.fullmatch(entry["sha256"])):
        return f"it records no valid sha256 ({entry.get('sha256')!r})"
    return None


def index_command(attrs: dict, path) -> str:
    """The ``retrac index`` command that made the store at ``path`` with root attributes ``attrs``."""
    config = IndexConfig.from_dict(attrs["config"])
    words = ["retrac", "index"]
    for checkpoint in attrs["checkpoints"]:
        words += ["--checkpoint", f"{checkpoint['path']}={checkpoint['weight']!r}"]
    words += ["--data", str(attrs["dataset"].get("source") or "DATA"), "--out", str(path)]
    words += ["--events", str(config.events), "--projector", config.projector]
    if config.dim is not None:
        words += ["--dim", str(config.dim)]
    if config.dense_backend != "basic":
        words += ["--dense-backend", config.dense_backend]
    words += ["--objective", config.objective, "--dtype", config.dtype, "--seed", str(config.seed)]
    words += ["--shard-rows", str(config.shard_rows)]
    if config.layout != "full":
        words += ["--layout", config.layout]
    for pattern in config.include:
        words += ["--include", pattern]
    for pattern in config.exclude:
        words += ["--exclude", pattern]
    return shlex.join(words)
