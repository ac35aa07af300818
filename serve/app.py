"""The dense-feature HTTP API: a FastAPI app around a model, a micro-batcher and limits.

Routes: ``POST /v1/features``, ``POST /v1/attention``, ``GET /v1/model``, ``/healthz``,
``/readyz``, ``/metrics`` (and FastAPI's ``/docs``, ``/openapi.json``). With an API key every
route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from densedino import __version__
from densedino.models.vit import VisionTransformer
from densedino.serve import codec
from densedino.serve.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from densedino.serve.codec import ApiError, Limits
from densedino.serve.inference import BatchKey, Engine, Job
from densedino.serve.loading import ModelInfo, describe
from densedino.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
ROUTES = frozenset(
    {"/v1/features", "/v1/attention", "/v1/model", "/metrics", "/docs", "/openapi.json"}
    | PUBLIC_PATHS
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RETRY_AFTER_S = 1
_MAX_FORM_FIELDS = 32
_MAX_FORM_FIELD_BYTES = 64 * 1024

CLIENT_CLOSED = 499  # nginx's status for a client that hung up before the answer


@dataclass(frozen=True)
class ServeSettings:
    """Batching, limits, auth and device of one server."""

    max_batch: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 128  # images waiting for the model; more -> 503 with Retry-After
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    device: str = "cpu"
    model_info: ModelInfo = field(default_factory=ModelInfo)

    def __post_init__(self) -> None:
        if self.limits.max_images > self.max_queue:
            raise ValueError(
                f"max_images ({self.limits.max_images}) exceeds max_queue ({self.max_queue}): "
                "such a request could never be queued"
            )


class ErrorBody(BaseModel):
    """Every error answer: a reason (a list of field errors for invalid options)."""

    detail: str | list[dict[str, Any]]


# ------------------------------------------------------------------------------ middlewares
class MetricsMiddleware:
    """Counts every HTTP request by route and status and records its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # Unknown paths and methods share one label, so that scanners cannot grow the
            # label set without bound.
            route = scope["path"] if scope["path"] in ROUTES else "other"
            method = scope["method"] if scope["method"] in METHODS else "other"
            seconds = time.perf_counter() - start
            self.metrics.observe_request(route, method, status, seconds)


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every path but the public ones."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                challenge, reason = 'Bearer realm="densedino"', "missing bearer token"
            elif not hmac.compare_digest(token.strip().encode(), self.key):
                challenge = 'Bearer realm="densedino", error="invalid_token"'
                reason = "invalid API key"
            else:
                challenge = reason = ""
            if reason:
                headers = {"WWW-Authenticate": challenge}
                await JSONResponse({"detail": reason}, 401, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- request bodies
async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``max_bytes``.

    A client that hangs up mid-upload is answered (into the void) and counted as 499, nginx's
    "client closed request", not as a server error.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {declared} bytes; the limit is {max_bytes}")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise ApiError(413, f"request body over {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "the client closed the request mid-upload") from None
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("application/json", "multipart/form-data"):
        raise ApiError(
            415,
            f"content type {media or '(none)'!r}: send multipart/form-data (image files) or "
            "application/json (base64 images)",
        )
    return media


async def read_form(
    request: Request, body: bytes, file_field: str, limits: Limits
) -> tuple[list[bytes], dict[str, str]]:
    """File parts named ``file_field`` and the plain fields (options) of a multipart body."""

    async def replay() -> Message:  # the body was already read (and size-checked)
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=limits.max_images,
            max_fields=_MAX_FORM_FIELDS,
            max_part_size=_MAX_FORM_FIELD_BYTES,
        )
    except HTTPException as exc:  # Starlette's multipart errors
        status = 413 if "too many files" in str(exc.detail).lower() else 400
        raise ApiError(status, f"multipart body: {exc.detail}") from None
    try:
        files: list[bytes] = []
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == file_field:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"'{file_field}' must be a file part, not a text field")
                files.append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(422, f"unexpected file part {name!r} (images go in {file_field!r})")
            elif name in fields:
                raise ApiError(422, f"option {name!r} given more than once")
            else:
                fields[name] = value
        return files, fields
    finally:
        await form.close()


