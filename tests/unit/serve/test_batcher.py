"""Queue logic of the serving batcher, with a FAKE run_batch (no engines, no HTTP).

These check merging, ordering, the queue bound, isolation of failures, timeouts and draining.
The server's behaviour with the real tiny engines is tested in tests/e2e/test_serve.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from sd35trt.serve.batcher import Batcher, QueueFullError, RequestTimeoutError, ShuttingDownError


class FakeRunBatch:
    """Records the batches it is given; returns ``"<name>-done"`` per request.

    ``bad`` names make a merged batch raise as a whole, and fail on their own too.
    """

    def __init__(self, delay_s: float = 0.0, bad: frozenset[str] = frozenset()) -> None:
        self.delay_s = delay_s
        self.bad = bad
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def __call__(self, requests):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(requests))
        if self.delay_s:
            time.sleep(self.delay_s)
        if any(r in self.bad for r in requests):
            raise FloatingPointError(f"NaN in a batch holding {sorted(set(requests) & self.bad)}")
        return [f"{r}-done" for r in requests]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _started(fake, **kw) -> Batcher:
    opts = {"max_batch": 2, "window_s": 0.05, "queue_size": 8} | kw
    b = Batcher(fake, **opts)
    await b.start()
    return b


def test_fake_merges_compatible_requests_up_to_the_engine_batch():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=2)
        jobs = [b.submit(n, key="64x64/2/4.5", size=1) for n in ("a", "b", "c")]
        out = await asyncio.gather(*(b.wait(j, 5) for j in jobs))
        await b.close()
        return fake, out

    fake, out = run(main())
    assert fake.batches == [["a", "b"], ["c"]]
    assert [r for r, _ in out] == ["a-done", "b-done", "c-done"]
    infos = [i for _, i in out]
    assert (infos[0].requests, infos[0].images) == (2, 2)
    assert infos[0].id == infos[1].id != infos[2].id
    assert infos[2].requests == 1


def test_fake_incompatible_requests_wait_their_turn_and_the_oldest_goes_first():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=4)
        b.pause()
        await asyncio.sleep(0.01)
        jobs = [
            b.submit("a", key="k1", size=1),
            b.submit("b", key="k2", size=1),
            b.submit("c", key="k1", size=2),
            b.submit("d", key="k2", size=1),
            b.submit("e", key="k1", size=2),  # does not fit beside a + c
        ]
        b.resume()
        await asyncio.gather(*(b.wait(j, 5) for j in jobs))
        await b.close()
        return fake

    assert run(main()).batches == [["a", "c"], ["b", "d"], ["e"]]


def test_fake_window_gathers_late_arrivals_and_zero_window_does_not():
    async def main(window_s):
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=2, window_s=window_s)
        first = b.submit("a", key="k", size=1)
        await asyncio.sleep(0.02)  # the worker has taken "a" and waits (or not) for company
        second = b.submit("b", key="k", size=1)
        await asyncio.gather(b.wait(first, 5), b.wait(second, 5))
        await b.close()
        return fake.batches

    assert run(main(0.5)) == [["a", "b"]]
    assert run(main(0.0)) == [["a"], ["b"]]


def test_fake_queue_bound_rejects_exactly_the_excess_and_the_rest_complete():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=2, queue_size=3)
        b.pause()
        await asyncio.sleep(0.01)
        accepted, rejected = [], []
        for i in range(5):
            try:
                accepted.append(b.submit(f"r{i}", key="k", size=1))
            except QueueFullError as err:
                rejected.append(err)
        assert b.stats().queued == 3
        b.resume()
        out = await asyncio.gather(*(b.wait(j, 5) for j in accepted))
        stats = b.stats()
        await b.close()
        return accepted, rejected, out, stats

    accepted, rejected, out, stats = run(main())
    assert len(accepted) == 3 and len(rejected) == 2
    assert all(e.retry_after_s >= 1 and "(3 requests waiting)" in str(e) for e in rejected)
    assert [r for r, _ in out] == ["r0-done", "r1-done", "r2-done"]
    assert stats.rejected == 2 and stats.requests_done == 3


def test_fake_later_parts_of_an_admitted_request_pass_a_full_queue_and_cancel_frees_them():
    """A request of more images than one engine batch is queued as parts; the queue bound counts
    the request once (its first part), and a request given up cancels its queued parts."""

    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=2, queue_size=1)
        b.pause()
        await asyncio.sleep(0.01)
        first = b.submit("p0", key="k", size=2)
        rest = [b.submit(f"p{i}", key="k", size=2, admitted=True) for i in (1, 2)]
        with pytest.raises(QueueFullError):
            b.submit("other", key="k", size=1)
        dropped = b.submit("p3", key="k", size=1, admitted=True)
        b.cancel(dropped)
        queued = b.stats().queued
        b.resume()
        out = await asyncio.gather(*(b.wait(j, 5) for j in (first, *rest)))
        await b.close()
        return queued, out, fake.batches

    queued, out, batches = run(main())
    assert queued == 3 and [r for r, _ in out] == ["p0-done", "p1-done", "p2-done"]
    assert batches == [["p0"], ["p1"], ["p2"]]  # each part fills an engine batch


def test_image_sets_of_parts_join_in_order_with_each_png_from_its_part():
    from sd35trt.serve.generator import ImageSet

    parts = [
        ImageSet(images=["a", "b"], seeds=[5, 6], timings={"denoise": 1.0}, warnings=["w"],
                 png=lambda im, i: f"part0:{im}:{i}".encode()),
        ImageSet(images=["c"], seeds=[7], timings={"denoise": 0.5}, warnings=["w", "x"],
                 png=lambda im, i: f"part1:{im}:{i}".encode()),
    ]  # fmt: skip
    joined = ImageSet.joined(parts)
    assert joined.images == ["a", "b", "c"] and joined.seeds == [5, 6, 7]
    assert joined.timings == {"denoise": 1.5} and joined.warnings == ["w", "x"]
    assert [joined.png(im, i) for i, im in enumerate(joined.images)] == [
        b"part0:a:0",
        b"part0:b:1",
        b"part1:c:0",
    ]


def test_fake_a_failing_request_in_a_merged_batch_fails_alone():
    async def main():
        fake = FakeRunBatch(bad=frozenset({"poison"}))
        b = await _started(fake, max_batch=2)
        b.pause()
        await asyncio.sleep(0.01)
        good = b.submit("good", key="k", size=1)
        bad = b.submit("poison", key="k", size=1)
        b.resume()
        res = await asyncio.gather(b.wait(good, 5), b.wait(bad, 5), return_exceptions=True)
        # the worker is still serving afterwards
        later = await b.wait(b.submit("later", key="k", size=1), 5)
        await b.close()
        return fake, res, later

    fake, (good, bad), later = run(main())
    assert fake.batches[0] == ["good", "poison"]  # merged first
    assert ["good"] in fake.batches and ["poison"] in fake.batches  # then each alone
    assert good[0] == "good-done" and good[1].retried_alone and good[1].requests == 1
    assert isinstance(bad, FloatingPointError)
    assert later[0] == "later-done"


def test_fake_timeout_while_queued_drops_the_request_and_while_running_reports_it():
    async def main():
        fake = FakeRunBatch(delay_s=0.4)
        b = await _started(fake, max_batch=1, window_s=0)
        running = b.submit("slow", key="k", size=1)
        await asyncio.sleep(0.05)
        queued = b.submit("queued", key="k", size=1)
        with pytest.raises(RequestTimeoutError, match="queued"):
            await b.wait(queued, 0.1)
        with pytest.raises(RequestTimeoutError, match="running"):
            await b.wait(running, 0.1)
        await asyncio.sleep(0.5)
        stats = b.stats()
        await b.close()
        return fake, stats

    fake, stats = run(main())
    assert fake.batches == [["slow"]]  # the timed-out queued request never ran
    assert stats.timed_out == 2 and stats.queued == 0


def test_fake_drain_refuses_new_requests_and_finishes_accepted_ones():
    async def main():
        fake = FakeRunBatch(delay_s=0.1)
        b = await _started(fake, max_batch=1, window_s=0)
        jobs = [b.submit(n, key="k", size=1) for n in ("a", "b", "c")]
        b.begin_drain()
        with pytest.raises(ShuttingDownError):
            b.submit("late", key="k", size=1)
        waits = asyncio.gather(*(b.wait(j, 5) for j in jobs))
        await b.close(drain_timeout_s=5)
        return fake, await waits

    fake, out = run(main())
    assert fake.batches == [["a"], ["b"], ["c"]]
    assert [r for r, _ in out] == ["a-done", "b-done", "c-done"]


def test_fake_engine_runs_off_the_event_loop_thread():
    async def main():
        fake = FakeRunBatch(delay_s=0.3)
        b = await _started(fake, max_batch=1, window_s=0)
        job = b.submit("a", key="k", size=1)
        ticks = 0
        while not job.future.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await b.close()
        return fake, ticks

    fake, ticks = run(main())
    assert ticks >= 10  # the loop kept turning while the batch ran
    assert fake.threads and all(t.startswith("sd35trt-engine") for t in fake.threads)


def test_fake_oversized_request_is_refused_at_submit():
    async def main():
        b = await _started(FakeRunBatch(), max_batch=2)
        with pytest.raises(ValueError, match="cannot fit"):
            b.submit("big", key="k", size=3)
        await b.close()

    run(main())


def test_fake_capacity_per_key_caps_the_merge():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=4)
        b.pause()
        await asyncio.sleep(0.01)
        jobs = [b.submit(n, key="cfg", size=1, capacity=2) for n in ("a", "b", "c")]
        jobs += [b.submit(n, key="nocfg", size=1, capacity=8) for n in ("d", "e", "f", "g", "h")]
        b.resume()
        await asyncio.gather(*(b.wait(j, 5) for j in jobs))
        await b.close()
        return fake

    # "cfg" batches hold 2 images, "nocfg" ones the batcher's max of 4
    assert run(main()).batches == [["a", "b"], ["c"], ["d", "e", "f", "g"], ["h"]]


def test_fake_max_requests_per_key_caps_the_merge():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=8)
        b.pause()
        jobs = [b.submit(n, key="k", size=1, capacity=8, max_requests=2) for n in ("a", "b", "c")]
        b.resume()
        await asyncio.gather(*(b.wait(j, 5) for j in jobs))
        await b.close()
        return fake

    # three text-encoder rows per batch would exceed the encoders' batch: two requests at most
    assert run(main()).batches == [["a", "b"], ["c"]]


def test_fake_pause_from_another_thread_takes_effect_before_it_returns():
    async def main():
        fake = FakeRunBatch()
        b = await _started(fake, max_batch=1, window_s=0)
        await asyncio.to_thread(b.pause)  # returns once the loop applied it
        job = b.submit("a", key="k", size=1)
        await asyncio.sleep(0.1)
        held = (fake.batches == [], b.stats().queued)
        await asyncio.to_thread(b.resume)
        await b.wait(job, 5)
        await b.close()
        return held, fake.batches

    held, batches = run(main())
    assert held == (True, 1)
    assert batches == [["a"]]


def test_fake_every_engine_batch_is_reported_and_logged_under_its_requests_tags():
    """One failing merged batch, then each request alone: on_batch sees the three engine calls,
    and the lines logged meanwhile (engine thread and worker) name the requests they concern."""
    from sd35trt.serve.logs import REQUEST_ID

    seen: list[tuple] = []
    tags: list[str | None] = []

    class Tagging(FakeRunBatch):
        def __call__(self, requests):
            tags.append(REQUEST_ID.get())  # on the engine thread
            return super().__call__(requests)

    async def main():
        fake = Tagging(bad=frozenset({"bad"}))
        b = await _started(
            fake,
            on_batch=lambda n, images, results: seen.append(
                (n, images, None if results is None else list(results))
            ),
        )
        b.pause()
        jobs = [b.submit(name, key="k", size=1, tag=f"rid-{name}") for name in ("bad", "good")]
        b.resume()
        outcomes = await asyncio.gather(*(b.wait(j, 5) for j in jobs), return_exceptions=True)
        await b.close()
        return outcomes

    class Ids(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[tuple[str | None, str]] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append((REQUEST_ID.get(), record.getMessage()))

    ids = Ids()
    logging.getLogger("sd35trt.serve").addHandler(ids)
    try:
        outcomes = run(main())
    finally:
        logging.getLogger("sd35trt.serve").removeHandler(ids)
    assert ("rid-bad,rid-good", "batch 1 of 2 requests failed") in [(i, m[:28]) for i, m in ids.lines]
    assert isinstance(outcomes[0], FloatingPointError) and outcomes[1][0] == "good-done"
    assert seen == [(2, 2, None), (1, 1, None), (1, 1, ["good-done"])]
    assert tags == ["rid-bad,rid-good", "rid-bad", "rid-good"]
    assert REQUEST_ID.get() is None  # nothing leaks into the caller's context


def test_fake_abort_counts_a_request_of_several_parts_once():
    """faults.md #52: the second SIGINT's "answered N request(s) 503" counted engine-batch parts."""

    async def main():
        b = await _started(FakeRunBatch(), max_batch=2, queue_size=8)
        b.pause()
        await asyncio.sleep(0.01)
        parts = [b.submit(f"p{i}", key="k", size=2, tag="req-1", admitted=i > 0) for i in range(3)]
        alone = b.submit("q", key="k", size=1, tag="req-2")
        untagged = b.submit("r", key="k", size=1)
        answered = b.abort("stopping")
        outcomes = await asyncio.gather(
            *(j.future for j in (*parts, alone, untagged)), return_exceptions=True
        )
        await b.close()
        return answered, outcomes

    answered, outcomes = run(main())
    assert answered == 3 and all(isinstance(o, ShuttingDownError) for o in outcomes)
