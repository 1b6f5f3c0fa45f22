"""Measure ONNX Runtime graph optimization levels on a run's exported graphs.

For each ONNX graph of a run (``runs/<name>/onnx``) and each level (BASIC, EXTENDED, ALL) this
loads a CPU session, runs the component's sample inputs at the profile's opt shapes, and prints
whether the session loads, the largest difference from the BASIC outputs (the level the export was
validated at against PyTorch fake quant) and the median latency in ms. Run it after ``make export``
(and ``make export MODEL=tiny-fp32`` for FP32 graphs)::

    python scripts/ort_levels.py runs/tiny runs/tiny-fp32 [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sd35trt.backends.onnxruntime import session_options

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def _session(path: Path, level: str) -> ort.InferenceSession:
    so = session_options()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(run_dir: Path, engine: dict, vocab: int = 64) -> dict[str, np.ndarray]:
    """Random inputs at the engine profile's opt shapes (tokens below ``vocab``, timesteps in 0..1000)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, shapes in engine["profile"].items():
        shape = tuple(shapes["opt"])
        if name.endswith("input_ids"):
            feeds[name] = rng.integers(0, vocab, shape, dtype=np.int64)
        elif name == "timestep":
            feeds[name] = (rng.random(shape) * 1000).astype(np.float32)
        elif name == "skip_layers":
            feeds[name] = np.zeros(shape, np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def measure(path: Path, feeds: dict[str, np.ndarray], runs: int) -> list[dict]:
    """One row per level: loads, max abs difference from BASIC, median latency (ms)."""
    rows, basic = [], None
    for level in LEVELS:
        try:
            sess = _session(path, level)
        except Exception as err:  # the level's failure is the measurement
            rows.append({"level": level, "loads": False, "error": str(err).splitlines()[0][:80]})
            continue
        names = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in feeds.items() if k in names}
        out = sess.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        if basic is None:
            basic = out
        diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(out, basic, strict=True))
        median = float(np.median(times))
        rows.append({"level": level, "loads": True, "max_abs_diff": diff, "median_ms": median})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}")
    print(f"{'graph':<40} {'level':<20} {'max |diff| vs BASIC':>20} {'median ms':>10}")
    for run_dir in args.run_dirs:
        engines = json.loads((run_dir / "engines" / "manifest.json").read_text())["engines"]
        for path in sorted((run_dir / "onnx").glob("*.onnx")):
            stem = path.stem.removesuffix("_unquantized")
            feeds = _feeds(run_dir, engines[stem])
            for row in measure(path, feeds, args.runs):
                name = f"{run_dir.name}/{path.name}"
                if row["loads"]:
                    diff, ms = row["max_abs_diff"], row["median_ms"]
                    print(f"{name:<40} {row['level']:<20} {diff:>20.3g} {ms:>10.2f}")
                else:
                    print(f"{name:<40} {row['level']:<20} {'fails: ' + row['error']}")


if __name__ == "__main__":
    main()
