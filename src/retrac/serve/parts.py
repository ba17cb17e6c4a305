"""``retrac serve --search-only``: a part server, the search half of a multi-machine index.

docs/design.md section 6, "Parts". It loads index parts (``retrac build --part I/N``; a whole index
serves as part ``0/1``) as the ``Attributor`` loads an index (seal, digests, method re-derived
against the store, so it needs the store but no model, checkpoint or training image) and answers
searches of query *vectors*: the front (``retrac query --index URL``, ``Attributor([URL, ...])``)
computes each query's gradients once and merges every part's top-k (``retrac.query.parts``). The
protocol (``GET /parts``, ``POST /search``, ``GET /parts/{method}/kernel.npz``) is described in
``retrac.query.remote``. Nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from retrac.errors import ConfigError, DataError
from retrac.query.building import open_complete_store
from retrac.query.parts import LocalIndexPart, load_local, open_sources, store_expectation
from retrac.query.provenance import KERNEL_FILENAME
from retrac.query.remote import PARTS_FORMAT, PARTS_FORMAT_VERSION, is_remote
from retrac.relocate import SearchPath
from retrac.serve.app import BodySizeLimit, install_error_handlers
from retrac.serve.config import ServeConfig
from retrac.serve.service import NotFoundError


class SearchRequest(BaseModel):
    """``POST /search``: query vectors ``Q(z')`` of one method, computed by the front."""

    method: str = Field(description="the method of the part to search (GET /parts)")
    queries: list[list[float]] = Field(description="(n_query, D) query vectors, kernel folded in")
    k: int = Field(description="results per query, at most the part's rows and limits.max_k")
    opponents: bool = Field(default=False, description="the most negative scores instead")
    ef_search: int | None = Field(default=None, description="HNSW candidate list (default: calibrated)")


class PartService:
    """The parts one part server holds, one per method, and their searches.

    Args:
        parts: ``{method: (folder, manifest, LocalIndexPart)}``.
        config: ``max_k`` and ``max_images`` (queries per request) of ``retrac serve``.
    """

    def __init__(self, parts: dict[str, tuple[Path, dict, LocalIndexPart]], config: ServeConfig) -> None:
        self.parts, self.config = parts, config

    @classmethod
    def load(
        cls,
        indexes: Sequence[str | Path],
        store: str | Path | None = None,
        search_path: Sequence[str | Path] | None = None,
        config: ServeConfig | None = None,
    ) -> PartService:
        """Load index parts (folders, or folders of parts) of one store; at most one part per method.

        Raises:
            ConfigError: a URL instead of a folder, or two parts of one method.
            StoreMismatchError, IndexDamagedError, DataError: as the ``Attributor`` refuses an index.
        """
        if not indexes:
            raise ConfigError("give at least one index part folder (--index DIR).")
        if any(is_remote(i) for i in indexes):
            raise ConfigError("--search-only serves index folders of this machine; give folders, not URLs.")
        sources = open_sources(indexes)
        recorded = sources[0].manifest["store"]
        store = open_complete_store(SearchPath(search_path).store(store, recorded, sources[0].where))
        expect = store_expectation(store)
        parts: dict[str, tuple[Path, dict, LocalIndexPart]] = {}
        for source in sources:
            index, method, _, part = load_local(source.where, source.manifest, store, expect)
            if method.name in parts:
                raise ConfigError(
                    f"two {method.name} index parts ({parts[method.name][0]} and {source.where}); a part server "
                    "serves one part per method: start one server per part."
                )
            parts[method.name] = (Path(source.where), source.manifest, LocalIndexPart(index, part))
        return cls(parts, config or ServeConfig())

    def _part(self, method: str) -> tuple[Path, dict, LocalIndexPart]:
        if method not in self.parts:
            raise NotFoundError(f"no {method!r} index part here; this server holds {', '.join(self.parts)}.")
        return self.parts[method]

    def listing(self) -> dict[str, Any]:
        """``GET /parts``: each part's sealed manifest, and the request limits."""
        return {
            "format": PARTS_FORMAT,
            "version": PARTS_FORMAT_VERSION,
            "parts": [
                {"method": name, "manifest": manifest, "exact": part.exact}
                for name, (_, manifest, part) in self.parts.items()
            ],
            "limits": {"max_k": self.config.max_k, "max_queries": self.config.max_images},
        }

    def search(self, request: SearchRequest) -> dict[str, Any]:
        """``POST /search``: the part's top ``k`` of each query vector, in store rows, best first."""
        _, _, part = self._part(request.method)
        n = len(request.queries)
        if not 1 <= n <= self.config.max_images:
            raise ConfigError(
                f"{n} query vectors in one request; send 1 to {self.config.max_images} (--max-images) at a time."
            )
        if not 1 <= request.k <= min(self.config.max_k, part.num_vectors):
            raise ConfigError(
                f"k={request.k} must lie in [1, {min(self.config.max_k, part.num_vectors)}] (this part's rows, "
                f"and this server's --max-k {self.config.max_k})."
            )
        try:
            queries = np.asarray(request.queries, dtype=np.float32)
        except ValueError:
            raise DataError("queries must be a list of equally long lists of numbers.") from None
        hits = part.find(queries, request.k, request.opponents, request.ef_search)
        return {
            "method": request.method,
            "k": request.k,
            "rows": hits.rows.tolist(),
            "scores": hits.scores.tolist(),  # float32 -> float: exact in JSON
            "note": hits.note,
        }

    def kernel_file(self, method: str) -> Path:
        directory, manifest, _ = self._part(method)
        if KERNEL_FILENAME not in (manifest.get("digests") or {}):
            raise NotFoundError(f"the {method!r} index part has no kernel.")
        return directory / KERNEL_FILENAME


def create_part_app(service: PartService) -> FastAPI:
    """The ASGI app of a part server: ``GET /health``, ``GET /parts``, ``POST /search``, the kernel file."""
    app = FastAPI(title="retrac serve --search-only", description=__doc__)
    app.add_middleware(BodySizeLimit, max_bytes=service.config.max_upload_bytes)
    install_error_handlers(app)

    @app.get("/health", summary="Liveness and the parts held")
    def health() -> dict:
        return {"status": "ok", "methods": list(service.parts)}

    @app.get("/parts", summary="The index parts held: sealed manifests (method, store, row range), limits")
    def parts() -> dict:
        return service.listing()

    @app.post("/search", summary="Top-k store rows of query vectors in one part")
    def search(request: SearchRequest) -> dict:  # a plain def: FastAPI runs it off the event loop
        return service.search(request)

    @app.get(f"/parts/{{method}}/{KERNEL_FILENAME}", summary="The kernel a front folds into its queries")
    def kernel(method: str):
        return FileResponse(str(service.kernel_file(method)), media_type="application/octet-stream")

    return app


def run_part_server(service: PartService, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``service`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(
        create_part_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
