"""Building an index from streamed train vectors: plan, sample and train, add, calibrate.

``build_index`` runs four named steps: :func:`_plan_index` (the kind, the empty FAISS index and the
build parameters), :func:`_train` (the training sample of ``retrac.query.index.sample`` and the
training), :func:`_add_blocks` (one pass over the blocks, which also gathers the exact top-k of
the calibration queries) and the calibration of ``retrac.query.index.calibrate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from retrac.errors import ConfigError, DataError
from retrac.query.index.calibrate import DEFAULT_TARGET_RECALL, Calibration, default_search_params
from retrac.query.index.checks import Blocks, _as_block, _check_device, _check_positive_int, _iterate
from retrac.query.index.kinds import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    _hnsw_of,
    _ivf_of,
    _make_index,
    _resolve_kind,
    default_memory_budget,
)
from retrac.query.index.mips import _augment, _max_norm
from retrac.query.index.ondisk import add_on_disk, list_bytes, part_rows_for
from retrac.query.index.sample import TrainingSample, default_train_size, draw_training_sample
from retrac.query.index.search_index import SearchIndex


@dataclass
class _Plan:
    """The empty FAISS index of a build and how it is built.

    Attributes:
        index: The FAISS index (of dimension ``dim + 1`` with the norm augmentation).
        kind: The resolved kind (``"auto"``, ``"flat"``, ``"ivf"``, ``"hnsw"`` or ``"factory"``).
        factory: Its FAISS factory string.
        dim: Dimension ``D`` of the train vectors.
        build_params: The manifest's ``build_params``, filled in step by step.
        mips_augment: Whether rows are stored with the norm-augmenting coordinate.
    """

    index: faiss.Index
    kind: str
    factory: str
    dim: int
    build_params: dict[str, Any]
    mips_augment: bool
    on_disk: bool = False
    budget: int = 0

    @property
    def exact(self) -> bool:
        return isinstance(faiss.downcast_index(self.index), faiss.IndexFlat)

    def stored(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``(n, D)`` as the index stores them (``(n, D + 1)`` with the norm augmentation)."""
        return _augment(rows, self.build_params["mips_max_norm"]) if self.mips_augment else rows


