"""Throughput: Triton Inference Server (``sd35trt triton``) against ``sd35trt serve``, same engines.

Writes a model repository for the engines into a temporary directory, starts the tritonserver
bundled in nvidia-pytriton (``make setup`` installs it) and an ``sd35trt serve`` process, both on
127.0.0.1 and free ports, both with dynamic batching at the same window. Against each, closed
loops of C clients (C = 1, 4, 16 by default) send same-shape requests with different prompts and
seeds over HTTP, each client a fixed number of requests; images/s = images returned / wall time.
The two servers alternate, round by round, and the median of the rounds is printed.

    python scripts/triton_throughput.py runs/tiny/engines
    python scripts/triton_throughput.py runs/tiny/engines --concurrency 1 4 16 --requests 4 --rounds 3

Every loop is bounded (requests per client, a timeout per request); both servers are stopped
when done, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import closed_loop, load_summary, start_server, stop_server

MODEL = "sd35trt"


def triton_inputs(row: dict) -> list:
    import tritonclient.http as th

    from sd35trt.triton.spec import INPUTS

    specs = {t.name: t for t in INPUTS}
    out = []
    for name, value in row.items():
        kind = specs[name].dtype.kserve
        dtype = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP64": np.float64}[kind]
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
        tensor = th.InferInput(name, [1, 1], kind)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


async def triton_loop(url: str, concurrency: int, per_client: int, body: dict, timeout_s: float) -> dict:
    """C clients, each sending ``per_client`` requests one after the other (tritonclient, aiohttp)."""
    import tritonclient.http.aio as aio
    from tritonclient.utils import InferenceServerException

    latencies: list[float] = []
    merged: list[int] = []
    errors: dict[str, int] = {}
    images = 0
    client = aio.InferenceServerClient(url, conn_limit=concurrency + 4, conn_timeout=timeout_s)

    async def one(idx: int) -> None:
        nonlocal images
        for k in range(per_client):
            row = body | {"prompt": f"{body['prompt']} #{idx}-{k}", "seed": idx * 1000 + k}
            t = time.perf_counter()
            try:
                r = await client.infer(MODEL, triton_inputs(row))
            except InferenceServerException as err:
                errors[str(err.status())] = errors.get(str(err.status()), 0) + 1
                continue
            finally:
                latencies.append(time.perf_counter() - t)
            images += r.as_numpy("images").shape[1]
            merged.append(json.loads(r.as_numpy("batch")[0, 0])["requests"])

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return load_summary(images, wall, latencies, merged, errors)


def main() -> None:
    from sd35trt.triton.local import LocalTritonServer
    from sd35trt.triton.repository import TritonRepoSettings, write_repository

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engines", type=Path, help="engines directory (e.g. runs/tiny/engines)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per figure (median shown)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--num-inference-steps", type=int, default=4)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--window-ms", type=float, default=10.0, help="batching window of both servers")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    a = p.parse_args()

    body = {
        "prompt": "a lighthouse on a cliff at dusk",
        "width": a.width,
        "height": a.height,
        "num_inference_steps": a.num_inference_steps,
        "guidance_scale": a.guidance_scale,
    }
    queue = max(a.concurrency) + 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="sd35trt-triton-bench-") as tmp:
        settings = TritonRepoSettings(batch_window_ms=a.window_ms)
        model = write_repository(a.engines, Path(tmp) / "repository", settings)
        triton = LocalTritonServer(model.model_dir.parent, exit_timeout_s=10)
        serve_proc = None
        try:
            triton.start()
            serve_proc, serve_url, _ = start_server(a.engines, None, queue, a.window_ms)
            loops = {
                "triton": lambda c: triton_loop(triton.http_url, c, a.requests, body, a.timeout),
                "serve": lambda c: closed_loop(serve_url, c, a.requests, body, a.timeout),
            }
            for loop in loops.values():  # warm both client paths
                asyncio.run(loop(1))
            for c in a.concurrency:
                for r in range(a.rounds):
                    for name, loop in loops.items():
                        res = asyncio.run(loop(c))
                        rows.append({"server": name, "concurrency": c, "round": r, **res})
                        print(
                            f"{name:6s} c={c:3d} round {r}: {res['images_per_s']:6.2f} images/s  "
                            f"p50 {res['p50_s'] * 1000:8.1f} ms  mean merged {res['mean_merged']:.2f}  "
                            f"({res['images']} images in {res['wall_s']:.1f} s)"
                            + (f"  errors {res['errors']}" if res["errors"] else ""),
                            flush=True,
                        )
        finally:
            if serve_proc is not None:
                stop_server(serve_proc)
            triton.stop()

    def median(server: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in rows if x["server"] == server and x["concurrency"] == c)

    print(
        f"\n{a.width}x{a.height}, {a.num_inference_steps} steps, cfg {a.guidance_scale:g}, "
        f"{os.cpu_count()} CPUs, median of {a.rounds} rounds; images/s (p50 latency), merged = mean "
        "requests per engine batch:"
    )
    print(f"{'concurrency':>11s} {'triton':>26s} {'serve':>26s} {'triton/serve':>13s}")
    for c in a.concurrency:
        t, s = median("triton", c, "images_per_s"), median("serve", c, "images_per_s")
        tl, sl = median("triton", c, "p50_s"), median("serve", c, "p50_s")
        tm, sm = median("triton", c, "mean_merged"), median("serve", c, "mean_merged")
        print(
            f"{c:11d} {t:7.2f} ({tl * 1000:6.0f} ms, {tm:.1f}) {s:7.2f} ({sl * 1000:6.0f} ms, {sm:.1f}) "
            f"{t / s:12.2f}x"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
