"""Serving throughput, batched against unbatched, at several concurrencies.

Starts two ``sd35trt serve`` processes on 127.0.0.1 (free ports): one with the
engines' batch maximum (dynamic batching on), one with ``--max-batch 1`` (off). Against each,
closed loops of C clients (C = 1, 4, 16 by default) send identical-shape requests with different
prompts and seeds, each client a fixed number of requests; images/s = images returned / wall time.
The two modes alternate, several rounds each, and the median is printed.

    python scripts/serve_throughput.py runs/tiny/engines
    python scripts/serve_throughput.py runs/tiny/engines --concurrency 1 4 16 --requests 4 \
        --num-inference-steps 4

Every loop is bounded (requests per client, and a timeout per request); the servers are stopped
with SIGTERM when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engines: Path, max_batch: int | None, queue_size: int, window_ms: float) -> tuple:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sd35trt.cli", "serve",
        "--engines", str(engines), "--host", "127.0.0.1", "--port", str(port),
        "--queue-size", str(queue_size), "--batch-window-ms", str(window_ms), "--log-level", "warning",
    ]  # fmt: skip
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/ready", timeout=2)
            if r.status_code == 200:
                return proc, url, r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("the server did not become ready within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_summary(images: int, wall: float, latencies: list[float], merged: list[int], errors: dict) -> dict:
    """One closed-loop measurement: images, wall s, images/s, median latency s, mean requests merged."""
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "p50_s": statistics.median(latencies),
        "mean_merged": statistics.mean(merged) if merged else 0.0,
        "errors": errors,
    }


async def closed_loop(url: str, concurrency: int, per_client: int, body: dict, timeout_s: float) -> dict:
    """C clients, each sending ``per_client`` requests one after the other."""
    latencies: list[float] = []
    merged: list[int] = []
    errors: dict[int, int] = {}
    images = 0

    async def client(idx: int, http: httpx.AsyncClient) -> None:
        nonlocal images
        for k in range(per_client):
            req = body | {"prompt": f"{body['prompt']} #{idx}-{k}", "seed": idx * 1000 + k}
            t = time.perf_counter()
            r = await http.post(url + "/generate", json=req, timeout=timeout_s)
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
                continue
            data = r.json()
            images += len(data["images"])
            merged.append(data["batch"]["requests"])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return load_summary(images, wall, latencies, merged, errors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engines", type=Path, help="engines directory (e.g. runs/tiny/engines)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per figure (the median is shown)"
    )
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--num-inference-steps", "--steps", type=int, default=4)
    p.add_argument("--guidance-scale", "--guidance", type=float, default=4.5)
    p.add_argument("--window-ms", type=float, default=10.0)
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
    # Both servers stay up (the idle one costs nothing) and the modes alternate round by round,
    # so a change in the machine's load hits both alike.
    servers = {}
    try:
        for mode, max_batch in (("batched", None), ("unbatched", 1)):
            proc, url, ready = start_server(a.engines, max_batch, queue, a.window_ms)
            servers[mode] = (proc, url, ready["queue"]["max_batch"])
            asyncio.run(closed_loop(url, 1, 1, body, a.timeout))  # warm the client path
        rows = []
        for c in a.concurrency:
            for r in range(a.rounds):
                for mode, (_, url, engine_batch) in servers.items():
                    res = asyncio.run(closed_loop(url, c, a.requests, body, a.timeout))
                    rows.append(
                        {"mode": mode, "max_batch": engine_batch, "concurrency": c, "round": r, **res}
                    )
                    print(
                        f"{mode:9s} max_batch={engine_batch} c={c:3d} round {r}: "
                        f"{res['images_per_s']:6.2f} images/s  p50 {res['p50_s'] * 1000:8.1f} ms  "
                        f"mean merged {res['mean_merged']:.2f}  "
                        f"({res['images']} images in {res['wall_s']:.1f} s)"
                        + (f"  errors {res['errors']}" if res["errors"] else ""),
                        flush=True,
                    )
    finally:
        for proc, _, _ in servers.values():
            stop_server(proc)

    def median(mode: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in rows if x["mode"] == mode and x["concurrency"] == c)

    print(
        f"\n{a.width}x{a.height}, {a.num_inference_steps} steps, cfg {a.guidance_scale:g}, "
        f"{os.cpu_count()} CPUs, "
        f"median of {a.rounds} rounds; images/s (p50 latency):"
    )
    print(f"{'concurrency':>11s} {'batched':>18s} {'unbatched':>18s} {'speedup':>8s}")
    for c in a.concurrency:
        b, u = median("batched", c, "images_per_s"), median("unbatched", c, "images_per_s")
        bl, ul = median("batched", c, "p50_s"), median("unbatched", c, "p50_s")
        print(f"{c:11d} {b:7.2f} ({bl * 1000:6.0f} ms) {u:7.2f} ({ul * 1000:6.0f} ms) {b / u:7.2f}x")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
