"""The Attributor that answers queries against attribution indexes (and the names of building them).

``build_attribution_index`` (``retrac.query.building``) streams the train vectors
``U(z) = concat_k(w_k u_k(z))`` of a method out of a feature store into a FAISS inner-product index,
over every row or one part of them. ``Attributor`` loads the task, checkpoints, projectors and
indexes (whole, or parts merged by ``retrac.query.parts``) once and answers many queries with the
*same* gradient code path as the indexer (``retrac.projection.projected_gradients``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from retrac.errors import CheckpointError, ConfigError, DataError
from retrac.events import derive_seed, noise_from_seed
from retrac.indexer.rows import train_vector_rows
from retrac.projection import projected_gradients
from retrac.query.building import (  # noqa: F401 - the names this module has always offered
    DEFAULT_BLOCK_ROWS,
    DEFAULT_INDEX_KIND,
    DEFAULT_SEARCH_DEVICE,
    build_attribution_index,
    open_complete_store,
    train_vector_blocks,
)
from retrac.query.index.rerank import rerank as rerank_candidates
from retrac.query.inputs import query_inputs
from retrac.query.parts import LoadedIndex, load_indexes, open_sources
from retrac.query.vectors import query_vectors
from retrac.relocate import SearchPath, displaced_path
from retrac.task import DEFAULT_DEVICE

RERANK_EF_SEARCH = 256  # HNSW candidate list when re-ranking (see Attributor.attribute)
QUERY_PRESETS = {"default": (10, 2), "fast": (4, 1), "paper": (100, 16)}  # name: (T_q, M)
DEFAULT_QUERY_PRESET = "default"
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class QueryEvents:
    """The events of a query: ``T_q`` evenly spaced timesteps x ``M`` noise draws each.

    Timestep ``j`` is ``tau_j = floor((j + 1/2) T / T_q)``; the noise of draw ``m`` at timestep ``j`` and
    checkpoint ``k`` is ``noise_from_seed(derive_seed("retrac-query", seed, k, j, m))``, the same for every
    query image (common random numbers make scores of different queries comparable). Presets:
    ``default`` = 10 x 2, ``fast`` = 4 x 1, ``paper`` = 100 x 16 (the paper's setting).
    """

    num_timesteps: int = QUERY_PRESETS[DEFAULT_QUERY_PRESET][0]
    num_noise: int = QUERY_PRESETS[DEFAULT_QUERY_PRESET][1]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_timesteps < 1 or self.num_noise < 1:
            raise ConfigError(
                f"query events {self.num_timesteps} x {self.num_noise}: give at least one timestep and one noise draw."
            )

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> QueryEvents:
        if name not in QUERY_PRESETS:
            raise ConfigError(f"query preset {name!r} is unknown; choose one of {', '.join(QUERY_PRESETS)}.")
        t_q, m = QUERY_PRESETS[name]
        return cls(t_q, m, seed)

    def timesteps(self, num_train_timesteps: int) -> np.ndarray:
        """``(T_q,)`` int64 ``tau_j``."""
        if self.num_timesteps > num_train_timesteps:
            raise ConfigError(f"T_q={self.num_timesteps} exceeds the scheduler's T={num_train_timesteps}.")
        j = np.arange(self.num_timesteps)
        return ((j + 0.5) * num_train_timesteps / self.num_timesteps).astype(np.int64)

    def noise(self, checkpoint: int, shape: tuple[int, ...]) -> Tensor:
        """``(T_q, M, *shape)`` noise of checkpoint ``checkpoint``."""
        return torch.stack(
            [
                torch.stack(
                    [
                        noise_from_seed(derive_seed("retrac-query", self.seed, checkpoint, j, m), shape)
                        for m in range(self.num_noise)
                    ]
                )
                for j in range(self.num_timesteps)
            ]
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttributionResult:
    """Top-k training samples for each query.

    A score is ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>`` (docs/design.md section 1): the weighted inner
    product of train and query gradient features. **Positive = proponent**: a gradient step on the
    training sample ``z`` lowers the loss on the query ``z'``; **negative = opponent**. Scale: for
    ``tracin`` it carries the checkpoint weights ``w_k`` (learning rate x steps) times squared
    gradient magnitudes; for ``retrac`` every ``u_k`` and ``q_k`` is a mean of unit vectors, so a score
    lies in ``[-sum_k w_k, sum_k w_k]``; with the kernel, scores are preconditioned (TRAK scale).
    Scores are comparable across queries of one index, not across methods.

    Attributes:
        method: the method name (``tracin``, ``retrac``, ``trak``, ``dtrak``, ``<kind>+kernel``).
        indices: ``(n_query, k)`` int64 training rows, best first.
        scores: ``(n_query, k)`` float32, descending (proponents) or ascending (opponents).
        ids: ``n_query`` lists of ``k`` training sample ids.
        opponents: whether these are the most negative scores.
        search_note: how an approximate index that found fewer than ``k`` rows for some queries was
            filled (wider search, or exact search over its vectors); ``None`` when it was not needed.
        query_ids: one id per query (``None``: row numbers ``0..n_query-1``).
    """

    method: str
    indices: np.ndarray
    scores: np.ndarray
    ids: list[list[str]]
    opponents: bool = False
    search_note: str | None = None
    query_ids: list | None = None

    def to_dict(self) -> dict:
        """The ``retrac.query`` document (docs/design.md section 10) with this one method under ``results``:
        exactly what ``retrac query --json`` prints for one index."""
        from retrac.schema import query_document

        return query_document([self])

    @classmethod
    def from_dict(cls, document: dict, method: str | None = None) -> AttributionResult:
        """Read one method's result back from a ``retrac.query`` document (ids keep their JSON types).

        Raises:
            DataError: not a ``retrac.query`` document of this schema version, or no such method.
        """
        from retrac.schema import QUERY_SCHEMA
        from retrac.schema.models import validate_document

        validate_document(document, QUERY_SCHEMA)
        results = document["results"]
        if method is None and len(results) != 1:
            raise DataError(f"the document holds methods {', '.join(results)}; name one.")
        if method is not None and method not in results:
            raise DataError(f"the document holds no method {method!r}; it holds {', '.join(results)}.")
        entry = results[method] if method is not None else next(iter(results.values()))
        k = entry["k"]
        return cls(
            method=entry["method"],
            indices=np.asarray(entry["indices"], dtype=np.int64).reshape(-1, k),
            scores=np.asarray(entry["scores"], dtype=np.float32).reshape(-1, k),
            ids=[list(row) for row in entry["ids"]],
            opponents=entry["opponents"],
            search_note=entry.get("search_note"),
            query_ids=list(document["query_ids"]),
        )


@dataclass
class Attributor:
    """Loads a store's task, checkpoints, projectors and one or more indexes once; answers many queries.

    Args:
        indexes: index directories built from one store (e.g. a TracIn and a ReTrac index); the parts of
            an index (``retrac build --part I/N``) as folders, a folder of part folders, or URLs of
            part servers (``retrac serve --search-only``), merged per method (``retrac.query.parts``).
        store: the store path; default the path recorded in the first manifest.
        query_events: ``T_q x M`` query events (default 10 x 2; ``QueryEvents.preset("paper")`` = 100 x 16).
        device: torch device for the gradients (``"cpu"``, ``"cuda"``).
        batch_size: query images per gradient batch.
        checkpoints: where the store's checkpoints are now, one per checkpoint in training order
            (default: the recorded paths, or where a move of the store's folder tree put them); each
            is checked against the sha256 recorded at indexing.
        search_path: folders searched for a store / checkpoint not found where recorded (fingerprint / sha256).

    The store defaults to the path recorded in the first manifest, or, when the index and the store
    were moved together, the store's recorded place relative to the index (docs/design.md section 7).
    """

    indexes: list[str | Path] | str | Path
    store: str | Path | None = None
    query_events: QueryEvents = field(default_factory=QueryEvents)
    device: str = DEFAULT_DEVICE
    batch_size: int = 8
    progress: bool = True
    checkpoints: list[str | Path] | None = None
    search_path: list[str | Path] | None = None

    def __post_init__(self) -> None:
        from retrac.indexer.featurize import resolve_device

        resolve_device(self.device)  # a ConfigError naming the device, not torch's AssertionError
        dirs = [self.indexes] if isinstance(self.indexes, (str, Path)) else list(self.indexes)
        if not dirs:
            raise ConfigError("give at least one index directory.")
        sources = open_sources(dirs)  # folders, folders of parts, part server URLs
        recorded = sources[0].manifest["store"]
        self._recorded_store_path = recorded["path"]
        self._search = SearchPath(self.search_path)
        self._store = open_complete_store(self._search.store(self.store, recorded, sources[0].where))
        if self.checkpoints is not None and len(self.checkpoints) != self._store.num_checkpoints:
            raise ConfigError(
                f"{len(self.checkpoints)} checkpoint paths given for a store of {self._store.num_checkpoints} "
                "checkpoints; give every checkpoint, in training order (--checkpoint once per checkpoint)."
            )
        # one index per method: a folder as it is, or parts checked to cover the store once and merged
        self._loaded: dict[str, LoadedIndex] = load_indexes(sources, self._store)
        self._frozen = None  # the VAE and text encoder of a latent / text model, shared by the checkpoints
        self._tasks = [self._load_checkpoint(k) for k in range(self._store.num_checkpoints)]
        self._projectors = [self._store.projector(k, task) for k, task in enumerate(self._tasks)]
        self._cache_key: str | None = None
        self._cache: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ loading
    def _load_checkpoint(self, k: int):
        from retrac.checkpoints import check_scheduler, load_scheduler, scheduler_from_record
        from retrac.pipeline import (
            load_indexed_denoiser,
            load_recorded_frozen,
            recorded_parts,
            scheduler_source,
        )
        from retrac.task import DiffusionTask

        ckpt = self._store.checkpoints[k]
        path = self.checkpoint_path(k)
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {k} of the store is not at its recorded path {ckpt.path!r} (nor where moving the "
                "store's folder tree would have put it, nor under a --search-path); give its place now with "
                "--checkpoint (one per checkpoint, in training order; checked by sha256) or --search-path."
            )
        record = self._store.attrs["task"]
        # VAE, text encoder, LoRA base: as recorded, moved with the store; each checked by sha256
        parts = recorded_parts(
            record, lambda p: displaced_path(p, self._recorded_store_path, self._store.url)
        )
        model, lora = load_indexed_denoiser(path, ckpt, parts, record)
        self._frozen = self._frozen or load_recorded_frozen(record, parts)  # shared by the checkpoints
        cfg = self._store.config
        if record.get("scheduler_class"):  # --scheduler at indexing: rebuilt from the store's record
            scheduler = scheduler_from_record(record["scheduler_class"], ckpt.scheduler)
        else:
            scheduler = load_scheduler(scheduler_source(path, parts))
        check_scheduler(ckpt, scheduler)  # the scheduler recorded at indexing (prediction type, betas, T)
        include, exclude = list(cfg.include) or None, list(cfg.exclude) or None
        vae, text_encoder = self._frozen
        task = DiffusionTask(
            model.to(self.device), scheduler, cfg.objective, include, exclude, vae, text_encoder
        )
        task.lora = lora
        return task

    def checkpoint_path(self, k: int) -> Path:
        """Where checkpoint ``k`` is now: the given override, else its recorded path, moved as the store moved."""
        if self.checkpoints is not None:
            return Path(self.checkpoints[k])
        return self._search.checkpoint(self._store, k, self._recorded_store_path)

    @property
    def training_data_path(self) -> Path | None:
        """The training data the store recorded, moved as the store moved (``None`` when it recorded none)."""
        source = self._store.attrs["dataset"].get("source")
        return displaced_path(source, self._recorded_store_path, self._store.url) if source else None

    @property
    def methods(self) -> list[str]:
        return list(self._loaded)

    @property
    def train_ids(self) -> list[str]:
        return self._store.ids

    @property
    def feature_store(self):
        return self._store

    @property
    def task(self):
        """The task at the last checkpoint (e.g. for sampling new images)."""
        return self._tasks[-1]

    # ------------------------------------------------------------------ queries
    def query_features(
        self,
        images: Tensor | np.ndarray,
        class_labels: Tensor | np.ndarray | None = None,
        prompts: Sequence[str] | str | None = None,
        input_space: str = "pixels",
    ) -> list[np.ndarray]:
        """Projected query gradients per checkpoint: ``K`` arrays ``(n_query, T_q, M, d)`` float32.

        ``images`` and ``class_labels`` may be torch tensors or numpy arrays (labels: integers ``(n_query,)``).
        ``prompts`` (one per image, or one for all) condition a text model; ``input_space="latents"``
        takes a latent model's scaled latents (a generated query) instead of pixels.
        """
        images = torch.as_tensor(images, dtype=torch.float32)
        class_labels = _as_labels(class_labels, images.shape[0])
        key = hashlib.sha256(
            input_space.encode()
            + images.numpy().tobytes()
            + (b"" if class_labels is None else class_labels.numpy().tobytes())
            + repr(prompts).encode()
            + repr(self.query_events).encode()  # step queries change the events between calls
        ).hexdigest()
        if key == self._cache_key and self._cache is not None:
            return self._cache
        images, states = query_inputs(self._tasks[0], images, prompts, input_space)  # pixels or VAE latents
        conditioning = states if states is not None else class_labels
        bar = tqdm(
            total=images.shape[0] * len(self._tasks),
            desc="query gradients",
            unit="query",
            disable=not self.progress,
        )
        out = [
            query_event_features(
                task, projector, images, self.query_events, k, conditioning, self.batch_size, bar.update
            )
            for k, (task, projector) in enumerate(zip(self._tasks, self._projectors, strict=True))
        ]
        bar.close()
        self._cache_key, self._cache = key, out
        return out

    def query_vectors(
        self,
        images: Tensor,
        method: str | None = None,
        class_labels: Tensor | None = None,
        prompts: Sequence[str] | str | None = None,
        input_space: str = "pixels",
    ) -> np.ndarray:
        """``Q(z') = concat_k(q_k(z'))`` of ``method``: ``(n_query, K * d)`` float32 (kernel applied)."""
        loaded = self._method(method)
        parts = []
        for k, feats in enumerate(self.query_features(images, class_labels, prompts, input_space)):
            q = query_vectors(feats, loaded.method.vectors)
            if loaded.preconditioners is not None:
                # Kernel folded into the query: q_k <- (Phi_k^T Phi_k + lambda_k I)^-1 q_k
                q = (q.astype(np.float64) @ loaded.preconditioners[k].T).astype(np.float32)
            parts.append(q)
        return np.concatenate(parts, axis=1)

    def attribute(
        self,
        images: Tensor,
        k: int = DEFAULT_TOP_K,
        method: str | None = None,
        opponents: bool = False,
        class_labels: Tensor | np.ndarray | None = None,
        query_ids: list | None = None,
        prompts: Sequence[str] | str | None = None,
        input_space: str = "pixels",
        rerank: int | None = None,
    ) -> AttributionResult:
        """Top-``k`` proponents (or opponents) of each query image under ``method``.

        Args:
            images: ``(n_query, C, H, W)`` in ``[-1, 1]``, shaped as the model's inputs.
            k: results per query (at most the number of training samples).
            method: one of :attr:`methods`; may be omitted when only one index is loaded.
            opponents: return the most negative scores instead of the most positive.
            class_labels: ``(n_query,)`` labels for a class-conditional model.
            query_ids: one id per query, carried into the result (default: row numbers).
            prompts: for a text model, one prompt per query (or one ``str`` for all).
            input_space: ``"pixels"`` (default; a latent model encodes them to the VAE's mean) or
                ``"latents"`` (scaled latents, e.g. a generated query).
            rerank: re-score the index's top ``max(rerank, k)`` candidates exactly against the store's
                train vectors (``retrac.query.index.rerank``): the scores returned are exact inner
                products, and recall is what the candidate list allows. Default: the index's scores.

        Returns:
            An :class:`AttributionResult` with ``(n_query, k)`` indices and scores.
        """
        loaded = self._method(method)
        if not 1 <= k <= self._store.num_samples:
            raise ConfigError(
                f"k={k} must lie in [1, {self._store.num_samples}] (the number of training samples)."
            )
        if rerank is not None and not int(rerank) >= 1:
            raise ConfigError(
                f"rerank={rerank} must be at least 1: the candidates re-scored exactly per query."
            )
        queries = self.query_vectors(images, loaded.method.name, class_labels, prompts, input_space)
        depth = k if rerank is None else min(max(int(rerank), k), self._store.num_samples)
        ef_search = None
        calibrated = loaded.index.search_params.get("efSearch")
        if rerank is not None and calibrated is not None:
            # re-ranking restores exact scores, so the HNSW candidates need not reach the recall target on
            # quantized scores (SQ8 calibrates to efSearch 4096): efSearch 256 for the top 100 gave recall@10
            # 0.991 after re-ranking in benchmarks/scale.py
            ef_search = min(int(calibrated), max(2 * depth, RERANK_EF_SEARCH))
        found = loaded.index.find(queries, depth, opponents=opponents, ef_search=ef_search)
        scores, indices = found.scores, found.indices
        if rerank is not None:  # exact scores of the top `depth` candidates, best k kept
            scores, indices = rerank_candidates(queries, indices, self._exact_rows(loaded), k, opponents)
        ids = self._store.ids
        return AttributionResult(
            method=loaded.method.name,
            indices=indices,
            scores=scores,
            ids=[[ids[i] for i in row] for row in indices.tolist()],
            opponents=opponents,
            search_note=found.note,
            query_ids=None if query_ids is None else list(query_ids),
        )

    def _exact_rows(self, loaded: LoadedIndex):
        """``rows -> U(z)`` of re-ranking candidates: the index's own ``vectors.npy`` (only
        those rows read) when built with it, else the store (each shard holding a candidate read whole
        and digest-checked). Both give the bits the index was built from."""
        if loaded.vectors is not None:
            return lambda rows: np.asarray(loaded.vectors[rows])
        kind = loaded.method.vectors
        return lambda rows: train_vector_rows(self._store, kind, rows)

    def _method(self, method: str | None) -> LoadedIndex:
        if method is None:
            if len(self._loaded) != 1:
                raise ConfigError(f"several indexes are loaded ({', '.join(self._loaded)}); name the method.")
            return next(iter(self._loaded.values()))
        if method not in self._loaded:
            raise ConfigError(f"no index of method {method!r} is loaded; loaded: {', '.join(self._loaded)}.")
        return self._loaded[method]


def query_event_features(
    task,
    projector,
    images: Tensor,
    events: QueryEvents,
    checkpoint: int,
    conditioning: Tensor | None = None,
    batch_size: int = 8,
    on_batch=None,
) -> np.ndarray:
    """Projected gradients ``(n, T_q, M, d)`` float32 of the query images at checkpoint index
    ``checkpoint``'s query events: row ``(i, j, m)`` is ``P_k grad f(theta_k; z'_i, tau_j, eps_jm)``, the
    same timesteps and noise for every query. ``images`` are the model's inputs (pixels or latents,
    :func:`retrac.query.inputs.query_inputs`), ``conditioning`` their labels or text states;
    ``on_batch(b)`` is called after each batch of ``b`` queries (a progress bar's ``update``)."""
    n, t_q, m = images.shape[0], events.num_timesteps, events.num_noise
    taus = torch.from_numpy(events.timesteps(task.num_train_timesteps))
    noise = events.noise(checkpoint, tuple(images.shape[1:])).reshape(t_q * m, *images.shape[1:])
    feats = np.zeros((n, t_q, m, projector.dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        b = batch.shape[0]
        phi, _ = projected_gradients(
            task,
            projector,
            batch,
            taus.repeat_interleave(m).expand(b, t_q * m),
            noise.expand(b, *noise.shape),
            None if conditioning is None else conditioning[start : start + b],
            sample_ids=[f"query {start + i}" for i in range(b)],
        )
        feats[start : start + b] = phi.numpy().reshape(b, t_q, m, -1)
        if on_batch is not None:
            on_batch(b)
    return feats


def _as_labels(class_labels, num_queries: int) -> Tensor | None:
    """Class labels as an int64 tensor ``(n_query,)`` from a tensor, a numpy array or a list."""
    if class_labels is None:
        return None
    array = np.asarray(class_labels.cpu() if isinstance(class_labels, Tensor) else class_labels)
    if array.ndim != 1 or array.shape[0] != num_queries or (array.size and array.dtype.kind not in "iu"):
        raise DataError(
            f"class_labels of shape {array.shape} and dtype {array.dtype}: give {num_queries} integer labels, "
            "one per query image."
        )
    return torch.from_numpy(array.astype(np.int64))
