"""Regenerate the measured figures the README quotes, so they cannot drift from the code.

Measures on the built-in tiny model (run ``make build`` and ``make build MODEL=tiny-fp32`` first,
or ``make readme-figures``, which does both):

- parity: the non-quantized ONNX Runtime engines (``runs/tiny-fp32``) against diffusers'
  ``StableDiffusion3Pipeline`` for the same seed, as the max absolute pixel difference in 1/255
  units, with skip-layer guidance matched on both sides and with each side's default (the engines
  use the config's SLG; diffusers' pipeline uses none unless asked);
- FP8: PSNR / SSIM of the FP8 engines (``runs/tiny``) against the non-quantized pipeline over the
  held-out prompts (what ``make eval`` reports);
- timings: a fresh ``sd35trt run`` process start to PNG (with the engine load it reports), and one
  generation with the FP8 engines loaded (medians of ``--runs``).

Prints a Markdown block; ``--write README.md`` replaces the block between the README's
``<!-- figures:begin -->`` and ``<!-- figures:end -->`` markers.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
PROMPT = "a photo of a cat sitting on a windowsill"
SIZES = ((128, 128), (128, 64))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def parity(run_dir: Path, seed: int = 11) -> list[dict]:
    """Max |engine - diffusers| in 1/255 per size: SLG matched, and each side's default."""
    from sd35trt.config import load_config
    from sd35trt.models.loading import load_pipeline
    from sd35trt.models.reference import reference_images
    from sd35trt.runtime.pipeline import Sd35Runtime
    from sd35trt.runtime.request import GenerationRequest

    engines = run_dir / "engines"
    config = load_config(engines / "config.yaml")
    no_slg = config.model_copy(
        update={"runtime": config.runtime.model_copy(update={"skip_layer_guidance": None})}
    )
    pipe = load_pipeline(config, run_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    runtime = Sd35Runtime.load(engines)
    rows = []
    for height, width in SIZES:
        ours = runtime.generate(GenerationRequest(prompt=PROMPT, seed=seed, height=height, width=width))
        size = {"height": height, "width": width, "seed": seed}
        matched = reference_images(pipe, config.runtime, [PROMPT], **size)[0]
        plain = reference_images(pipe, no_slg.runtime, [PROMPT], **size)[0]
        mine = _pixels(ours.images[0])
        rows.append(
            {
                "size": f"{width}x{height}",
                "slg_matched": int(np.abs(mine - _pixels(matched)).max()),
                "defaults": int(np.abs(mine - _pixels(plain)).max()),
            }
        )
    return rows


def fp8_quality(run_dir: Path, reference: Path, num_prompts: int) -> dict:
    """PSNR (dB) and SSIM of the FP8 engines against the non-quantized pipeline (``make eval``)."""
    from sd35trt.bench.evaluate import evaluate

    report = evaluate(run_dir / "engines", reference, num_prompts=num_prompts, plot=False)
    rows = report.per_prompt
    psnr = [r.psnr_db for r in rows]
    ssim = [r.ssim for r in rows]
    return {
        "prompts": len(rows),
        "psnr_mean": statistics.fmean(psnr),
        "psnr_min": min(psnr),
        "ssim": min(ssim),
    }


def fresh_run(engines: Path, seed: int) -> tuple[float, float]:
    """A new ``sd35trt run --timings`` process: (wall seconds from start to exit, its engine load s).

    What a user waits for the first image: interpreter start, imports (torch, ONNX Runtime),
    verifying and loading the engines, one generation, the PNG.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sd35trt.cli", "run", "--engines", str(engines), PROMPT]
        cmd += ["--seed", str(seed), "--timings", "-o", str(Path(tmp) / "out.png")]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("engine loading")]
    return wall, float(line.split()[2]) / 1e3


def timings(run_dir: Path, runs: int) -> dict:
    """With the FP8 engines, default request: a fresh ``sd35trt run`` process (median wall time
    and its engine load), and one generation with the engines loaded (median ms)."""
    from sd35trt.runtime.pipeline import Sd35Runtime
    from sd35trt.runtime.request import GenerationRequest

    fresh = [fresh_run(run_dir / "engines", i) for i in range(runs)]
    totals, steps = [], []
    with Sd35Runtime.load(run_dir / "engines") as runtime:
        for i in range(runs):
            result = runtime.generate(GenerationRequest(prompt=PROMPT, seed=i))
            totals.append(result.timings.total_s)
            steps.append(statistics.median(result.timings.step_s))
    return {
        "fresh_s": statistics.median(w for w, _ in fresh),
        "load_s": statistics.median(load for _, load in fresh),
        "generate_ms": statistics.median(totals) * 1e3,
        "step_ms": statistics.median(steps) * 1e3,
        "num_inference_steps": len(result.timings.step_s),
        "size": f"{result.params.width}x{result.params.height}",
    }


def render(par: list[dict], fp8: dict, tim: dict) -> str:
    """The README block (Markdown)."""
    lines = [
        BEGIN,
        f"Measured by `make readme-figures` ({platform.machine()}, {platform.python_version()}, CPU):",
        "",
        "| what | figure |",
        "|---|---|",
    ]
    for row in par:
        lines.append(
            f"| non-quantized engines vs diffusers, {row['size']}, SLG matched | "
            f"max {row['slg_matched']}/255 |"
        )
        lines.append(
            f"| the same, each side's default (engines SLG on, diffusers off) | max {row['defaults']}/255 |"
        )
    lines += [
        f"| FP8 engines vs non-quantized diffusers, {fp8['prompts']} held-out prompts | "
        f"PSNR mean {fp8['psnr_mean']:.1f} dB (min {fp8['psnr_min']:.1f}), SSIM >= {fp8['ssim']:.4f} |",
        f"| FP8 engines: a fresh `sd35trt run` process, start to PNG (of it, verifying and loading "
        f"the engines) | {tim['fresh_s']:.1f} s ({tim['load_s']:.2f} s) |",
        f"| FP8 engines, loaded: one {tim['size']} image, {tim['num_inference_steps']} steps | "
        f"{tim['generate_ms']:.0f} ms ({tim['step_ms']:.1f} ms per transformer step) |",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp8-run", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--fp32-run", type=Path, default=Path("runs/tiny-fp32"))
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for the FP8 PSNR")
    parser.add_argument("--runs", type=int, default=5, help="repetitions for the timings")
    parser.add_argument("--write", type=Path, help="replace the figures block in this README")
    args = parser.parse_args()
    from sd35trt.console import quiet_third_party

    quiet_third_party(verbose=False)
    block = render(
        parity(args.fp32_run),
        fp8_quality(args.fp8_run, args.fp8_run / "model", args.prompts),
        timings(args.fp8_run, args.runs),
    )
    print(block)
    if args.write:
        text = args.write.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{args.write} has no {BEGIN} ... {END} block")
        args.write.write_text(pattern.sub(lambda _m: block, text))
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
