"""The HTTP server: FastAPI app, body limit, readiness, graceful shutdown, uvicorn runner.

Status codes (faults.md cases 9 to 14):

- 422: a field is invalid (named in ``detail[0].loc``, the allowed range in ``detail[0].msg``);
- 413: the body is larger than ``max_body_bytes``;
- 429 + ``Retry-After``: ``queue_size`` requests are waiting already;
- 503 + ``Retry-After``: not ready yet, shutting down, or the device ran out of memory;
- 504: the request did not finish within ``timeout_s``;
- 500: a stage produced NaN/inf (``stage`` named) or an unexpected error; the server stays ready.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sd35trt.errors import DeviceOutOfMemoryError, NonFiniteError, RequestError, Sd35TrtError
from sd35trt.serve.batcher import (
    Batcher,
    BatchInfo,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from sd35trt.serve.generator import Generator, ImageSet
from sd35trt.serve.settings import ServeSettings

log = logging.getLogger("sd35trt.serve")

#: How often a queued request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


# -- schemas ---------------------------------------------------------------------------------


class GenerateBody(BaseModel):
    """``POST /generate``. Omitted fields take the defaults recorded with the engines.

    Types are strict (``64.0``, ``"64"`` or ``true`` are not a width); ranges are checked against
    the engine manifest, and a 422 names the field and the allowed range.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="text prompt (must not be empty; truncated to the token limit)")
    negative_prompt: str | None = Field(default=None, description="default: the engines' negative prompt")
    width: int | None = Field(default=None, description="pixels, a multiple of 16 inside the engine profile")
    height: int | None = Field(default=None, description="pixels, a multiple of 16 inside the engine profile")
    num_inference_steps: int | None = Field(default=None, description="denoising steps")
    guidance_scale: float | None = Field(default=None, description="classifier-free guidance, >= 0")
    num_images: int = Field(default=1, description="images for this prompt, at most the engine batch")
    seed: int | None = Field(default=None, description="0..2^63-1; drawn at random when omitted")
    skip_layer_guidance: bool | None = Field(
        default=None, description="skip-layer guidance when the engines have it (default: as built)"
    )


class GeneratedImage(BaseModel):
    png_base64: str = Field(
        description="the PNG file, base64; its `parameters` text chunk records the request"
    )
    width: int
    height: int
    seed: int = Field(description="the request's seed (a request's images share one noise draw)")
    index: int = Field(description="position of the image in its request")


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    parameters: dict[str, Any] = Field(description="the parameters actually used, the seed included")
    timings: dict[str, Any] = Field(description="milliseconds: queue, engine batch, encode, total, stages")
    batch: dict[str, Any] = Field(description="the engine batch this request ran in (merging shows here)")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. a prompt truncated to the token limit"
    )


# -- state -----------------------------------------------------------------------------------


class ServerState:
    """What the handlers share: the generator, the batcher, readiness and drain flags."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.generator: Generator | None = None
        self.batcher: Batcher | None = None
        self.is_ready = False
        self.load_error: str | None = None
        self.draining = False
        self.started = time.monotonic()

    def begin_drain(self) -> None:
        """Refuse new requests; those accepted finish (called when uvicorn starts shutting down)."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.begin_drain()

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.load_error is not None:
            return "failed"
        return "ready" if self.is_ready else "loading"


def _error(
    status: int, error: str, detail: str, retry_after: int | None = None, **extra: Any
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status, headers=headers)


def _field_error(err: RequestError) -> JSONResponse:
    """A :class:`RequestError` in FastAPI's own 422 shape, so clients parse one format."""
    return JSONResponse(
        {"detail": [{"loc": ["body", err.field], "msg": str(err), "type": "value_error"}]},
        status_code=422,
    )


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, DeviceOutOfMemoryError | MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a loaded torch can have raised its error
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


def _encode(result: ImageSet) -> list[GeneratedImage]:
    return [
        GeneratedImage(
            png_base64=base64.b64encode(result.png(im, i)).decode("ascii"),
            width=im.width,
            height=im.height,
            seed=result.seed,
            index=i,
        )
        for i, im in enumerate(result.images)
    ]


