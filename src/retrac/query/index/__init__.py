"""The FAISS inner-product index over the train vectors ``U(z)``: build, search, save, load, recall.

A score returned here is the inner product ``I(z, z') = <U(z), Q(z')>`` of docs/design.md section 1,
with ``U(z) = concat_k(w_k u_k(z))`` the train vector of a training sample and ``Q(z')`` the query
vector of a test sample. Its scale is that of the vectors (no normalisation is applied here).
Positive score = proponent (a gradient step on ``z`` lowers the loss on ``z'``); negative score =
opponent, found by searching with ``-Q`` (``opponents=True``). Results have shape
``(n_query, k)``, best first.

One module per responsibility, dependencies pointing one way (each imports only those above it):

* ``checks``: input checks (sizes, devices, train blocks, query vectors);
* ``kinds``: the index kinds (``auto``, ``flat``, ``ivf``, ``hnsw``, factory strings) and the
  ``auto`` rule;
* ``mips``: the norm augmentation that turns IVF inner-product search into search on a sphere;
* ``topk``: the running exact top-k of streamed blocks (brute force);
* ``search_index``: the ``SearchIndex`` and its search (CPU or faiss-gpu), which never returns
  padding (short queries are widened, else answered exactly; ``SearchResult`` says which);
* ``exact``: exact top-k by brute force, recall@k;
* ``sample``: the training sample of IVF / PQ / SQ indexes, from streamed blocks;
* ``calibrate``: default ``nprobe`` / ``efSearch`` calibrated against exact search;
* ``build``: ``build_index`` (plan, sample and train, add, calibrate);
* ``persist``: ``save_index`` (one folder, published by one rename) / ``load_index`` (seal and sha256
  digests checked first) and the manifest (docs/design.md section 6).
"""

from retrac.query.index.build import (
    build_index,
)
from retrac.query.index.calibrate import (
    CALIBRATION_K,
    CALIBRATION_MARGIN,
    DEFAULT_EF_SEARCH,
    DEFAULT_TARGET_RECALL,
    EF_SEARCH_LADDER,
    NUM_CALIBRATION_QUERIES,
)
from retrac.query.index.checks import (
    DEVICES,
    Blocks,
)
from retrac.query.index.exact import (
    exact_search,
    measure_recall,
    recall_at_k,
)
from retrac.query.index.kinds import (
    AUTO_FLAT_MAX_ROWS,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    HNSW_QUANTIZER_MIN_ROWS,
    KINDS,
    auto_factory,
    default_memory_budget,
    default_nlist,
)
from retrac.query.index.persist import (
    INDEX_FILENAME,
    MANIFEST_FILENAME,
    UNSEALED_KEYS,
    check_digests,
    check_manifest,
    load_index,
    manifest_seal,
    open_index,
    read_manifest,
    rebuild_command,
    save_index,
)
from retrac.query.index.sample import (
    MIN_TRAIN_ROWS,
    TRAIN_ROWS_PER_LIST,
)
from retrac.query.index.search_index import (
    GPU_MAX_K,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    SearchIndex,
    SearchResult,
    search,
)

__all__ = [
    "AUTO_FLAT_MAX_ROWS",
    "Blocks",
    "CALIBRATION_K",
    "CALIBRATION_MARGIN",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_TARGET_RECALL",
    "DEVICES",
    "EF_SEARCH_LADDER",
    "GPU_MAX_K",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "HNSW_QUANTIZER_MIN_ROWS",
    "INDEX_FILENAME",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "KINDS",
    "MANIFEST_FILENAME",
    "MIN_TRAIN_ROWS",
    "NUM_CALIBRATION_QUERIES",
    "SearchIndex",
    "SearchResult",
    "TRAIN_ROWS_PER_LIST",
    "UNSEALED_KEYS",
    "auto_factory",
    "build_index",
    "check_digests",
    "check_manifest",
    "default_memory_budget",
    "default_nlist",
    "exact_search",
    "load_index",
    "manifest_seal",
    "open_index",
    "measure_recall",
    "read_manifest",
    "rebuild_command",
    "recall_at_k",
    "save_index",
    "search",
]