def build_index(
    blocks: Blocks,
    num_vectors: int,
    dim: int,
    kind: str = "auto",
    *,
    nlist: int | None = None,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    train_vectors: np.ndarray | Callable[[], np.ndarray] | None = None,
    train_size: int | None = None,
    memory_budget_bytes: int | None = None,
    target_recall: float | None = DEFAULT_TARGET_RECALL,
    calibration_queries: np.ndarray | None = None,
    mips_augment: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    on_disk: bool | None = None,
    scratch_dir: str | None = None,
) -> SearchIndex:
    """Build an inner-product index over train vectors ``U(z)`` streamed in blocks.

    Args:
        blocks: The train vectors as float32 blocks ``(n_i, D)`` (float16 is converted), in row
            order; or a callable returning a fresh iterable of them (lets IVF training sample all
            rows uniformly in a first pass). Row ``i`` of the index is the ``i``-th row streamed.
        num_vectors: Total rows ``N`` the blocks hold (checked); sets ``nlist`` and the auto rule.
        dim: Vector dimension ``D`` (``K`` checkpoints times the projection dimension ``d``).
        kind: ``"auto"``, ``"flat"``, ``"ivf"``, ``"hnsw"`` or a FAISS factory string
            (``retrac.query.index.kinds``).
        nlist: IVF lists for ``kind="ivf"``; default ``default_nlist(N)`` (power of two near sqrt(N)).
        hnsw_m: HNSW links per node for ``kind="hnsw"`` (32).
        ef_construction: HNSW build-time candidate list size (40).
        train_vectors: Training sample ``(m, D)`` (or a callable returning it) for indexes that
            need training; default: sampled from ``blocks`` (``retrac.query.index.sample``).
        train_size: Rows to train on; default ``max(50 * nlist, 16384)``, at most ``N``.
        memory_budget_bytes: The memory budget (``--max-memory``): what the ``auto`` rule may hold in RAM,
            and past which IVF lists go to disk; default half the machine's RAM.
        target_recall: recall@10 the default ``nprobe`` / ``efSearch`` must reach on the calibration
            queries (plus ``CALIBRATION_MARGIN``); ``None`` skips calibration and uses fixed
            defaults (``nprobe = nlist / 16``, ``efSearch = 128``). See ``retrac.query.index.calibrate``.
        calibration_queries: ``(n, D)`` query vectors for the calibration; default
            ``NUM_CALIBRATION_QUERIES`` sample rows plus noise.
        mips_augment: Store vectors with the norm-augmenting coordinate (``retrac.query.index.mips``);
            default on for IVF indexes without PQ codes, off otherwise. Needs a trained (IVF) index.
        seed: Seed of the training sample and calibration queries.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` for searches (``retrac.query.index.search_index``).
        progress: Show a tqdm progress bar over the rows added.
        on_disk: Write the IVF lists to disk (``retrac.query.index.ondisk``); default: when the
            lists (``N * (code_size + 8)`` bytes) exceed the budget. Needs an IVF index.
        scratch_dir: Where on-disk lists are written before ``save_index`` moves them into the
            index folder (default: a new temporary folder).

    Returns:
        The ``SearchIndex``; scores it returns are inner products (positive = proponent).

    Raises:
        ConfigError: Unknown kind or bad factory string, bad sizes, bad ``target_recall``.
        DataError: A block of the wrong dimension, non-finite vectors, or a row count that
            differs from ``num_vectors``.
    """
    _check_positive_int("num_vectors", num_vectors)
    _check_positive_int("dim", dim)
    _check_device(device)
    if target_recall is not None and not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target_recall={target_recall!r} must be in (0, 1], or None to skip calibration.")
    plan = _plan_index(
        num_vectors, dim, kind, nlist, hnsw_m, ef_construction, memory_budget_bytes, mips_augment, seed
    )
    lists = list_bytes(plan.index, num_vectors)
    plan.on_disk = bool(lists is not None and lists > plan.budget) if on_disk is None else bool(on_disk)
    if plan.on_disk:
        if lists is None:
            raise ConfigError(
                f"on_disk=True needs an IVF index, not {plan.factory!r}; drop it or use kind='ivf'."
            )
        plan.build_params.update({"on_disk": True, "list_bytes": lists})
    sample = None
    if not plan.index.is_trained:
        sample = _train(plan, blocks, train_vectors, train_size, num_vectors, seed)
    calibration = None
    if target_recall is not None and not plan.exact:
        calibration = Calibration(calibration_queries, dim, None if sample is None else sample.rows, seed)
    _add_blocks(plan, blocks, sample, num_vectors, calibration, progress, scratch_dir)
    result = SearchIndex(
        plan.index,
        plan.kind,
        plan.factory,
        dim,
        plan.build_params,
        {},
        None,
        device,
        plan.build_params.get("mips_max_norm"),
    )
    if calibration is None:
        result.search_params = default_search_params(result)
    else:
        calibration.calibrate(result, target_recall)
    return result


def _plan_index(
    num_vectors: int,
    dim: int,
    kind: str,
    nlist: int | None,
    hnsw_m: int,
    ef_construction: int,
    memory_budget_bytes: int | None,
    mips_augment: bool | None,
    seed: int,
) -> _Plan:
    """Step 1: resolve the kind, make the empty FAISS index, record its build parameters."""
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    kind, factory = _resolve_kind(kind, num_vectors, dim, nlist, hnsw_m, budget)
    faiss_index = _make_index(factory, dim, kind)
    if mips_augment is None:
        mips_augment = _ivf_of(faiss_index) is not None and "PQ" not in factory.upper()
    if mips_augment:
        if faiss_index.is_trained:
            raise ConfigError(
                f"mips_augment=True needs an index that is trained (IVF...), not {factory!r}; drop it."
            )
        faiss_index = _make_index(factory, dim + 1, kind)
    build_params: dict[str, Any] = {"seed": int(seed)}
    if kind == "auto":
        build_params["memory_budget_bytes"] = budget
    hnsw = _hnsw_of(faiss_index)
    if hnsw is not None:
        _check_positive_int("ef_construction", ef_construction)
        hnsw.hnsw.efConstruction = int(ef_construction)
        build_params.update({"M": int(hnsw.hnsw.nb_neighbors(1)), "efConstruction": int(ef_construction)})
    ivf = _ivf_of(faiss_index)
    if ivf is not None:
        build_params["nlist"] = int(ivf.nlist)
        if ivf.nlist > num_vectors:
            raise ConfigError(
                f"factory {factory!r} has nlist={ivf.nlist} lists for only {num_vectors} vectors; "
                "use fewer lists (kind='ivf' picks sqrt(N))."
            )
    return _Plan(faiss_index, kind, factory, dim, build_params, bool(mips_augment), budget=budget)


