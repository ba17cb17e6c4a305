"""Creating a store: atomically, in a local folder or under an object-storage prefix (docs/design.md section 3).

A local store is built in a hidden sibling folder and renamed into place. On object storage the
metadata (and the ids chunk) are built in memory and copied, and the root ``zarr.json`` is created
last with a conditional PUT: a store is visible only once whole, and of two concurrent creators one
wins while the other finds the same metadata in place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from retrac.errors import ConfigError
from retrac.indexer.integrity import ids_digest
from retrac.indexer.layout import create_arrays
from retrac.indexer.location import ObjectLocation


def _with_integrity(attrs: dict, ids: list[str]) -> dict:
    return {**attrs, "integrity": attrs.get("integrity") or {"ids_sha256": ids_digest(ids)}}


def create_local(path: Path, attrs: dict, ids: list[str]) -> None:
    import zarr

    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of --out {str(path)!r} ({exc}); give a writable path."
        ) from exc
    if not os.access(parent, os.W_OK):
        raise ConfigError(
            f"--out {str(path)!r}: folder {str(parent)!r} is not writable; give a writable path."
        )
    staging = parent / f".{path.name}.creating-{uuid.uuid4().hex}"
    attrs = _with_integrity(attrs, ids)
    try:
        group = zarr.open_group(str(staging), mode="w-", zarr_format=3, attributes=attrs)
        create_arrays(group, attrs["layout"], len(attrs["checkpoints"]), ids)
        (staging / "ledger").mkdir()
        try:
            os.rename(staging, path)  # atomic; fails if another process created the store first
        except OSError:
            if not (path / "zarr.json").is_file():
                raise
    except OSError as exc:
        raise ConfigError(
            f"cannot write the store at --out {str(path)!r} ({exc}); give a writable path."
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def create_remote(location: ObjectLocation, attrs: dict, ids: list[str]) -> None:
    """Create a store on object storage: every object but the root ``zarr.json``, then that one."""
    import obstore
    import zarr
    from zarr.storage import MemoryStore

    if location.list(""):
        raise ConfigError(f"--out {location.url!r} holds objects but no retrac store; give a new prefix.")
    staging: dict = {}
    group = zarr.open_group(
        MemoryStore(staging), mode="w-", zarr_format=3, attributes=_with_integrity(attrs, ids)
    )
    create_arrays(group, attrs["layout"], len(attrs["checkpoints"]), ids)
    root = None
    for key, buffer in sorted(staging.items()):
        data = bytes(buffer.to_bytes())
        if key == "zarr.json":
            root = data
        else:  # identical bytes from any creator: a concurrent copy changes nothing
            location._call(obstore.put, key, data)
    location.create_text("zarr.json", root.decode("utf-8"))  # False: another creator won; same metadata
