"""IVF indexes larger than memory: inverted lists on disk, memory-mapped at query (docs/design.md section 5).

When an IVF index's lists (``N * (code_size + 8)`` bytes: codes and ids) exceed the memory budget,
:func:`add_on_disk` adds the streamed rows to copies of the one trained, empty index (one coarse
quantizer for the whole index, trained on a sample) in parts of ``part_rows`` rows, writes each part,
and merges the parts into FAISS ``OnDiskInvertedLists`` (``faiss.contrib.ondisk.merge_ondisk``) in
``index.ivfdata`` beside ``index.faiss``. Memory holds one block and one part at a time; the merge
reads the parts memory-mapped. ``load_index`` maps ``index.ivfdata`` from the index's own folder
(``faiss.IO_FLAG_ONDISK_SAME_DIR``), so the folder can be moved. Search results equal those of the
same index built in memory (same quantizer, same codes, same ids).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from retrac.query.index.kinds import _ivf_of

ONDISK_FILENAME = "index.ivfdata"
ID_BYTES = 8  # faiss idx_t per stored row
SCRATCH_PREFIX = "retrac-ondisk-"


def list_bytes(index: faiss.Index, num_vectors: int) -> int | None:
    """Bytes the inverted lists of ``num_vectors`` rows take (codes and ids), or ``None`` (not IVF)."""
    ivf = _ivf_of(index)
    return None if ivf is None else int(num_vectors) * (int(ivf.code_size) + ID_BYTES)


def part_rows_for(index: faiss.Index, budget_bytes: int) -> int:
    """Rows per part so that a part's lists take at most a quarter of the budget (at least 10,000)."""
    per_row = list_bytes(index, 1) or 1
    return max(10_000, int(budget_bytes) // 4 // per_row)


def ondisk_file(index: faiss.Index) -> Path | None:
    """The ``.ivfdata`` file of an index with on-disk inverted lists, or ``None``."""
    ivf = _ivf_of(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def move_lists(source: str | Path, target: str | Path) -> None:
    """Move an ``index.ivfdata`` into an index folder (``save_index``), removing its emptied scratch folder.

    An index already loaded keeps reading the moved file (its memory map follows the file, not the name).
    """
    source = Path(source)
    shutil.move(str(source), str(target))
    if source.parent.name.startswith(SCRATCH_PREFIX):
        with contextlib.suppress(OSError):  # not empty: someone else's files, left alone
            source.parent.rmdir()


def add_on_disk(
    trained: faiss.Index,
    blocks: Iterable[np.ndarray],
    part_rows: int,
    scratch: str | Path | None = None,
) -> tuple[faiss.Index, int]:
    """Add stored rows (already augmented as the index stores them) to on-disk lists.

    Args:
        trained: The trained, empty IVF index (left empty: parts are copies of it).
        blocks: Rows ``(n_i, D_stored)`` float32 in order; row ``i`` gets id ``i``.
        part_rows: Rows per part written before the merge.
        scratch: A folder for the parts and the merged ``index.ivfdata`` (default: a new temporary
            folder); the parts are removed after the merge.

    Returns:
        ``(index, rows added)``: the index, whose lists live in ``scratch/index.ivfdata``.
    """
    template = faiss.serialize_index(trained)
    folder = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    folder.mkdir(parents=True, exist_ok=True)
    parts_folder = Path(tempfile.mkdtemp(prefix=".parts-", dir=folder))
    parts: list[str] = []
    current, added = faiss.deserialize_index(template), 0

    def flush() -> None:
        nonlocal current
        if current.ntotal:
            name = str(parts_folder / f"part-{len(parts):05d}.faiss")
            faiss.write_index(current, name)
            parts.append(name)
        current = faiss.deserialize_index(template)

    try:
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            begin = 0
            while begin < block.shape[0]:
                take = min(block.shape[0] - begin, part_rows - current.ntotal)
                ids = np.arange(added, added + take, dtype=np.int64)  # row i of the stream is id i
                current.add_with_ids(block[begin : begin + take], ids)
                begin, added = begin + take, added + take
                if current.ntotal >= part_rows:
                    flush()
        flush()
        from faiss.contrib.ondisk import merge_ondisk

        index = faiss.deserialize_index(template)
        merge_ondisk(index, parts, str(folder / ONDISK_FILENAME))
    finally:
        shutil.rmtree(parts_folder, ignore_errors=True)
    return index, added
