"""The FastAPI application of ``retrac serve``: routes, limits and error answers.

Every error a request can cause is answered with JSON ``{"detail": message}`` and a 4xx status
that says whose fault it is: 404 unknown id, 409 no audit loaded, 413 too large, 415 not an image
or array, 422 an image or parameter that does not fit, 503 (with ``Retry-After``) a full queue. An
unexpected exception is logged with its traceback on the server and answered with a 500 that
carries no traceback.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from retrac.errors import RetracError
from retrac.serve.batcher import ServiceBusyError
from retrac.serve.service import AttributionService, AuditUnavailableError, NotFoundError
from retrac.serve.uploads import UnsupportedUploadError, UploadTooLargeError, decode_upload, png_bytes

log = logging.getLogger("retrac.serve")

STATIC = resources.files("retrac.serve") / "static"
API_DESCRIPTION = """
Attribution queries against indexes loaded once. A score is
`I(z, z') = sum_k w_k <u_k(z), q_k(z')>`: positive = proponent (a gradient step on the training
sample z lowers the loss on the query z'), negative = opponent. Results are `(n_query, k)`, best
first. Images are PNG / JPEG files or `.npy` arrays shaped like the model's inputs (uint8, or float
in [-1, 1]); for a latent model that is the VAE's input, encoded to latents as `retrac query` does. A
text-conditioned model (GET /indexes `text_conditional`) takes a `prompt` for the images.
"""


class BodySizeLimit:
    """ASGI middleware: 413 for a request body above ``max_bytes``, declared or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body exceeds this server's limit of {self.max_bytes} bytes (--max-upload-mb); "
            "send fewer or smaller images."
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=message)
            return event

        await self.app(scope, limited_receive, send)


def _status(exc: RetracError) -> int:
    if isinstance(exc, ServiceBusyError):
        return 503
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, AuditUnavailableError):
        return 409
    if isinstance(exc, UploadTooLargeError):
        return 413
    if isinstance(exc, UnsupportedUploadError):
        return 415
    return 422


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _read_images(
    service: AttributionService,
    files: list[UploadFile] | None,
    examples: list[str] | None,
    labels: str | None,
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """Decode uploads and named examples into ``(n, C, H, W)``, ids and labels."""
    chunks, ids, example_labels = [], [], []
    for upload in files or []:
        if not upload.filename and not upload.size:  # an empty file field of a browser form
            continue
        content = await upload.read()
        images, names = decode_upload(upload.filename or "upload", content, service.config.max_image_side)
        chunks.append(images)
        ids += names
        if sum(c.shape[0] for c in chunks) > service.config.max_images:
            break  # check_images names the limit
    for example_id in examples or []:
        image, label = service.example(example_id)
        chunks.append(image[None])
        ids.append(example_id)
        example_labels.append(label)
    if not chunks:
        raise RetracError("no image given: upload files (field 'files') or name examples ('examples').")
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) > 1:
        raise RetracError(
            f"the images have different shapes {sorted(shapes)}; the model takes {service.image_shape}."
        )
    images = torch.cat(chunks)
    label_tensor = None
    if labels is not None and labels.strip():
        try:
            values = [int(x) for x in labels.replace(" ", "").split(",") if x]
        except ValueError:
            raise RetracError(f"labels {labels!r} must be comma-separated integers, one per image.") from None
        label_tensor = torch.tensor(values, dtype=torch.long)
    elif examples and not files and all(x is not None for x in example_labels) and service.conditional:
        label_tensor = torch.tensor(example_labels, dtype=torch.long)
    return images, ids, label_tensor


def _prompt(prompt: str | None) -> str | None:
    """The form's prompt, or ``None`` when it is absent or blank (a browser sends the empty text box)."""
    return prompt if prompt and prompt.strip() else None


def install_error_handlers(app: FastAPI) -> None:
    """JSON ``{"detail": message}`` answers: a ``RetracError`` with its 4xx status (``_status``), an invalid
    request 422, a disconnected client 499, anything unexpected 500 without a traceback (logged)."""

    @app.exception_handler(RetracError)
    async def retrac_error(request: Request, exc: RetracError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ServiceBusyError) else None
        return JSONResponse({"detail": str(exc)}, status_code=_status(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # nobody is listening; nothing to log

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); the server log has the details."},
            status_code=500,
        )