# -- body limit --------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Answer 413 to bodies over ``max_bytes`` before the app parses them.

    A declared ``Content-Length`` over the limit is refused without reading; otherwise the body is
    read up to the limit (chunked uploads included) and replayed to the app.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send, int(declared))
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        response = _error(
            413,
            "body_too_large",
            f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes",
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


# -- the app -----------------------------------------------------------------------------------


def _as_generator(source: Any, settings: ServeSettings) -> Generator:
    if isinstance(source, Generator):
        return source
    from sd35trt.serve.runtime_adapter import RuntimeGenerator

    if isinstance(source, str | Path):
        return RuntimeGenerator.load(Path(source), low_vram=settings.low_vram)
    return RuntimeGenerator(source)


def create_app(source: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``source``.

    Args:
        source: an engines directory (loaded in the background: ``/health`` answers at once,
            ``/ready`` once loaded and warmed up), a loaded ``Sd35Runtime``, or any
            :class:`~sd35trt.serve.generator.Generator`.
        settings: batching, queue, timeout and body limits.

    The app's ``state.sd35`` is its :class:`ServerState` (tests pause the batcher through it).
    """
    settings = settings or ServeSettings()
    state = ServerState(settings)

    async def bring_up() -> None:
        batcher: Batcher | None = None
        try:
            gen = await asyncio.to_thread(_as_generator, source, settings)
            max_batch = settings.max_batch or gen.max_batch
            if max_batch > gen.max_batch:
                raise Sd35TrtError(
                    f"--max-batch {max_batch} exceeds the engines' batch maximum of {gen.max_batch} images"
                )
            batcher = Batcher(
                gen.run_batch,
                max_batch=max_batch,
                window_s=settings.batch_window_ms / 1000,
                queue_size=settings.queue_size,
            )
            if settings.warmup:  # on the engine thread, where every later batch runs
                t = time.perf_counter()
                await batcher.run_in_engine_thread(gen.warmup)
                log.info("warm-up done in %.2f s", time.perf_counter() - t)
            await batcher.start()
            state.generator, state.batcher = gen, batcher
            if state.draining:
                batcher.begin_drain()
            state.is_ready = True
            log.info("ready: engine batch of %d images, queue of %d", max_batch, settings.queue_size)
        except Exception as err:
            state.load_error = f"{type(err).__name__}: {err}"
            log.error("could not bring the engines up: %s", state.load_error)
            if not isinstance(err, Sd35TrtError):
                log.exception("unexpected error while loading")
            if batcher is not None and state.batcher is None:
                await batcher.close()  # frees its engine thread

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(bring_up(), name="sd35trt-load")
        try:
            yield
        finally:
            state.begin_drain()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if state.batcher is not None:
                await state.batcher.close(drain_timeout_s=settings.timeout_s)

    app = FastAPI(
        title="sd35trt",
        summary="Stable Diffusion 3.5 on FP8 engines, with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.sd35 = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.get("/health", summary="Alive (answers while loading and draining too)")
    async def health() -> dict:
        return {
            "status": "alive",
            "state": state.status,
            "uptime_s": round(time.monotonic() - state.started, 1),
        }

    @app.get("/ready", summary="Engines loaded and warmed up, accepting requests", responses={503: {}})
    async def ready():
        body: dict[str, Any] = {"status": state.status}
        if state.load_error:
            body["error"] = state.load_error
        if state.batcher is not None:
            body["queue"] = state.batcher.stats().to_json()
        if state.generator is not None:
            body["limits"] = state.generator.limits()
        if state.status != "ready":
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return body

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        summary="Generate images (requests with equal size, steps and guidance share engine batches)",
        responses={
            413: {"description": "body too large"},
            422: {"description": "invalid field (named, with the allowed range)"},
            429: {"description": "queue full (Retry-After)"},
            500: {"description": "a stage produced NaN/inf (stage named)"},
            503: {"description": "not ready, shutting down, or out of device memory (Retry-After)"},
            504: {"description": "timed out"},
        },
    )
    async def generate(body: GenerateBody, request: Request):
        t0 = time.perf_counter()
        if state.draining:
            return _error(503, "shutting_down", "the server is shutting down", retry_after=5)
        if not state.is_ready or state.batcher is None or state.generator is None:
            if state.load_error:
                return _error(503, "not_ready", f"the engines failed to load: {state.load_error}")
            return _error(503, "not_ready", "the engines are still loading", retry_after=2)
        try:
            prepared = state.generator.prepare(body.model_dump())
        except RequestError as err:
            return _field_error(err)
        batcher = state.batcher
        try:
            job = batcher.submit(
                prepared, prepared.key, prepared.size, prepared.capacity, prepared.max_requests
            )
        except QueueFullError as err:
            return _error(429, "queue_full", str(err), retry_after=err.retry_after_s)
        except ShuttingDownError as err:
            return _error(503, "shutting_down", str(err), retry_after=5)
        try:
            waiter = asyncio.ensure_future(batcher.wait(job, settings.timeout_s))
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if not waiter.done() and job.started is None and await request.is_disconnected():
                    # the client gave up: free its queue slot instead of computing for nobody
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
                    log.info("client disconnected; dropped its queued request")
                    return Response(status_code=499)
            result, info = waiter.result()
        except RequestTimeoutError as err:
            return _error(504, "timeout", str(err))
        except RequestError as err:
            return _field_error(err)
        except NonFiniteError as err:
            log.warning("request failed: stage %s produced non-finite values: %s", err.stage, err)
            return _error(500, "non_finite", str(err), stage=err.stage)
        except ShuttingDownError as err:
            return _error(503, "shutting_down", str(err), retry_after=5)
        except Exception as err:
            if _is_oom(err):
                log.warning("request failed: out of memory: %s", err)
                return _error(
                    503, "out_of_memory", f"out of memory: {err}", retry_after=batcher.retry_after_s()
                )
            if isinstance(err, Sd35TrtError):
                return _error(500, "generation_failed", str(err))
            log.error("request failed with an unexpected error", exc_info=err)
            return _error(500, "internal", f"internal error: {type(err).__name__}: {err}")
        t_enc = time.perf_counter()
        images = await asyncio.to_thread(_encode, result)
        now = time.perf_counter()
        return GenerateResponse(
            images=images,
            parameters=dict(prepared.params),
            timings=_timings(info, result, encode_s=now - t_enc, total_s=now - t0),
            batch=info.to_json(),
            warnings=list(result.warnings),
        )

    return app


def _timings(info: BatchInfo, result: ImageSet, encode_s: float, total_s: float) -> dict:
    ms = lambda s: round(s * 1000, 2)  # noqa: E731
    return {
        "queue_ms": ms(info.queue_s),
        "batch_ms": ms(info.run_s),
        "encode_ms": ms(encode_s),
        "total_ms": ms(total_s),
        "stages_ms": {
            k: ms(v) for k, v in result.timings.items() if isinstance(v, int | float) and math.isfinite(v)
        },
    }


# -- running it ----------------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, but the app refuses new requests as soon as shutdown starts.

    uvicorn closes its listening sockets (new connections are refused) and waits for running
    requests; requests arriving meanwhile on kept-alive connections get 503 from the app.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.sd35 = state

    async def shutdown(self, sockets: list | None = None) -> None:
        self.sd35.begin_drain()
        await super().shutdown(sockets)


def make_server(app: FastAPI, settings: ServeSettings, **uvicorn_options: Any) -> DrainingServer:
    """A uvicorn server for ``app`` (``server.run(sockets=[sock])`` to serve a bound socket)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # running requests may take up to the request timeout; then uvicorn cancels them
        timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 5,
        **uvicorn_options,
    )
    return DrainingServer(config, app.state.sd35)


def run_server(engines_dir: str | Path, settings: ServeSettings) -> None:
    """Load and verify the engines (errors surface here, before binding), then serve until stopped."""
    from sd35trt.serve.runtime_adapter import RuntimeGenerator

    gen = RuntimeGenerator.load(Path(engines_dir), low_vram=settings.low_vram)
    if settings.max_batch is not None and settings.max_batch > gen.max_batch:
        raise Sd35TrtError(
            f"--max-batch {settings.max_batch} exceeds the engines' batch maximum of {gen.max_batch}"
        )
    app = create_app(gen, settings)
    server = make_server(app, settings)
    # sd35trt's server messages (warm-up, failed requests) go where uvicorn's own go
    log.setLevel(settings.log_level.upper())
    for handler in logging.getLogger("uvicorn").handlers:
        log.addHandler(handler)
    log.propagate = False
    server.run()
