"""What the handlers of one server share: generator, batcher, readiness, metrics, connection guard."""

from __future__ import annotations

import asyncio
import time

from sd35trt.serve.batcher import Batcher
from sd35trt.serve.connections import ConnectionGuard
from sd35trt.serve.generator import Generator
from sd35trt.serve.metrics import ServeMetrics, stage_timings
from sd35trt.serve.settings import ServeSettings, connection_bound

#: Input images decoded at once (each on a worker thread, at most ``MAX_IMAGE_PIXELS`` pixels).
DECODE_SLOTS = 2


class ServerState:
    """The state of one server (ConfigError when ``settings.max_connections`` is above what the fd
    limit allows)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.generator: Generator | None = None
        self.batcher: Batcher | None = None
        self.is_ready = False
        self.load_error: str | None = None
        self.draining = False
        self.aborted = False  # a second interrupt: stop without waiting for the engine
        self.decode_slots = asyncio.Semaphore(DECODE_SLOTS)  # input images decoded at once
        self.decoding = 0  # requests decoding an input image, or waiting to
        self.started = time.monotonic()
        self.metrics = ServeMetrics()
        self.guard = ConnectionGuard(
            connection_bound(settings.max_connections),
            settings.read_timeout_s,
            on_close=self.metrics.connection_closed,
        )
        self.metrics.watch(
            queued=lambda: self.batcher.stats().queued if self.batcher else 0,
            running=lambda: self.batcher.stats().running if self.batcher else 0,
            ready=lambda: 1 if self.status == "ready" else 0,
            connections=lambda: self.guard.open_count,
        )

    def on_batch(self, requests: int, images: int, results: object) -> None:
        """The batcher's observer: engine batch sizes and stage timings into the metrics."""
        self.metrics.observe_batch(requests, images, stage_timings(results) if results is not None else None)

    def begin_drain(self) -> None:
        """Refuse new requests; those accepted finish (called when uvicorn starts shutting down)."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.begin_drain()

    def abort(self, reason: str) -> int:
        """Refuse new requests and answer queued and running ones 503 now (a second interrupt);
        returns how many were answered so."""
        self.draining = True
        self.aborted = True
        return self.batcher.abort(reason) if self.batcher is not None else 0

    def engines_lost(self, message: str) -> None:
        """The engine files are gone or changed under the running server (``low_vram`` loads them
        at each stage): not ready any more, every request 503 naming the file, until restarted."""
        if self.load_error is None:
            self.load_error = message
            self.is_ready = False

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.load_error is not None:
            return "failed"
        return "ready" if self.is_ready else "loading"