def create_app(service: AttributionService) -> FastAPI:
    """The ASGI app of ``service``: JSON API, OpenAPI schema at ``/docs``, web page at ``/``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="retrac serve",
        description=API_DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=service.config.max_upload_bytes)

    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/health", summary="Liveness, queue depth and batching counters")
    async def health() -> dict:
        return service.health()

    @app.get("/indexes", summary="What is loaded: methods, N, dims, recall measured at build, limits")
    async def indexes() -> dict:
        return service.describe_indexes()

    @app.get("/examples", summary="Images the page offers to pick (from --examples)")
    async def examples() -> list[dict]:
        return service.describe_examples()

    @app.get("/examples/{number}/image.png", summary="An example's image", response_class=Response)
    async def example_image(number: int):
        listed = service.describe_examples()
        if not 0 <= number < len(listed):
            raise NotFoundError(f"no example number {number}; GET /examples lists {len(listed)}.")
        image, _ = service.example(listed[number]["id"])
        return Response(png_bytes(image), media_type="image/png")

    @app.post("/attribute", summary="Top-k proponents (or opponents) of query images")
    async def attribute(
        request: Request,
        files: Annotated[
            list[UploadFile] | None,
            File(description="PNG / JPEG images or .npy arrays shaped like the model's inputs"),
        ] = None,
        examples: Annotated[
            list[str] | None, Form(description="ids from GET /examples, instead of files")
        ] = None,
        k: Annotated[int, Form(description="results per query, at most GET /indexes limits.max_k")] = 10,
        method: Annotated[
            str | None, Form(description="one loaded method (default: every loaded one)")
        ] = None,
        opponents: Annotated[
            bool, Form(description="the most negative scores instead of the most positive")
        ] = False,
        labels: Annotated[
            str | None, Form(description="class labels, comma-separated (class-conditional models)")
        ] = None,
        prompt: Annotated[
            str | None,
            Form(description="one prompt for all the images (required by text-conditioned models)"),
        ] = None,
    ) -> JSONResponse:
        """The `retrac.query` document `retrac query --json` prints for the same images and options:
        `{schema, schema_version, score_meaning, query_ids, results: {method: {method, opponents, k,
        indices, scores, ids}}}` (indices, scores and ids `(n_query, k)`, best first), one entry per
        method asked (`prompt` conditions every image of a text model). Each entry adds `thumbnails`
        (`(n_query, k)` image URLs of the training samples), and `query_image_urls` names the query
        images. `Server-Timing` gives the milliseconds spent queued, in query gradients (shared by the
        batch) and in index search."""
        images, ids, label_tensor = await _read_images(service, files, examples, labels)
        if await request.is_disconnected():
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        payload, timing = await service.attribute(
            images, ids, label_tensor, k, method, opponents, _prompt(prompt)
        )
        return JSONResponse(payload, headers={"Server-Timing": timing.server_timing()})

    @app.post("/audit", summary="Memorization verdict of images (needs --audit)")
    async def audit(
        request: Request,
        files: Annotated[
            list[UploadFile] | None, File(description="PNG / JPEG images or .npy arrays")
        ] = None,
        examples: Annotated[
            list[str] | None, Form(description="ids from GET /examples, instead of files")
        ] = None,
        k: Annotated[int, Form(description="proponents per method")] = 10,
        labels: Annotated[str | None, Form(description="class labels, comma-separated")] = None,
        prompt: Annotated[str | None, Form(description="one prompt for all the images (text models)")] = None,
    ) -> JSONResponse:
        """One record per image, as `retrac audit` writes them: `verdict` (copy / near / novel),
        `relative_distance` r = d_1 / mean distance to the n nearest distinct training images,
        `nn_distance`, `nearest` training images (with `image_url`) and `proponents` per method with
        `nn_rank`; plus the thresholds and what each figure means."""
        images, ids, label_tensor = await _read_images(service, files, examples, labels)
        if await request.is_disconnected():
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        payload, timing = await service.audit(images, ids, label_tensor, k, _prompt(prompt))
        return JSONResponse(payload, headers={"Server-Timing": timing.server_timing()})

    @app.get(
        "/samples/{sample_id}", summary="A training sample's metadata and the queries it influences most"
    )
    async def sample(sample_id: str) -> dict:
        return await service.sample(sample_id)

    @app.get("/samples/{sample_id}/image.png", summary="A training sample's image", response_class=Response)
    async def sample_image(sample_id: str):
        row = service.sample_row(sample_id)
        return Response(
            png_bytes(service.train.images[row]),
            media_type="image/png",
            headers={"Cache-Control": "max-age=3600"},
        )

    @app.get("/queries/{key}/image.png", summary="An answered query's image", response_class=Response)
    async def query_image(key: str):
        return Response(png_bytes(service.query_image(key)), media_type="image/png")

    return app


def _version() -> str:
    try:
        from retrac import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"


def run_server(
    service: AttributionService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve ``service`` with uvicorn until interrupted (one process, one event loop)."""
    import uvicorn

    uvicorn.run(
        create_app(service),
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=max(64, 4 * service.config.max_pending_images),
        timeout_graceful_shutdown=5,
    )
