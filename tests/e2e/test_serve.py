"""``sd35trt serve`` for real: uvicorn on 127.0.0.1, the tiny ONNX Runtime engines, httpx clients.

Servers run in a thread of this process (so a test can hold the batcher's worker, wrap an engine
to inject a NaN or an out-of-memory error, and trigger shutdown), except one that runs
``sd35trt serve`` as a child process and stops it with SIGTERM. Every server binds
127.0.0.1 on a free port; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import SMALL, LiveServer, decode_png, free_port, live_server, wait_until

from sd35trt.components import Component
from sd35trt.errors import DeviceOutOfMemoryError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BODY_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(
        runtime, batch_window_ms=50, queue_size=8, timeout_s=120, max_body_bytes=BODY_LIMIT
    ) as s:
        yield s


def post(server: LiveServer, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, timeout=timeout)


def async_client(n: int, timeout: float = 120) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 2), timeout=timeout)


def start_posts(client: httpx.AsyncClient, url: str, bodies: list[dict]) -> list[asyncio.Task]:
    """One concurrent POST /generate per body."""
    return [asyncio.create_task(client.post(url + "/generate", json=b)) for b in bodies]


async def until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# -- no engines needed --------------------------------------------------------------------------


def test_importing_serve_needs_no_fastapi_and_missing_fastapi_is_a_clear_error():
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "import sd35trt.cli, sd35trt.serve\n"
        "assert 'uvicorn' not in sys.modules\n"
        "from sd35trt.errors import Sd35TrtError\n"
        "try:\n"
        "    sd35trt.serve.create_app('nowhere')\n"
        "except Sd35TrtError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install -e .[server]" in out.stdout and "fastapi" in out.stdout


# -- happy path ---------------------------------------------------------------------------------


def test_health_ready_and_openapi_docs(server, runtime):
    assert httpx.get(server.url + "/health").json()["status"] == "alive"
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["limits"]["width"] == list(runtime.info.limits.width)
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/generate" in spec["paths"] and "num_inference_steps" in json.dumps(spec)
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_generate_returns_a_png_of_the_requested_size_with_parameters_and_timings(server):
    r = post(
        server,
        {"prompt": "a lighthouse at dusk", "width": 96, "height": 64, "num_inference_steps": 2, "seed": 1234},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["status"] == "success" and len(data["images"]) == 1
    image = decode_png(data["images"][0])
    assert image.format == "PNG" and image.size == (96, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 1, "a flat (e.g. black) image"
    p = data["parameters"]
    assert (p["width"], p["height"], p["num_inference_steps"], p["seed"]) == (96, 64, 2, 1234)
    assert p["guidance_scale"] == pytest.approx(4.5) and p["prompt"] == "a lighthouse at dusk"
    assert json.loads(image.text["parameters"])["seed"] == 1234  # the PNG records how it was made
    assert data["info"] == [{"index": 0, "seed": 1234, "width": 96, "height": 64}]
    t = data["timings"]
    assert t["total_ms"] >= t["batch_ms"] > 0 and {"text_encoding", "denoise", "decode"} <= set(
        t["stages_ms"]
    )
    assert data["batch"]["requests"] == 1 and data["warnings"] == []


def test_seed_is_drawn_reported_and_reproduces_the_image(server):
    first = post(server, {"prompt": "a red fox", **SMALL}).json()
    seed = first["parameters"]["seed"]
    assert 0 <= seed <= 2**63 - 1
    again = post(server, {"prompt": "a red fox", **SMALL, "seed": seed}).json()
    assert again["parameters"]["seed"] == seed
    assert np.array_equal(
        np.asarray(decode_png(first["images"][0])), np.asarray(decode_png(again["images"][0]))
    )


def test_num_images_returns_that_many_images(server):
    r = post(server, {"prompt": "two boats", **SMALL, "num_images": 2, "seed": 5})
    assert r.status_code == 200, r.text
    images = [decode_png(i) for i in r.json()["images"]]
    assert [i.size for i in images] == [(64, 64)] * 2 and [i["index"] for i in r.json()["info"]] == [0, 1]
    assert [json.loads(i.text["parameters"])["image_index"] for i in images] == [0, 1]
    assert [i["seed"] for i in r.json()["info"]] == [5, 6]  # a seed per image
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def _png_base64(width: int, height: int) -> str:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_image_to_image_takes_init_image_and_strength(server):
    body = {
        "prompt": "a red fox",
        **SMALL,
        "num_inference_steps": 4,
        "seed": 9,
        "init_image": _png_base64(80, 48),
    }
    r = post(server, {**body, "strength": 0.5})
    assert r.status_code == 200, r.text
    data = r.json()
    image = decode_png(data["images"][0])
    assert image.size == (64, 64)  # resized to width x height, as diffusers does
    p = data["parameters"]
    assert p["strength"] == 0.5 and len(p["init_image_sha256"]) == 64 and p["skip_layer_guidance"] is None
    assert json.loads(image.text["parameters"])["strength"] == 0.5
    assert data["timings"]["stages_ms"]["image_encoding"] > 0
    stronger = post(server, {**body, "strength": 1.0}).json()
    assert not np.array_equal(np.asarray(image), np.asarray(decode_png(stronger["images"][0])))


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"init_image": "not base64!"}, "init_image", "init_image is not base64"),
        (
            {"init_image": base64.b64encode(b"GIF89a garbage").decode()},
            "init_image",
            "not a PNG, JPEG or WebP image",
        ),
        ({"strength": 1.5, "init_image": "<png>"}, "strength", "outside (0, 1]"),
        ({"strength": 0.5}, "strength", "image-to-image only"),
    ],
)
def test_bad_image_to_image_fields_are_422_naming_the_field(server, fields, field, text):
    fields = {k: _png_base64(64, 64) if v == "<png>" else v for k, v in fields.items()}
    r = post(server, {"prompt": "a fox", **SMALL, **fields})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", field] and text in detail["msg"]


# -- invalid input (faults.md cases 9 to 11) ------------------------------------------------------


def _span(runtime, name):
    lo, hi = getattr(runtime.info.limits, name)
    return f"{lo}..{hi}"


INVALID = [
    # (body, field, text the message must contain; "<width>" etc. = the range from the manifest)
    ({"width": 100}, "width", "multiple of 16"),
    ({"width": 100}, "width", "<width>"),
    ({"height": 40}, "height", "<height>"),
    ({"width": 512}, "width", "<width>"),
    ({"height": 32}, "height", "<height>"),
    ({"num_images": 17}, "num_images", "1..16"),  # beyond max_images; 3 runs as two engine batches
    ({"num_images": 0}, "num_images", "1..16"),
    ({"num_inference_steps": 0}, "num_inference_steps", "1..500"),
    ({"num_inference_steps": -3}, "num_inference_steps", "1..500"),
    ({"num_inference_steps": 10**9}, "num_inference_steps", "1..500"),
    ({"guidance_scale": -1.0}, "guidance_scale", "0..100"),
    ({"guidance_scale": 1e6}, "guidance_scale", "0..100"),
    ({"seed": -1}, "seed", "2^63-1"),
    ({"seed": 2**63}, "seed", "2^63-1"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"width": "wide"}, "width", "integer"),
    ({"width": 64.0}, "width", "integer"),
    ({"num_inference_steps": True}, "num_inference_steps", "integer"),
    ({"guidance_scale": "4.5"}, "guidance_scale", "number"),
    ({"cfg_scale": 3}, "cfg_scale", "Extra inputs are not permitted"),
    ({"cache_threshold": 0.1}, "cache_threshold", "built without the first-block cache"),
    ({"cache_threshold": -0.1}, "cache_threshold", "0..10"),
]


@pytest.mark.parametrize(("override", "field", "needle"), INVALID, ids=lambda v: str(v)[:30])
def test_invalid_field_gets_422_naming_the_field_and_the_allowed_range(
    server, runtime, override, field, needle
):
    needle = needle.replace("<width>", _span(runtime, "width")).replace("<height>", _span(runtime, "height"))
    r = post(server, {"prompt": "a cat", **SMALL, **override})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", field]
    assert needle in detail["msg"], detail["msg"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_gets_422(server, literal):
    body = f'{{"prompt": "a cat", "width": 64, "height": 64, "guidance_scale": {literal}}}'
    r = httpx.post(server.url + "/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "guidance_scale"] and "finite" in detail["msg"]


def test_body_over_the_limit_gets_413_declared_or_chunked(server):
    big = {"prompt": "x" * (BODY_LIMIT + 1), **SMALL}
    r = post(server, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts while reading
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(server.url + "/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert post(server, {"prompt": "small again", **SMALL}).status_code == 200


def test_prompt_over_the_token_limit_is_truncated_and_reported(server):
    prompt = " ".join(["a very long prompt about a garden"] * 40)  # ~280 CLIP tokens, ~1.3 kB
    r = post(server, {"prompt": prompt, **SMALL})
    assert r.status_code == 200, r.text
    warnings = r.json()["warnings"]
    assert any("prompt" in w and "limit of 77" in w and "clip_l" in w for w in warnings), warnings
    assert r.json()["parameters"]["prompt"] == prompt


# -- dynamic batching ---------------------------------------------------------------------------


def test_compatible_concurrent_requests_merge_and_keep_their_own_prompt_and_seed(server):
    a = {"prompt": "a red fox in the snow", **SMALL, "seed": 11}
    b = {"prompt": "a blue car on a bridge", **SMALL, "seed": 22}
    c = {"prompt": "a wide shot", **SMALL, "width": 96, "seed": 33}  # another size: not merged

    async def main():
        server.batcher.pause()
        async with async_client(3) as client:
            tasks = start_posts(client, server.url, [a, b, c])
            await until(lambda: server.batcher.stats().queued == 3, 30, "three queued requests")
            server.batcher.resume()
            return [(await t) for t in tasks]

    ra, rb, rc = [r.json() for r in asyncio.run(main())]
    assert ra["batch"]["id"] == rb["batch"]["id"] != rc["batch"]["id"]
    assert ra["batch"]["requests"] == rb["batch"]["requests"] == 2 and ra["batch"]["images"] == 2
    assert rc["batch"]["requests"] == 1
    assert decode_png(rc["images"][0]).size == (96, 64)
    assert (ra["parameters"]["seed"], rb["parameters"]["seed"]) == (11, 22)

    # Each merged image is the one its request gets alone (up to batch-size numerics), not its neighbour's.
    merged = {k: np.asarray(decode_png(r["images"][0])).astype(int) for k, r in (("a", ra), ("b", rb))}
    alone = {
        k: np.asarray(decode_png(post(server, body).json()["images"][0])).astype(int)
        for k, body in (("a", a), ("b", b))
    }
    for k in ("a", "b"):
        assert np.abs(merged[k] - alone[k]).max() <= 3, k
    assert np.abs(merged["a"] - alone["b"]).mean() > 10 * max(np.abs(merged["a"] - alone["a"]).mean(), 0.1)


def test_flood_of_q_plus_k_requests_on_a_queue_of_q_rejects_exactly_k_with_429(runtime):
    q, k = 4, 3
    with live_server(runtime, queue_size=q, batch_window_ms=10, timeout_s=120) as srv:

        async def main():
            srv.batcher.pause()  # the worker is busy: nothing leaves the queue
            bodies = [{"prompt": f"flood {i}", **SMALL, "seed": i} for i in range(q + k)]
            async with async_client(q + k) as client:
                tasks = start_posts(client, srv.url, bodies)
                await until(lambda: sum(t.done() for t in tasks) == k, 30, f"{k} early answers")
                await until(lambda: srv.batcher.stats().queued == q, 30, f"{q} queued requests")
                early = [t.result() for t in tasks if t.done()]
                srv.batcher.resume()
                return early, [(await t) for t in tasks]

        early, responses = asyncio.run(main())
        stats = srv.batcher.stats()

    assert [r.status_code for r in early] == [429] * k
    for r in early:
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "queue_full"
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * q + [429] * k
    for r in responses:
        if r.status_code == 200:
            assert decode_png(r.json()["images"][0]).size == (64, 64)
    assert stats.rejected == k and stats.requests_done == q and stats.queued == 0


def test_request_timeout_gets_504_and_frees_its_queue_slot(runtime):
    with live_server(runtime, timeout_s=1.0, queue_size=2) as srv:
        srv.batcher.pause()
        t0 = time.monotonic()
        r = post(srv, {"prompt": "too slow", **SMALL})
        assert r.status_code == 504 and "1 s" in r.json()["detail"]
        assert 0.9 <= time.monotonic() - t0 < 10
        assert srv.batcher.stats().queued == 0
        srv.batcher.resume()
        ok = post(srv, {"prompt": "in time", "width": 64, "height": 64, "num_inference_steps": 1})
        assert ok.status_code == 200, ok.text
        assert srv.batcher.stats().batches == 1  # the timed-out request never ran


def test_a_client_that_gives_up_frees_its_queue_slot(runtime):
    with live_server(runtime, timeout_s=60, queue_size=2) as srv:
        srv.batcher.pause()
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 0.3 s
            post(srv, {"prompt": "impatient", **SMALL}, timeout=0.3)
        wait_until(lambda: srv.batcher.stats().queued == 0, 10, "the abandoned request to leave the queue")
        assert srv.batcher.stats().timed_out == 0
        srv.batcher.resume()
        ok = post(srv, {"prompt": "patient", "width": 64, "height": 64, "num_inference_steps": 1})
        assert ok.status_code == 200, ok.text
        assert srv.batcher.stats().batches == 1  # the abandoned request never ran


# -- faults during generation (cases 13 and 14) --------------------------------------------------


def _wrap_infer(monkeypatch, runtime, component: Component, wrapper) -> None:
    engine = runtime.engines.engines[component]
    original = engine.infer
    monkeypatch.setattr(engine, "infer", lambda feeds: wrapper(original, feeds))


def test_nan_in_one_merged_request_fails_that_request_only_and_the_server_stays_ready(
    server, runtime, monkeypatch
):
    poison_ids = runtime.tokenizer(["poison"]).clip_l[0]  # [77]

    def nan_rows_of_poison(original, feeds):
        out = original(feeds)
        rows = (feeds["input_ids"].cpu() == poison_ids).all(dim=1)  # [T]
        if rows.any():
            out = dict(out)
            out["hidden_states"] = out["hidden_states"].clone()
            out["hidden_states"][rows] = float("nan")
        return out

    _wrap_infer(monkeypatch, runtime, Component.CLIP_L, nan_rows_of_poison)

    async def main():
        server.batcher.pause()
        async with async_client(2) as client:
            bodies = [{"prompt": "poison", **SMALL}, {"prompt": "a healthy plant", **SMALL}]
            tasks = start_posts(client, server.url, bodies)
            await until(lambda: server.batcher.stats().queued == 2, 30, "two queued requests")
            server.batcher.resume()
            return [(await t) for t in tasks]

    bad, good = asyncio.run(main())
    assert bad.status_code == 500, bad.text
    assert (
        bad.json()["error"] == "non_finite" and bad.json()["stage"] == "clip_l" and "images" not in bad.json()
    )
    assert good.status_code == 200, good.text
    assert good.json()["batch"]["retried_alone"] is True
    assert httpx.get(server.url + "/ready").status_code == 200


@pytest.mark.parametrize("component", [Component.TRANSFORMER, Component.VAE_DECODER])
def test_nan_after_a_stage_names_the_stage_and_the_next_request_succeeds(
    server, runtime, monkeypatch, component
):
    def all_nan(original, feeds):
        return {name: torch.full_like(v, float("nan")) for name, v in original(feeds).items()}

    _wrap_infer(monkeypatch, runtime, component, all_nan)
    r = post(server, {"prompt": "a cat", **SMALL})
    assert r.status_code == 500, r.text
    assert r.json()["stage"] == component.value and component.value in r.json()["detail"]
    monkeypatch.undo()
    assert httpx.get(server.url + "/ready").status_code == 200
    assert post(server, {"prompt": "a cat", **SMALL}).status_code == 200


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: DeviceOutOfMemoryError("the device ran out of memory"),
        lambda: RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"
        ),
    ],
    ids=["torch", "sd35trt", "onnxruntime"],
)
def test_out_of_memory_fails_that_request_with_503_and_the_next_succeeds(
    server, runtime, monkeypatch, make_error
):
    calls = {"n": 0}

    def oom_once(original, feeds):
        calls["n"] += 1
        if calls["n"] == 1:
            raise make_error()
        return original(feeds)

    _wrap_infer(monkeypatch, runtime, Component.TRANSFORMER, oom_once)
    r = post(server, {"prompt": "a huge cat", **SMALL})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "out_of_memory" and "out of memory" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1
    ok = post(server, {"prompt": "a small cat", **SMALL})
    assert ok.status_code == 200, ok.text
    assert httpx.get(server.url + "/ready").status_code == 200


# -- shutdown -----------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones(runtime):
    srv = LiveServer(runtime, queue_size=4, timeout_s=60).start()
    try:

        async def main():
            srv.batcher.pause()
            async with async_client(2) as client:
                tasks = start_posts(client, srv.url, [{"prompt": f"last {i}", **SMALL} for i in range(2)])
                await until(lambda: srv.batcher.stats().queued == 2, 30, "two queued requests")
                srv.server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
                await until(lambda: srv.state.draining, 10, "the server to start draining")
                try:
                    async with httpx.AsyncClient(timeout=5) as fresh:
                        refused = await fresh.post(
                            srv.url + "/generate", json={"prompt": "too late", **SMALL}
                        )
                except httpx.ConnectError:
                    refused = "connection refused"
                srv.batcher.resume()
                return refused, [(await t) for t in tasks]

        refused, in_flight = asyncio.run(main())
        assert refused == "connection refused" or refused.status_code == 503
        assert [r.status_code for r in in_flight] == [200, 200]
        srv.thread.join(60)
        assert not srv.thread.is_alive()
    finally:
        srv.stop()


FD_LIMIT, FLOOD = 512, 800  # file descriptors of the server process, idle sockets sent at it


def test_serve_process_survives_a_flood_logs_json_and_exits_cleanly_on_sigterm(built_run):
    """``sd35trt serve`` as a user runs it, with ``--log-format json`` and 512 file descriptors.

    faults.md case 19 for real: 800 idle sockets (an attack exhausted the descriptors, then
    /health took seconds and asyncio logged a traceback per failed accept); the request id in
    every JSON line of a request; SIGTERM while a request runs: new connections are refused, the
    running request completes, the process exits.
    """
    from sd35trt.serve.settings import FD_RESERVE

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "sd35trt.cli", "serve", "--engines", str(built_run / "engines"),
        "--host", "127.0.0.1", "--port", str(port), "--log-format", "json", "--read-timeout", "2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    limited = ["bash", "-c", f'ulimit -n {FD_LIMIT} && exec "$@"', "sd35trt", *cmd]
    proc = subprocess.Popen(limited, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # the pipe never fills
    reader.start()
    held: list[socket.socket] = []
    try:

        def ready() -> bool:
            assert proc.poll() is None, "".join(log)
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 180, "the server process to become ready")
        # in parallel: a full accept queue makes a connect wait for the client's SYN retry (1 s)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            held = list(
                pool.map(lambda _: socket.create_connection(("127.0.0.1", port), timeout=10), range(FLOOD))
            )
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        r = httpx.post(
            url + "/generate",
            json={"prompt": "a cat", **SMALL},
            headers={"X-Request-ID": "rid-1"},
            timeout=60,
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "rid-1"
        metrics = httpx.get(url + "/metrics", timeout=5).text
        open_now = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("sd35trt_connections_open ")
        )
        assert open_now <= FD_LIMIT - FD_RESERVE  # the default bound
        for s in held:
            s.close()

        # a long request (~2.5 s on 2 CPU cores) is running when SIGTERM arrives
        result: dict = {}
        body = {"prompt": "slow", "width": 256, "height": 256, "num_inference_steps": 20}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(url + "/generate", json=body, timeout=120)), daemon=True
        )
        worker.start()
        wait_until(
            lambda: httpx.get(url + "/ready", timeout=2).json()["queue"]["running"] == 1,
            30,
            "a running request",
        )
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(url + "/health", timeout=2)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                # refused, or taken from the backlog as the server closed and dropped unanswered
                return True
            return False

        wait_until(refused, 10, "new connections to be refused")
        assert worker.is_alive(), "the in-flight request should still be running while new ones are refused"
        worker.join(120)
        assert result["r"].status_code == 200, result["r"].text
        assert decode_png(result["r"].json()["images"][0]).size == (256, 256)
        # uvicorn re-raises the signal once its graceful shutdown is done
        assert proc.wait(60) in (0, -signal.SIGTERM)
        reader.join(10)
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = "".join(log)
    assert (
        "Traceback" not in text and "out of system resource" not in text and "Too many open files" not in text
    )
    lines = [json.loads(line) for line in log]  # every line is one JSON object
    mine = [line for line in lines if line["request_id"] == "rid-1"]
    assert {line["logger"] for line in mine} == {"sd35trt.serve", "uvicorn.access"}
    assert sum("slow clients:" in line["message"] for line in lines) <= 2  # a summary, not a line per socket


# -- semantics: settings without effect, drawn seeds, running alone -------------------------------


def _png_parameters(b64: str) -> dict:
    return json.loads(decode_png(b64).text["parameters"])


def test_settings_without_effect_are_warned_and_parameters_record_what_was_used(server):
    """faults.md 25: with guidance <= 1 the negative prompt and skip-layer guidance do nothing;
    the HTTP `warnings` say so, and `parameters` and the PNG record null for both."""
    body = {"prompt": "a turbo fox", **SMALL, "guidance_scale": 1.0, "negative_prompt": "blurry",
            "skip_layer_guidance": True, "seed": 8}  # fmt: skip
    r = post(server, body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [w.split(" ")[0] for w in data["warnings"]] == ["negative_prompt", "skip_layer_guidance"]
    assert all("has no effect" in w for w in data["warnings"])
    for recorded in (data["parameters"], _png_parameters(data["images"][0])):
        assert recorded["negative_prompt"] is None and recorded["skip_layer_guidance"] is None
        assert recorded["guidance_scale"] == 1.0
    with_cfg = post(server, {**body, "guidance_scale": 4.5}).json()
    assert with_cfg["warnings"] == [] and with_cfg["parameters"]["negative_prompt"] == "blurry"


def test_drawn_seeds_survive_a_javascript_round_trip(server):
    """faults.md 26: a browser reads the seed as a float64 and resubmits it: the same image."""
    first = post(server, {"prompt": "a red fox", **SMALL}).json()
    seed = first["parameters"]["seed"]
    assert 0 <= seed < 2**53
    as_js = json.loads(json.dumps(float(json.loads(json.dumps(seed)))))  # Number(seed) and back
    again = post(server, {"prompt": "a red fox", **SMALL, "seed": int(as_js)}).json()
    assert again["images"][0] == first["images"][0]
    assert post(server, {"prompt": "x", **SMALL, "seed": 2**63 - 1}).status_code == 200


def test_a_request_can_run_alone_and_its_png_equals_the_cli_one(server, built_run, tmp_path):
    """faults.md 27: merged requests may differ by ~1/255 from the same request alone. The PNG
    records its engine batch, and `"batch": "alone"` is never merged: its PNG bytes equal the
    ones `sd35trt run` writes for the same parameters."""
    from sd35trt.run import run

    a = {"prompt": "a red fox in the snow", **SMALL, "seed": 11}
    b = {"prompt": "a blue car on a bridge", **SMALL, "seed": 22}
    alone = {"prompt": "a lighthouse", **SMALL, "seed": 33, "batch": "alone"}

    async def main():
        server.batcher.pause()
        async with async_client(3) as client:
            tasks = start_posts(client, server.url, [a, alone, b])
            await until(lambda: server.batcher.stats().queued == 3, 30, "three queued requests")
            server.batcher.resume()
            return [(await t) for t in tasks]

    ra, ralone, rb = [r.json() for r in asyncio.run(main())]
    assert ra["batch"]["id"] == rb["batch"]["id"] and ra["batch"]["requests"] == 2
    assert ralone["batch"]["requests"] == 1 and ralone["batch"]["id"] != ra["batch"]["id"]
    assert _png_parameters(ra["images"][0])["engine_batch"] == {"requests": 2, "images": 2, "first_image": 0}
    assert _png_parameters(rb["images"][0])["engine_batch"]["first_image"] == 1
    cli = run(
        built_run / "engines",
        "a lighthouse",
        seed=33,
        num_inference_steps=2,
        height=64,
        width=64,
        out=tmp_path / "l.png",
    )
    assert base64.b64decode(ralone["images"][0]) == cli.paths[0].read_bytes()
    bad = post(server, {**a, "batch": "sometimes"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "batch"
