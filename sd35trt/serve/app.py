"""The HTTP server: the FastAPI app (error handlers, middleware, probe routes; the generation
routes are :mod:`sd35trt.serve.api`'s), graceful shutdown, and the uvicorn runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd35trt.errors import RequestError, Sd35TrtError
from sd35trt.serve.api import add_generation_routes
from sd35trt.serve.batcher import Batcher
from sd35trt.serve.connections import guarded_protocol
from sd35trt.serve.generator import Generator
from sd35trt.serve.logs import configure_logging, level_number
from sd35trt.serve.metrics import CONTENT_TYPE
from sd35trt.serve.middleware import BodyLimitMiddleware, MetricsMiddleware, RequestIdMiddleware
from sd35trt.serve.responses import ApiError, FieldError, flavor_of, printable, render, validation_errors
from sd35trt.serve.settings import LISTEN_BACKLOG, ServeSettings, check_address, connection_bound
from sd35trt.serve.state import ServerState

log = logging.getLogger("sd35trt.serve")


def _as_generator(source: Any, settings: ServeSettings) -> Generator:
    if isinstance(source, Generator):
        return source
    from sd35trt.serve.runtime_adapter import RuntimeGenerator

    if isinstance(source, str | Path):
        return RuntimeGenerator.load(Path(source), low_vram=settings.low_vram, max_images=settings.max_images)
    return RuntimeGenerator(source)


def create_app(source: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``source``: an engines directory (loaded in the background:
    ``/health`` answers at once, ``/ready`` once loaded and warmed up), a loaded ``Sd35Runtime``, or
    any :class:`~sd35trt.serve.generator.Generator`. Its ``state.sd35`` is its :class:`ServerState`.

    Raises:
        ConfigError: ``settings.max_connections`` is above what the fd limit allows.
    """
    settings = settings or ServeSettings()
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_bring_up(state, source), name="sd35trt-load")
        try:
            yield
        finally:
            state.begin_drain()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if state.batcher is not None:
                # after a second interrupt the requests were answered: don't wait for the engine
                await state.batcher.close(drain_timeout_s=0 if state.aborted else settings.timeout_s)

    app = FastAPI(
        title="sd35trt",
        summary="Stable Diffusion 3.5 on FP8 engines, with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.sd35 = state
    endpoints: set[str] = set()  # filled once the routes exist
    # added last = outermost: request id, then metrics, then the body limit
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, endpoints=endpoints)
    app.add_middleware(RequestIdMiddleware)
    _add_error_handlers(app)
    _add_probe_routes(app, state)
    add_generation_routes(app, state)
    endpoints.update(getattr(route, "path", "") for route in app.routes)
    return app


async def _bring_up(state: ServerState, source: Any) -> None:
    """Load (off the event loop), warm up and start batching; a failure is kept in ``state.load_error``."""
    settings = state.settings
    batcher: Batcher | None = None
    try:
        gen = await asyncio.to_thread(_as_generator, source, settings)
        max_batch = _max_batch(settings, gen)
        batcher = Batcher(
            gen.run_batch,
            max_batch=max_batch,
            window_s=settings.batch_window_ms / 1000,
            queue_size=settings.queue_size,
            on_batch=state.on_batch,
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


def _max_batch(settings: ServeSettings, gen: Generator) -> int:
    """The engine batch (images): ``--max-batch`` (Sd35TrtError above the engines' maximum), else
    the engines' maximum."""
    max_batch = settings.max_batch or gen.max_batch
    if max_batch > gen.max_batch:
        raise Sd35TrtError(
            f"--max-batch {max_batch} exceeds the engines' batch maximum of {gen.max_batch} images"
        )
    return max_batch


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in the shape of the API its path belongs to (native or OpenAI)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return render(err, flavor_of(request.url.path))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        # raised while a body is read (a parameter under two of its names): a 422 naming the field
        return render(ApiError.from_request_error(err), flavor_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which fails for NaN/Infinity and lone surrogates
        return render(ApiError.invalid(validation_errors(err.errors())), flavor_of(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 400 and isinstance(err.__cause__, ValueError):
            # the body could not be parsed: not UTF-8, or an integer too long for Python to read
            reason = printable(f"{type(err.__cause__).__name__}: {err.__cause__}")[:300]
            field = FieldError(("body",), "body", f"body is not valid JSON text: {reason}", "json_invalid")
            return render(ApiError.invalid([field]), flavor_of(request.url.path))
        # 404, 405, ...: the error body every other answer has (FastAPI's is {"detail": ...})
        code = HTTP_CODES.get(err.status_code, "http_error")
        message = f"{request.method} {printable(request.url.path)[:200]}: {err.detail}"
        response = render(ApiError(err.status_code, code, message), flavor_of(request.url.path))
        response.headers.update(err.headers or {})  # Allow on a 405
        return response


#: Stable ``error`` codes of the HTTP errors routing answers.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _add_probe_routes(app: FastAPI, state: ServerState) -> None:
    """``/health``, ``/ready`` and ``/metrics``."""

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

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)


# -- running it ----------------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, but the app refuses new requests (503) as soon as shutdown starts.

    ``SIGTERM``, ``SIGINT`` and ``SIGHUP`` (a closed terminal) start that drain (faults.md #35); a
    second ``SIGINT`` answers every running and queued request 503 at once and stops without
    waiting for the engine; a third is uvicorn's immediate exit.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.sd35 = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT and not self.sd35.aborted and self._loop is not None:
            self._captured_signals.append(sig)
            self.sd35.aborted = True  # a third SIGINT goes to uvicorn's force exit
            self._loop.call_soon_threadsafe(self._abort)
            return
        if not self.should_exit:
            log.info(
                "received %s: finishing running and queued requests, refusing new ones",
                signal.Signals(sig).name,
            )
        super().handle_exit(sig, frame)

    def _abort(self) -> None:
        answered = self.sd35.abort(
            "the server was interrupted twice and stops without finishing this request"
        )
        log.warning(
            "second SIGINT: answered %d running and queued request(s) 503; stopping without waiting "
            "for the engine",
            answered,
        )

    async def shutdown(self, sockets: list | None = None) -> None:
        self.sd35.begin_drain()
        await super().shutdown(sockets)
        self.sd35.guard.flush()


def make_server(
    app: FastAPI, settings: ServeSettings, log_stream: TextIO | None = None, **uvicorn_options: Any
) -> DrainingServer:
    """A uvicorn server for ``app`` (``server.run(sockets=[sock])`` to serve a bound socket), its
    connections through the app's guard, its logs to ``log_stream`` (default stderr)."""
    state: ServerState = app.state.sd35
    configure_logging(settings.log_level, settings.log_format, log_stream)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(state.guard),
        backlog=LISTEN_BACKLOG,
        log_config=None,  # configure_logging's handlers stay
        log_level=level_number(settings.log_level),
        # running requests may take up to the request timeout; then uvicorn cancels them
        timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 5,
        **uvicorn_options,
    )
    return DrainingServer(config, state)


def run_server(engines_dir: str | Path, settings: ServeSettings) -> None:
    """Load and verify the engines (errors surface here, before binding), then serve until stopped."""
    connection_bound(settings.max_connections)  # a bad limit fails before the engines load
    check_address(settings.host, settings.port)  # so does an address in use
    gen = _as_generator(Path(engines_dir), settings)
    _max_batch(settings, gen)
    app = create_app(gen, settings)
    make_server(app, settings).run()
