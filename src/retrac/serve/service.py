"""The state behind ``retrac serve``: one loaded ``Attributor``, its training images, an optional
pixel index for the memorization audit, and the request paths that use them.

Work is split by cost. Query gradients (``T_q x M`` per-sample gradients per checkpoint) go through
the :class:`~retrac.serve.batcher.QueryBatcher` to one gradient thread; index searches, store reads
and pixel-neighbour searches run on a small thread pool; the event loop only parses, validates and
answers. A search of request ``r`` is exactly the search of :meth:`Attributor.attribute` for the
same query vectors, so an HTTP answer equals ``Attributor.attribute`` for the same images (up to the
float rounding of computing the gradients in a larger batch).

Nothing here writes to the store, the indexes or any file: the query-vector cache and the history
of answered queries are bounded and in memory.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrac.data import ImageDataset
from retrac.errors import ConfigError, DataError
from retrac.query.remote import is_remote
from retrac.schema import query_document
from retrac.serve.batcher import BatchTiming, QueryBatcher
from retrac.serve.config import ServeConfig
from retrac.serve.loading import load_audit, load_examples
from retrac.serve.records import RememberedQuery, Timing, image_key, query_image_url, sample_image_url

INFLUENCED_SHOWN = 10
SCORE_MEANING = "I(z, z') = sum_k w_k <u_k(z), q_k(z')>; positive = proponent, negative = opponent"


class NotFoundError(DataError):
    """An unknown training sample, example or query id (HTTP 404)."""


class AuditUnavailableError(ConfigError):
    """``POST /audit`` on a server started without ``--audit`` (HTTP 409)."""


class AttributionService:
    """Everything one ``retrac serve`` process holds; built once at start.

    Args:
        attributor: a loaded :class:`retrac.query.attribution.Attributor`.
        train: the training images of its store (thumbnails, pixel audit).
        config: limits and batching.
        pixel_index: a :class:`retrac.audit.PixelIndex` for ``POST /audit``, or ``None``.
        audit_config: thresholds and neighbour count of the audit.
        examples: images offered by the page's picker, or ``None``.
        index_dirs: the index folders (reported by ``GET /indexes``).
        audit_source: where the pixel index came from (reported).
    """

    def __init__(
        self,
        attributor,
        train: ImageDataset,
        config: ServeConfig | None = None,
        pixel_index=None,
        audit_config=None,
        examples: ImageDataset | None = None,
        index_dirs: Sequence[str | Path] = (),
        audit_source: str | None = None,
    ) -> None:
        from retrac.audit import AuditConfig

        self.attributor = attributor
        self.train = train
        self.config = config or ServeConfig()
        self.pixel_index = pixel_index
        self.audit_config = audit_config or AuditConfig()
        self.examples = examples
        self.index_dirs = [_where(d) for d in index_dirs]
        self.audit_source = audit_source
        if list(train.ids) != list(attributor.train_ids):
            raise DataError(
                "the training images do not hold the store's samples (ids differ); give the store's data."
            )
        self.methods: list[str] = list(attributor.methods)
        # Attributor has no public accessor for its loaded SearchIndex; searches must be the same calls.
        self._loaded = {m: attributor._method(m) for m in self.methods}
        self._row_of = {sample_id: row for row, sample_id in enumerate(train.ids)}
        self._example_row = {} if examples is None else {e: i for i, e in enumerate(examples.ids)}
        self.num_samples = len(train)
        self.max_k = min(self.config.max_k, self.num_samples)
        task = attributor.task
        self.conditional = bool(task.is_class_conditional)
        self.text_conditional = bool(task.is_text_conditional)  # POST /attribute needs a prompt
        # uploads are pixels: the VAE's input for a latent model (encoded as Attributor.attribute does)
        self.image_shape = tuple(int(s) for s in task.image_shape)
        self._gradient_thread = ThreadPoolExecutor(1, thread_name_prefix="retrac-gradients")
        self._search_pool = ThreadPoolExecutor(self.config.search_threads, thread_name_prefix="retrac-search")
        self.batcher = QueryBatcher(
            self._compute_vectors,
            self._gradient_thread,
            window_s=self.config.batch_window_ms / 1000,
            max_batch_images=self.config.max_batch_images,
            max_pending_images=self.config.max_pending_images,
            retry_after_s=self.config.retry_after_s,
        )
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._history: OrderedDict[str, RememberedQuery] = OrderedDict()
        self._train_vector_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.started = time.time()
        self.answered = 0

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        indexes: Sequence[str | Path],
        audit: str | Path | None = None,
        data: str | Path | None = None,
        examples: Sequence[str | Path] = (),
        query_events=None,
        device: str = "cpu",
        config: ServeConfig | None = None,
        store: str | Path | None = None,
    ) -> AttributionService:
        """Load the indexes, the training images, the audit's pixel index and the examples.

        Args:
            indexes: attribution index folders of one store (one per method).
            audit: ``retrac audit``'s output folder or its pixel index folder (read, never built
                or written), ``"memory"`` to build the exact pixel index in memory, or ``None``.
            data: the training data (default: the source the store recorded; fingerprint checked).
            examples: data files whose first ``max_examples`` images the page offers to pick.
            query_events: :class:`retrac.query.attribution.QueryEvents` (default 10 x 2).
            device: torch device of the query gradients.
            store: the feature store (default: the one the first index records).
        """
        from retrac.audit import load_training_data
        from retrac.query.attribution import Attributor, QueryEvents

        config = config or ServeConfig()
        dirs = [d if is_remote(d) else Path(d) for d in indexes]  # folders, or part server URLs
        if not dirs:
            raise ConfigError("give at least one index folder (--index DIR).")
        attributor = Attributor(
            dirs,
            store=store,
            query_events=query_events or QueryEvents(),
            device=device,
            batch_size=config.max_batch_images,
            progress=False,
        )
        train = load_training_data(attributor.feature_store, data, attributor.training_data_path)
        pixel_index, audit_config, audit_source = load_audit(audit, train)
        picked = load_examples(examples, config.max_examples, attributor.task)
        return cls(attributor, train, config, pixel_index, audit_config, picked, dirs, audit_source)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def close(self) -> None:
        self._gradient_thread.shutdown(wait=False, cancel_futures=True)
        self._search_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ checks
    def check_methods(self, method: str | None) -> list[str]:
        """The methods a request asks for: ``[method]``, or every loaded one when ``None``."""
        if method is None or method == "":
            return list(self.methods)
        if method not in self._loaded:
            raise ConfigError(f"no index of method {method!r} is loaded; loaded: {', '.join(self.methods)}.")
        return [method]

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            limit = (
                f"the number of training samples ({self.num_samples})"
                if self.max_k == self.num_samples
                else f"this server's limit (--max-k {self.config.max_k})"
            )
            raise ConfigError(f"k={k} must lie in [1, {self.max_k}], {limit}.")
        return int(k)

    def check_images(self, images: Tensor, labels: Tensor | None, prompt: str | None = None) -> None:
        """Refuse images that do not fit the model, missing or surplus labels, a missing or surplus prompt."""
        from retrac.serve.uploads import UploadTooLargeError

        if images.shape[0] > self.config.max_images:
            raise UploadTooLargeError(
                f"{images.shape[0]} images in one request; this server takes at most {self.config.max_images} "
                "(--max-images): split the request."
            )
        self.attributor.task.check_images(images, "uploaded images")
        if self.conditional and labels is None:
            raise DataError(
                "the model is class-conditional: give one class label per image (labels=3,5,...)."
            )
        if not self.conditional and labels is not None:
            raise DataError("the model is unconditional: drop the labels.")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{labels.shape[0]} labels for {images.shape[0]} images; give one label per image."
            )
        if self.text_conditional and not prompt:
            raise DataError(
                f"the {self.attributor.task.spec.model_class} is text-conditioned: give a prompt "
                "(form field 'prompt', one for all the images)."
            )
        if prompt and not self.text_conditional:
            raise DataError("the model is not text-conditioned: drop the prompt.")

    def example(self, example_id: str) -> tuple[Tensor, int | None]:
        if self.examples is None or example_id not in self._example_row:
            raise NotFoundError(f"no example {example_id!r}; GET /examples lists them.")
        row = self._example_row[example_id]
        label = None if self.examples.labels is None else int(self.examples.labels[row])
        return self.examples.images[row], label

    # ------------------------------------------------------------------------------ query vectors
    def _compute_vectors(
        self, images: Tensor, conditioning: Tensor | list[str] | None
    ) -> dict[str, np.ndarray]:
        """Gradient thread: ``{method: (n, D)}`` query vectors ``Q(z')`` (kernel folded in).

        ``conditioning`` is class labels ``(n,)`` or one prompt per image; the images go through
        ``Attributor.query_vectors`` (the VAE's mean for a latent model, the prompts' text states).
        """
        labels, prompts = (None, conditioning) if isinstance(conditioning, list) else (conditioning, None)
        # The first call computes the query features; the others reuse the Attributor's cache.
        return {m: self.attributor.query_vectors(images, m, labels, prompts) for m in self.methods}

    async def query_vectors(
        self, images: Tensor, labels: Tensor | None, prompt: str | None = None
    ) -> tuple[dict[str, np.ndarray], list[str], Timing]:
        """Query vectors of every loaded method for ``images`` (under ``prompt``): cached rows, the others batched.

        Returns:
            ``({method: (n, D)}, keys, timing)``; ``keys`` are the images' digests.
        """
        n = int(images.shape[0])
        label_list = [None] * n if labels is None else [int(x) for x in labels]
        keys = [image_key(images[i], label_list[i], prompt) for i in range(n)]
        found: dict[int, dict[str, np.ndarray]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[i] = self._cache[key]
        missing = [i for i in range(n) if i not in found]
        timing = Timing(cached_images=len(found))
        if missing:
            rows = torch.tensor(missing)
            conditioning = [prompt] * len(missing) if prompt else None if labels is None else labels[rows]
            vectors, batch = await self.batcher.submit(images[rows], conditioning)
            self._note_batch(timing, batch)
            with self._lock:
                for j, i in enumerate(missing):
                    found[i] = {m: v[j] for m, v in vectors.items()}
                    if self.config.cache_queries:
                        self._cache[keys[i]] = found[i]
                        self._cache.move_to_end(keys[i])
                while len(self._cache) > self.config.cache_queries:
                    self._cache.popitem(last=False)
        stacked = {m: np.stack([found[i][m] for i in range(n)]) for m in self.methods}
        return stacked, keys, timing

    @staticmethod
    def _note_batch(timing: Timing, batch: BatchTiming) -> None:
        timing.queued_s, timing.gradients_s, timing.batch_images = (
            batch.queued_s,
            batch.compute_s,
            batch.batch_images,
        )

    def _remember(
        self, keys: list[str], names: list[str], images: Tensor, vectors: dict[str, np.ndarray]
    ) -> None:
        if not self.config.history_queries:
            return
        with self._lock:
            for i, key in enumerate(keys):
                self._history[key] = RememberedQuery(
                    key, names[i], images[i].clone(), {m: v[i] for m, v in vectors.items()}
                )
                self._history.move_to_end(key)
            while len(self._history) > self.config.history_queries:
                self._history.popitem(last=False)

    # ------------------------------------------------------------------------------ search
    def _search(self, method: str, queries: np.ndarray, k: int, opponents: bool):
        """Top-``k`` of ``queries`` under ``method``: the search ``Attributor.attribute`` runs."""
        from retrac.query.attribution import AttributionResult

        loaded = self._loaded[method]
        found = loaded.index.find(queries, k, opponents=opponents)  # never padding: see SearchResult
        ids = self.train.ids
        return AttributionResult(
            method=loaded.method.name,
            indices=found.indices,
            scores=found.scores,
            ids=[[ids[i] for i in row] for row in found.indices.tolist()],
            opponents=opponents,
            search_note=found.note,
        )

    async def _run_searches(
        self, vectors: dict[str, np.ndarray], methods: list[str], k: int, opponents: bool
    ):
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        results = {
            m: await loop.run_in_executor(self._search_pool, self._search, m, vectors[m], k, opponents)
            for m in methods
        }
        return results, time.perf_counter() - started

    # ------------------------------------------------------------------------------ endpoints
    async def attribute(
        self,
        images: Tensor,
        query_ids: list[str],
        labels: Tensor | None,
        k: int,
        method: str | None,
        opponents: bool,
        prompt: str | None = None,
    ) -> tuple[dict[str, Any], Timing]:
        """``POST /attribute``: the ``retrac.query`` document ``retrac query --json`` prints, plus image URLs.

        ``results`` holds one entry per method asked (named, or every loaded one), as the CLI prints
        (docs/design.md section 10); each entry adds ``thumbnails`` (``(n_query, k)`` URLs of the
        training samples' images) and ``query_image_urls`` names the query images. ``prompt``
        (required by a text model, refused by the others) conditions every image.
        """
        methods = self.check_methods(method)
        k = self.check_k(k)
        self.check_images(images, labels, prompt)
        vectors, keys, timing = await self.query_vectors(images, labels, prompt)
        self._remember(keys, query_ids, images, vectors)
        results, timing.search_s = await self._run_searches(vectors, methods, k, opponents)
        payload = query_document(results.values(), query_ids)
        for m, entry in payload["results"].items():
            entry["thumbnails"] = [[sample_image_url(i) for i in row] for row in results[m].ids]
        payload["query_image_urls"] = [query_image_url(key) for key in keys]
        self.answered += 1
        return payload, timing

    async def audit(
        self, images: Tensor, query_ids: list[str], labels: Tensor | None, k: int, prompt: str | None = None
    ) -> tuple[dict[str, Any], Timing]:
        """``POST /audit``: one record per image as ``retrac audit`` writes them (verdict, relative
        distance, nearest training images, proponents under every loaded method with ``nn_rank``),
        with image URLs."""
        from retrac.audit import audit_images

        if self.pixel_index is None:
            raise AuditUnavailableError(
                "this server has no audit loaded; start it with --audit DIR (a `retrac audit` output or its "
                "pixel index) or --audit memory."
            )
        k = self.check_k(k)
        self.check_images(images, labels, prompt)
        loop = asyncio.get_running_loop()
        neighbours = min(self.audit_config.num_neighbours, self.pixel_index.num_distinct)
        config = type(self.audit_config)(
            **{**self.audit_config.to_dict(), "k": k, "num_neighbours": neighbours}
        )
        pixel = loop.run_in_executor(
            self._search_pool, audit_images, images, self.pixel_index, None, config, query_ids
        )
        vectors, keys, timing = await self.query_vectors(images, labels, prompt)
        self._remember(keys, query_ids, images, vectors)
        audited = await pixel
        results, timing.search_s = await self._run_searches(vectors, self.methods, k, False)
        groups = self.pixel_index.groups
        records = []
        for i, record in enumerate(audited.records):
            nn_group = groups[record["nearest_row"]]
            for m, r in results.items():
                rows = [int(x) for x in r.indices[i]]
                same = [groups[x] == nn_group for x in rows]
                record["proponents"][m] = {
                    "rows": rows,
                    "ids": list(r.ids[i]),
                    "scores": [float(s) for s in r.scores[i]],
                    "nn_rank": same.index(True) + 1 if any(same) else None,
                    "thumbnails": [sample_image_url(x) for x in r.ids[i]],
                }
            for near in record["nearest"]:
                near["image_url"] = sample_image_url(near["id"])
            record["query_image_url"] = query_image_url(keys[i])
            records.append(record)
        self.answered += 1
        payload = {
            "records": records,
            "thresholds": config.thresholds,
            "num_neighbours": neighbours,
            "meaning": audited.summary["meaning"],
        }
        return payload, timing

    def _train_vector(self, method: str, row: int) -> np.ndarray:
        """``U(z) = concat_k(w_k u_k(z))`` of one training row, read from the store (``(D,)``)."""
        key = (method, row)
        with self._lock:
            if key in self._train_vector_cache:
                return self._train_vector_cache[key]
        store = self.attributor.feature_store
        kind = self._loaded[method].method.vectors
        rows = slice(row, row + 1)
        parts = [np.float32(w) * store.train_vectors(k, kind, rows) for k, w in enumerate(store.weights)]
        vector = np.concatenate(parts, axis=1)[0]
        with self._lock:
            self._train_vector_cache[key] = vector
            while len(self._train_vector_cache) > 256:
                self._train_vector_cache.popitem(last=False)
        return vector

    def _influenced(self, row: int) -> dict[str, Any]:
        with self._lock:
            remembered = list(self._history.values())
        out = {}
        for m in self.methods:
            if not remembered:
                out[m] = []
                continue
            u = self._train_vector(m, row)
            scores = np.stack([r.vectors[m] for r in remembered]) @ u  # I(z, z') for every remembered z'
            order = np.argsort(-scores, kind="stable")[:INFLUENCED_SHOWN]
            out[m] = [
                {
                    "query_id": remembered[j].name,
                    "score": float(scores[j]),
                    "image_url": query_image_url(remembered[j].key),
                }
                for j in order
            ]
        return {"influenced": out, "queries_considered": len(remembered)}

    async def sample(self, sample_id: str) -> dict[str, Any]:
        """``GET /samples/{id}``: a training sample's metadata and the answered queries it influences most."""
        row = self.sample_row(sample_id)
        info: dict[str, Any] = {
            "id": sample_id,
            "row": row,
            "label": None if self.train.labels is None else int(self.train.labels[row]),
            "image_url": sample_image_url(sample_id),
            "shape": list(self.train.images.shape[1:]),
            "source": self.train.source,
        }
        if self.pixel_index is not None:
            info["duplicates"] = self.pixel_index.duplicates(row)
        loop = asyncio.get_running_loop()
        info.update(await loop.run_in_executor(self._search_pool, self._influenced, row))
        info["score_meaning"] = (
            SCORE_MEANING
            + "; influenced: the queries this server answered (kept in memory), highest score first"
        )
        return info

    def sample_row(self, sample_id: str) -> int:
        if sample_id not in self._row_of:
            raise NotFoundError(
                f"no training sample {sample_id!r} in the store ({self.num_samples} samples)."
            )
        return self._row_of[sample_id]

    def query_image(self, key_prefix: str) -> Tensor:
        with self._lock:
            for key, remembered in self._history.items():
                if key.startswith(key_prefix) and len(key_prefix) >= 8:
                    return remembered.image
        raise NotFoundError(f"no remembered query {key_prefix!r} (only the last answered queries are kept).")

    # ------------------------------------------------------------------------------ descriptions
    def describe_indexes(self) -> dict[str, Any]:
        """``GET /indexes``: what is loaded."""
        store, task = self.attributor.feature_store, self.attributor.task
        indexes = []
        for m in self.methods:
            loaded = self._loaded[m]
            index = loaded.index
            indexes.append(
                {
                    "method": m,
                    "vectors": loaded.method.vectors,
                    "kernel": loaded.manifest.get("kernel"),
                    "directory": _where(loaded.directory),
                    "num_vectors": index.num_vectors,
                    "dim": index.dim,
                    "kind": index.kind,
                    "factory": index.factory,
                    "exact": index.exact,
                    "recall": index.recall,
                    "search_params": index.search_params,
                }
            )
        events = self.attributor.query_events
        return {
            "indexes": indexes,
            "store": {
                "path": str(store.path),
                "fingerprint": store.fingerprint,
                "num_samples": store.num_samples,
                "num_checkpoints": store.num_checkpoints,
                "dim_per_checkpoint": store.dim,
                "objective": store.config.objective,
            },
            "query_events": {
                "num_timesteps": events.num_timesteps,
                "num_noise": events.num_noise,
                "seed": events.seed,
            },
            "image_shape": list(self.image_shape),  # what uploads must be (pixels)
            "latent_shape": list(task.sample_shape) if task.is_latent else None,
            "class_conditional": self.conditional,
            "text_conditional": self.text_conditional,  # POST /attribute then needs `prompt`
            "audit": None
            if self.pixel_index is None
            else {
                "source": self.audit_source,
                "num_distinct": self.pixel_index.num_distinct,
                "thresholds": self.audit_config.thresholds,
                "num_neighbours": min(self.audit_config.num_neighbours, self.pixel_index.num_distinct),
            },
            "limits": {
                "max_k": self.max_k,
                "max_images": self.config.max_images,
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_image_side": self.config.max_image_side,
            },
            "score_meaning": SCORE_MEANING,
        }

    def describe_examples(self) -> list[dict[str, Any]]:
        if self.examples is None:
            return []
        labels = self.examples.labels
        return [
            {
                "id": example_id,
                "label": None if labels is None else int(labels[i]),
                "image_url": f"/examples/{i}/image.png",
            }
            for i, example_id in enumerate(self.examples.ids)
        ]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 3),
            "methods": self.methods,
            "answered": self.answered,
            "queue": {"pending_images": self.batcher.pending_images, "computing": self.batcher.computing},
            "batcher": self.batcher.stats.to_dict(),
            "cached_queries": len(self._cache),
            "remembered_queries": len(self._history),
        }


def _where(directory) -> str:
    """An index folder, resolved; a part server as given."""
    return str(directory) if is_remote(directory) else str(Path(directory).resolve())
