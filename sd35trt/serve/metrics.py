"""Prometheus metrics of one server (``GET /metrics``, the Prometheus text format).

Each app has its own registry, so several servers in one process (tests) keep separate counts.
Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` histograms, base units);
each metric's help text says what it counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

#: Seconds, from a millisecond stage on a large GPU to minutes queued behind a flood.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)
COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: Engine stage timings observed per batch (the keys of ``ImageSet.timings``).
STAGES = ("text_encoding", "denoise", "decode", "engine_total")
#: HTTP statuses counted as rejections, and the reason label they get.
REJECTED = {429: "queue_full", 413: "body_too_large", 422: "invalid", 408: "read_timeout"}

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The metrics of one server, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        counter, gauge = functools.partial(Counter, registry=r), functools.partial(Gauge, registry=r)
        seconds = functools.partial(Histogram, buckets=SECONDS_BUCKETS, registry=r)
        counts = functools.partial(Histogram, buckets=COUNT_BUCKETS, registry=r)
        self.requests = counter(
            "sd35trt_http_requests",
            "HTTP requests answered, by endpoint (route path) and status code",
            ["endpoint", "method", "status"],
        )
        self.request_seconds = seconds(
            "sd35trt_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ["endpoint"],
        )
        self.rejected = counter(
            "sd35trt_requests_rejected",
            "Requests refused: queue_full (429), body_too_large (413), invalid (422), read_timeout (408)",
            ["reason"],
        )
        self.queue_depth = gauge("sd35trt_queue_depth", "Requests waiting for an engine batch")
        self.running = gauge("sd35trt_requests_running", "Requests in the running engine batch")
        self.ready = gauge("sd35trt_ready", "1 when the engines are loaded and requests are accepted")
        self.batch_images = counts("sd35trt_engine_batch_images", "Images per engine batch")
        self.batch_requests = counts("sd35trt_engine_batch_requests", "Requests merged into one engine batch")
        self.stage_seconds = seconds(
            "sd35trt_stage_duration_seconds", "Engine stage time per engine batch", ["stage"]
        )
        self.queue_wait = seconds(
            "sd35trt_queue_wait_seconds", "Time a request waited before its engine batch started"
        )
        self.png_encode = seconds("sd35trt_png_encode_seconds", "Time to encode a request's images as PNG")
        self.images = counter("sd35trt_images_generated", "Images returned to clients")
        self.connections_open = gauge("sd35trt_connections_open", "Client connections held open")
        self.connections_closed = counter(
            "sd35trt_connections_closed",
            "Connections the server closed to protect itself: read_timeout (no complete request in "
            "time), evicted (room for a new one), refused (the limit was reached)",
            ["reason"],
        )
        for stage in STAGES:  # so every series exists (at 0) from the first scrape
            self.stage_seconds.labels(stage)
        for reason in REJECTED.values():
            self.rejected.labels(reason)
        for reason in ("read_timeout", "evicted", "refused"):
            self.connections_closed.labels(reason)

    def watch(
        self,
        queued: Callable[[], float],
        running: Callable[[], float],
        ready: Callable[[], float],
        connections: Callable[[], float],
    ) -> None:
        """Read these gauges from the server's state at each scrape."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)
        self.ready.set_function(ready)
        self.connections_open.set_function(connections)

    def observe_response(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)
        reason = REJECTED.get(status)
        if reason is not None:
            self.rejected.labels(reason).inc()

    def observe_batch(self, requests: int, images: int, stage_seconds: dict[str, float] | None) -> None:
        """One engine batch ran (``stage_seconds`` is ``None`` when it failed)."""
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)
        for stage, seconds in (stage_seconds or {}).items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(seconds)

    def observe_request(self, images: int, queue_s: float, encode_s: float) -> None:
        """One generation request succeeded."""
        self.images.inc(images)
        self.queue_wait.observe(queue_s)
        self.png_encode.observe(encode_s)

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (``CONTENT_TYPE`` is its media type)."""
        return generate_latest(self.registry)


def stage_timings(results: Sequence[object]) -> dict[str, float] | None:
    """The stage timings of an engine batch from its per-request results (shared by all)."""
    for res in results:
        timings = getattr(res, "timings", None)
        if isinstance(timings, dict):
            return {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
    return None