def _train(
    plan: _Plan,
    blocks: Blocks,
    train_vectors: np.ndarray | Callable[[], np.ndarray] | None,
    train_size: int | None,
    num_vectors: int,
    seed: int,
) -> TrainingSample:
    """Step 2: draw the training sample and train the index (and fix ``M`` of the augmentation)."""
    params = plan.build_params
    size = train_size if train_size is not None else default_train_size(params.get("nlist", 1))
    _check_positive_int("train_size", size)
    size = min(int(size), num_vectors)
    sample = draw_training_sample(blocks, train_vectors, plan.dim, size, seed)
    params["train_sample"] = sample.how
    params["train_rows"] = int(sample.rows.shape[0])
    if plan.mips_augment:
        params["mips_max_norm"] = _max_norm(sample.rows)
    if sample.rows.shape[0] < params.get("nlist", 1):
        raise DataError(
            f"{sample.rows.shape[0]} training rows for {params.get('nlist')} IVF lists; give more "
            "vectors or fewer lists."
        )
    plan.index.train(plan.stored(sample.rows))
    return sample


def _add_blocks(
    plan: _Plan,
    blocks: Blocks,
    sample: TrainingSample | None,
    num_vectors: int,
    calibration: Calibration | None,
    progress: bool,
    scratch_dir: str | None = None,
) -> None:
    """Step 3: add every row once, in order, feeding the calibration's exact top-k on the way.

    In memory, or (``plan.on_disk``) into parts merged into on-disk lists (``retrac.query.index.ondisk``).
    """
    stored = _stored_blocks(plan, blocks, sample, num_vectors, calibration, progress)
    if not plan.on_disk:
        for array in stored:
            plan.index.add(array)
        return
    part_rows = part_rows_for(plan.index, plan.budget)
    plan.index, _ = add_on_disk(plan.index, stored, part_rows, scratch_dir)
    plan.build_params["part_rows"] = int(part_rows)


def _stored_blocks(
    plan: _Plan,
    blocks: Blocks,
    sample: TrainingSample | None,
    num_vectors: int,
    calibration: Calibration | None,
    progress: bool,
) -> Iterator[np.ndarray]:
    """The rows as the index stores them, block by block, checked and counted."""
    pending = [] if sample is None else sample.pending
    stream = sample.stream if sample is not None and sample.stream is not None else _iterate(blocks)
    added = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_vectors, desc=f"index {plan.factory}", unit="vec")
    for number, block in enumerate(_chain(pending, stream)):
        array = block if number < len(pending) else _as_block(block, plan.dim, number, added)
        if added + array.shape[0] > num_vectors:
            raise DataError(
                f"the blocks hold more than num_vectors={num_vectors} rows; pass the true row count."
            )
        yield plan.stored(array)
        if calibration is not None:
            calibration.update(array, added)
        added += array.shape[0]
        if bar is not None:
            bar.update(array.shape[0])
    if bar is not None:
        bar.close()
    if added != num_vectors:
        raise DataError(
            f"the blocks hold {added} rows but num_vectors={num_vectors}; pass the true row count."
        )


def _chain(pending: list[np.ndarray], stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield from pending
    yield from stream