def _too_many(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise ApiError(413, f"{count} images in one request; the limit is {limits.max_images}")


# ------------------------------------------------------------------------------------- OpenAPI
_FILE = {"type": "string", "format": "binary"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed body, image or base64",
        401: "missing or wrong API key",
        413: "too many bytes, pixels or images",
        415: "not a JPEG/PNG/WebP image, or an unsupported request content type",
        422: "invalid options",
        503: "queue full (see Retry-After) or shutting down",
    }.items()
}


def _request_body(
    json_model: type[BaseModel], options: type[BaseModel], file_field: str, many: bool
) -> dict[str, Any]:
    """OpenAPI request body accepting JSON (base64 images) or multipart (image files)."""
    files = {"type": "array", "items": _FILE, "minItems": 1} if many else _FILE
    multipart = {
        "type": "object",
        "properties": {file_field: files, **options.model_json_schema()["properties"]},
        "required": [file_field],
        "additionalProperties": False,
    }
    content = {
        "application/json": {"schema": json_model.model_json_schema()},
        "multipart/form-data": {"schema": multipart},
    }
    return {"requestBody": {"required": True, "content": content}}


# ---------------------------------------------------------------------------------- the server
class Server:
    """What the routes share, kept on ``app.state.server``: the model, its engine and batcher,
    the metrics and the readiness of one app."""

    def __init__(self, model: VisionTransformer, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.limits = settings.limits
        self.engine = Engine(model, settings.device)
        self.metrics = Metrics()
        self.batcher: MicroBatcher[BatchKey, Job, dict[str, Any]] = MicroBatcher(
            self.engine.run,
            max_batch=settings.max_batch,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=self.metrics.observe_batch,
        )
        self.ready = False
        self.reason = "warming up"

    async def warm_up(self) -> None:
        """One pass through the batcher; /readyz answers 503 until it is done."""
        try:
            await self.batcher.call(self.engine.warmup)
        except Exception as exc:  # reported by /readyz; the server keeps answering
            log.exception("warm-up failed")
            self.reason = f"warm-up failed: {exc}"
            return
        self.ready, self.reason = True, ""

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the batcher and the warm-up with the app; stop the batcher with it."""
        self.batcher.start()
        warm = asyncio.create_task(self.warm_up())
        try:
            yield
        finally:
            warm.cancel()
            self.ready, self.reason = False, "shutting down"
            await self.batcher.stop()

    async def infer(self, items: list[tuple[BatchKey, Job]]) -> list[dict[str, Any]]:
        """Run jobs through the batcher; a full queue or a stopped batcher answers 503."""
        try:
            return await self.batcher.run(items)
        except QueueFullError as exc:
            raise ApiError(
                503, f"server busy: {exc}", {"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        except BatcherClosedError as exc:
            raise ApiError(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)}) from None

    def prepare(
        self, blobs: list[bytes], resize: codec.Resize, size: int | None
    ) -> list[codec.PreparedImage]:
        """Decode, check and preprocess uploaded images (runs in a worker thread)."""
        size = size or self.model.img_size
        patch = self.model.patch_size
        return [
            codec.prepare_image(blob, resize, size, patch, self.limits, f"image {i}")
            for i, blob in enumerate(blobs)
        ]


def _server(request: Request) -> Server:
    return request.app.state.server


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.reason}, exc.status, exc.headers)


# --------------------------------------------------------------------------------- ops routes
ops = APIRouter(tags=["ops"])


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@ops.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> JSONResponse:
    """Ready once the model has run its warm-up pass and the batcher is running."""
    server = _server(request)
    if server.ready and server.batcher.running:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"detail": server.reason or "batcher stopped"}, 503)


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics_text(request: Request) -> PlainTextResponse:
    """Prometheus text format: requests, latency and batch-size histograms, queue depth."""
    server = _server(request)
    text = server.metrics.render(server.batcher.queued)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------- model routes
model_routes = APIRouter(tags=["model"])


@model_routes.get("/v1/model", responses={401: _ERRORS[401]})
async def model_route(request: Request) -> dict[str, Any]:
    """Architecture, patch size, method, checkpoint sha256, batching and limits."""
    server = _server(request)
    settings = server.settings
    return {
        **describe(server.model, settings.model_info),
        "device": str(server.engine.device),
        "batching": {
            "max_batch": settings.max_batch,
            "max_delay_ms": settings.max_delay_ms,
            "max_queue": settings.max_queue,
        },
        "limits": asdict(server.limits),
    }


@model_routes.post(
    "/v1/features",
    responses={
        200: {
            "description": "JSON (arrays with shapes), .npy or safetensors; binary bodies "
            "state dtype, shapes, patch size and grid in X-DenseDINO-* headers",
            "content": {
                "application/json": {},
                codec.NPY_MEDIA_TYPE: {},
                codec.SAFETENSORS_MEDIA_TYPE: {},
            },
        },
        **_ERRORS,
    },
    openapi_extra=_request_body(codec.FeaturesJSON, codec.FeatureOptions, "images", True),
)
async def features(request: Request) -> Response:
    """CLS and/or patch features of one or several images."""
    server = _server(request)
    limits = server.limits
    media = _media_type(request)
    body = await read_body(request, limits.max_body_bytes)
    options: codec.FeatureOptions
    if media == "application/json":
        parsed = codec.validate_options(codec.FeaturesJSON, codec.parse_json_body(body))
        _too_many(len(parsed.images), limits)
        blobs = [codec.decode_base64(s, f"images[{i}]") for i, s in enumerate(parsed.images)]
        options = parsed
    else:
        blobs, fields = await read_form(request, body, "images", limits)
        options = codec.validate_options(codec.FeatureOptions, fields)
        if not blobs:
            raise ApiError(422, "no image: send one or more file parts named 'images'")
        _too_many(len(blobs), limits)
    prepared = await run_in_threadpool(server.prepare, blobs, options.resize, options.size)
    sizes = {image.input_hw for image in prepared}
    if options.format != "json" and len(sizes) > 1:
        raise ApiError(
            422,
            f"format {options.format!r} stacks the images, but their inputs differ in size "
            f"({sorted(sizes)}); use resize=fixed or format=json",
        )
    outputs = await server.infer(
        [(BatchKey("features", *image.input_hw), Job(image.pixels)) for image in prepared]
    )

    def encode() -> codec.Encoded:
        arrays = codec.feature_arrays(outputs, options.output, options.normalize)
        return codec.encode_features(prepared, arrays, options, server.model.patch_size)

    encoded = await run_in_threadpool(encode)
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


@model_routes.post(
    "/v1/attention",
    responses={
        200: {"description": "per-head maps as JSON arrays with shapes"},
        **_ERRORS,
    },
    openapi_extra=_request_body(codec.AttentionJSON, codec.AttentionOptions, "image", False),
)
async def attention(request: Request) -> Response:
    """Last-block CLS attention per head; with (x, y) also the reference token's maps.

    The reference token is placed at the point (pixels of the uploaded image); its
    attention over the patches and the cosine similarity of its output to every patch
    feature come back as h x w maps.
    """
    server = _server(request)
    media = _media_type(request)
    body = await read_body(request, server.limits.max_body_bytes)
    options: codec.AttentionOptions
    if media == "application/json":
        parsed = codec.validate_options(codec.AttentionJSON, codec.parse_json_body(body))
        blobs = [codec.decode_base64(parsed.image, "image")]
        options = parsed
    else:
        blobs, fields = await read_form(request, body, "image", server.limits)
        options = codec.validate_options(codec.AttentionOptions, fields)
        if len(blobs) != 1:
            raise ApiError(422, f"send exactly one file part named 'image', got {len(blobs)}")
    (image,) = await run_in_threadpool(server.prepare, blobs, options.resize, options.size)
    point = ref_point = None
    if options.x is not None and options.y is not None:
        point = (options.x, options.y)
        ref_point = codec.normalized_point(options.x, options.y, image.width, image.height)
    key = BatchKey("attention", *image.input_hw, with_point=point is not None)
    (output,) = await server.infer([(key, Job(image.pixels, ref_point))])
    encoded = await run_in_threadpool(
        codec.encode_attention, image, output, server.model.patch_size, point, ref_point
    )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


# ------------------------------------------------------------------------------------- the app
def create_app(model: VisionTransformer, *, settings: ServeSettings | None = None) -> FastAPI:
    """The API around ``model``; batching starts with the app's lifespan (uvicorn runs it)."""
    server = Server(model, settings or ServeSettings())
    app = FastAPI(
        title="densedino",
        version=__version__,
        description="Dense features and attention maps of a DenseDINO / DINO ViT backbone.",
        lifespan=server.lifespan,
    )
    app.state.server = server
    if server.settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server.settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)  # outermost: counts 401s too
    app.add_exception_handler(ApiError, _api_error)
    app.include_router(ops)
    app.include_router(model_routes)
    return app
