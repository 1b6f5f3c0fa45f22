"""Dynamic batching: a bounded queue and one worker that runs engine batches in a thread.

The worker takes the oldest request, then, for up to the batching window, gathers later requests
with the same batch key (size, steps, guidance) while their images fit the engine batch; the others
keep their place, so the oldest request is always the next to run. Batches run in a single-thread
executor (engines are not re-entrant). Nothing here knows about HTTP or engines.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sd35trt.serve.generator import run_alone_on_failure
from sd35trt.serve.logs import REQUEST_ID

log = logging.getLogger("sd35trt.serve")

#: ``run_batch(requests) -> [result or exception per request]``; it may also raise for the whole batch.
RunBatch = Callable[[Sequence[Any]], Sequence[Any]]
#: ``on_batch(requests, images, results)`` after each engine batch; ``results`` is ``None`` when
#: the batch raised as a whole. Called on the engine thread.
OnBatch = Callable[[int, int, Sequence[Any] | None], None]


class QueueFullError(Exception):
    """The queue holds ``queue_size`` requests already (HTTP 429)."""

    def __init__(self, queue_size: int, retry_after_s: int) -> None:
        super().__init__(f"the queue is full ({queue_size} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(Exception):
    """The server is draining: requests already accepted finish, new ones are refused (HTTP 503)."""


class RequestTimeoutError(Exception):
    """A request did not finish within its timeout (HTTP 504)."""


@dataclass(frozen=True)
class BatchInfo:
    """How a request was run: which batch, merged with how many others."""

    id: int
    requests: int  # requests merged into this engine batch
    images: int  # images in this engine batch
    queue_s: float  # this request's wait before its batch started
    run_s: float  # the batch's engine time
    retried_alone: bool = False  # the merged batch failed, this request was re-run on its own

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "requests": self.requests,
            "images": self.images,
            "queue_ms": round(self.queue_s * 1000, 2),
            "run_ms": round(self.run_s * 1000, 2),
            "retried_alone": self.retried_alone,
        }


@dataclass
class Job:
    request: Any
    key: Hashable
    size: int  # images this request asks for
    capacity: int  # most images an engine batch with this key holds
    max_requests: int  # most requests an engine batch with this key holds
    future: asyncio.Future
    tag: str | None = None  # names the request in log lines (its request id)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None


@dataclass
class BatcherStats:
    queued: int
    running: int
    batches: int
    requests_done: int
    rejected: int
    timed_out: int
    max_batch: int
    queue_size: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Batcher:
    """Bounded request queue plus one batching worker, used from the event loop that called
    :meth:`start`: ``job = batcher.submit(...)``, then ``result, info = await batcher.wait(job, t)``."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        window_s: float,
        queue_size: int,
        on_batch: OnBatch | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or window_s < 0:
            raise ValueError(
                f"bad batcher limits: max_batch={max_batch} queue_size={queue_size} window_s={window_s}"
            )
        self.run_batch = run_batch
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue_size = queue_size
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sd35trt-engine")
        self._pending: collections.deque[Job] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._resumed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self._running: list[Job] = []
        self._draining = False
        self._batch_ids = 0
        self._done = 0
        self._rejected = 0
        self._timed_out = 0
        self._avg_image_s: float | None = None  # running mean of engine seconds per image
        self._paused_flag = threading.Event()  # readable from other threads (tests)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._resumed = asyncio.Event()
        if not self._paused_flag.is_set():
            self._resumed.set()
        self._worker = asyncio.create_task(self._work(), name="sd35trt-batcher")

    async def run_in_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the thread that runs the batches (e.g. a warm-up before :meth:`start`)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; queued and running ones still complete."""
        self._draining = True

    def abort(self, reason: str) -> int:
        """Stop accepting, and fail every queued and running request now with
        :class:`ShuttingDownError` (``reason``); returns how many requests (the engine-batch parts
        of one request, which share its ``tag``, count once). A running engine batch finishes
        unheard."""
        self._draining = True
        jobs = [*self._running, *self._pending]
        self._pending.clear()
        failed: set[object] = set()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError(reason))
                failed.add(job.tag if job.tag is not None else id(job))
        if self._arrived is not None:
            self._arrived.set()
        return len(failed)

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, let queued and running requests finish, stop the worker."""
        self._draining = True
        if self._arrived is not None:
            self._arrived.set()
        if self._resumed is not None and not self._resumed.is_set():
            log.warning(
                "batcher closed while paused: resuming to drain %d queued requests", len(self._pending)
            )
            self._resumed.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), drain_timeout_s)
            except TimeoutError:
                self._worker.cancel()
                for job in self._pending:
                    if not job.future.done():
                        job.future.set_exception(
                            ShuttingDownError("the server shut down before this request ran")
                        )
                self._pending.clear()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
        self._executor.shutdown(wait=False)

    # -- test and operations hooks (thread-safe) ---------------------------------------------

    def pause(self) -> None:
        """Hold the worker before its next batch (requests keep queueing). Thread-safe: from another
        thread it returns once the worker's loop has applied it."""
        self._paused_flag.set()
        self._in_loop(lambda: self._resumed.clear())

    def resume(self) -> None:
        """Let the worker run again. Thread-safe."""
        self._paused_flag.clear()
        self._in_loop(lambda: self._resumed.set())

    def _in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or self._resumed is None or loop.is_closed():
            return  # not started (start() reads the flag) or already stopped
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            fn()
            return
        done = threading.Event()

        def apply() -> None:
            fn()
            done.set()

        loop.call_soon_threadsafe(apply)
        if not done.wait(10):
            raise TimeoutError("the batcher's event loop did not respond within 10 s")

    def stats(self) -> BatcherStats:
        return BatcherStats(
            queued=len(self._pending),
            running=len(self._running),
            batches=self._batch_ids,
            requests_done=self._done,
            rejected=self._rejected,
            timed_out=self._timed_out,
            max_batch=self.max_batch,
            queue_size=self.queue_size,
        )

    # -- submitting --------------------------------------------------------------------------

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free, at the measured engine pace."""
        # a slot frees when the worker takes its next batch: about one engine batch from now
        per_image = self._avg_image_s if self._avg_image_s is not None else 1.0
        return max(1, math.ceil(per_image * self.max_batch))

    def submit(
        self,
        request: Any,
        key: Hashable,
        size: int,
        capacity: int | None = None,
        max_requests: int | None = None,
        tag: str | None = None,
        admitted: bool = False,
    ) -> Job:
        """Queue a request (from the event loop) for ``run_batch``.

        Args:
            key: requests with equal keys may share an engine batch.
            size: images the request produces.
            capacity: most images an engine batch of this key holds; capped at ``max_batch``.
            max_requests: most requests an engine batch of this key holds (default: ``capacity``).
            tag: names the request in the log lines of its batch (a request id).
            admitted: a later part of a request of more images than one engine batch holds, whose
                first part was queued: not refused for a full queue.

        Raises:
            ShuttingDownError: the batcher is draining.
            QueueFullError: ``queue_size`` requests are waiting already.
            ValueError: ``size`` exceeds the engine batch (validation should have refused it).
        """
        if self._worker is None or self._loop is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._draining:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        capacity = min(self.max_batch, capacity or self.max_batch)
        if not 1 <= size <= capacity:
            raise ValueError(f"a request of {size} images cannot fit an engine batch of {capacity}")
        if not admitted and len(self._pending) >= self.queue_size:
            self._rejected += 1
            raise QueueFullError(self.queue_size, self.retry_after_s())
        job = Job(
            request=request,
            key=key,
            size=size,
            capacity=capacity,
            max_requests=max_requests or capacity,
            future=self._loop.create_future(),
            tag=tag,
        )
        self._pending.append(job)
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it is still queued; a running batch's result for it is dropped."""
        with contextlib.suppress(ValueError):
            self._pending.remove(job)
        if not job.future.done():
            job.future.cancel()

    async def wait(self, job: Job, timeout_s: float | None) -> tuple[Any, BatchInfo]:
        """The result of ``job`` and how it ran; raises RequestTimeoutError when not done within
        ``timeout_s`` (then dropped), or whatever ``run_batch`` gave or raised for this request."""
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError:
            self._timed_out += 1
            state = "running" if job.started is not None else "queued"
            self.cancel(job)
            raise RequestTimeoutError(
                f"the request did not finish within {timeout_s:g} s (it was {state})"
            ) from None
        except asyncio.CancelledError:
            self.cancel(job)  # the client went away (or the server is cancelling tasks)
            raise

    # -- the worker --------------------------------------------------------------------------

    def _take_compatible(self, batch: list[Job], total: int) -> int:
        """Move queued jobs with the head's key that still fit into ``batch``; returns the image count."""
        head = batch[0]
        for job in list(self._pending):
            if total >= head.capacity or len(batch) >= head.max_requests:
                break
            if job.future.done():  # timed out or cancelled while queued
                self._pending.remove(job)
                continue
            if job.key == head.key and total + job.size <= head.capacity:
                self._pending.remove(job)
                batch.append(job)
                total += job.size
        return total

    async def _next_head(self) -> Job | None:
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if self._pending:
                return self._pending.popleft()
            if self._draining:
                return None
            self._arrived.clear()
            await self._arrived.wait()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._resumed.wait()
            head = await self._next_head()
            if head is None:
                return
            if not self._resumed.is_set():  # paused while we waited for work: put it back
                self._pending.appendleft(head)
                continue
            batch = [head]
            total = self._take_compatible(batch, head.size)
            deadline = loop.time() + self.window_s
            while total < head.capacity and len(batch) < head.max_requests and not self._draining:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                total = self._take_compatible(batch, total)
            batch = [j for j in batch if not j.future.done()]
            if not batch:
                continue
            try:
                await self._run(batch)
            except Exception:  # a bug here must not stop the worker: the batch failed, go on
                log.exception("the batcher failed on batch %d; its requests got the error", self._batch_ids)

    async def _run(self, batch: list[Job]) -> None:
        # the worker's own lines about this batch name its requests (the worker task's context only)
        token = REQUEST_ID.set(",".join(j.tag for j in batch if j.tag) or None)
        self._batch_ids += 1
        batch_id = self._batch_ids
        started = time.monotonic()
        for job in batch:
            job.started = started
        self._running = batch
        images = sum(j.size for j in batch)
        try:
            results, retried = await self._engine(batch, batch_id)
            run_s = time.monotonic() - started
            if not retried:
                per_image = run_s / max(images, 1)
                self._avg_image_s = (
                    per_image if self._avg_image_s is None else 0.8 * self._avg_image_s + 0.2 * per_image
                )
            for job, result in zip(batch, results, strict=True):
                self._done += 1
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    info = BatchInfo(
                        id=batch_id,
                        requests=1 if retried else len(batch),
                        images=job.size if retried else images,
                        queue_s=started - job.enqueued,
                        run_s=run_s,
                        retried_alone=retried,
                    )
                    job.future.set_result((result, info))
        except BaseException as err:  # a bug in the batcher itself or cancellation: fail the batch
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(
                        err if isinstance(err, Exception) else ShuttingDownError(str(err))
                    )
            raise
        finally:
            self._running = []
            REQUEST_ID.reset(token)

    async def _engine(self, jobs: list[Job], batch_id: int) -> tuple[list[Any], bool]:
        """Run ``jobs`` as one engine batch on the engine thread (each alone if it fails as a
        whole: :func:`~sd35trt.serve.generator.run_alone_on_failure`), logging under their tags."""
        context = contextvars.copy_context()  # the engine thread logs under _run's request ids

        def failed(err: BaseException) -> None:
            log.warning(
                "batch %d of %d requests failed (%s: %s); re-running each alone",
                batch_id,
                len(jobs),
                type(err).__name__,
                err,
            )

        def run() -> tuple[list[Any], bool]:
            # a request whose client left meanwhile is not re-run
            return run_alone_on_failure(self._call, jobs, skip=lambda j: j.future.done(), on_failure=failed)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, run)

    def _call(self, jobs: list[Job]) -> Sequence[Any]:
        requests, images = [j.request for j in jobs], sum(j.size for j in jobs)
        token = REQUEST_ID.set(",".join(j.tag for j in jobs if j.tag) or None)  # a re-run: its own tag
        try:
            results = self.run_batch(requests)
        except Exception:
            self._observe(len(jobs), images, None)
            raise
        finally:
            REQUEST_ID.reset(token)
        if len(results) != len(requests):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(requests)} requests")
        self._observe(len(jobs), images, results)
        return results

    def _observe(self, requests: int, images: int, results: Sequence[Any] | None) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(requests, images, results)
        except Exception:  # metrics must never fail a batch
            log.exception("the batch observer failed")
