"""Full-size evidence on a CPU machine: the FP8 transformer exported and built with TensorRT-RTX.

With random weights in the published shapes (``configs/sd3.5-medium-random.yaml`` by default),
two processes, one after the other, so each one's peak RSS is its own (``wait4``'s ``ru_maxrss``):

1. ``scripts/gpu_evidence.py --device cpu --steps calibrate export``: FP8 calibration (small:
   ``--calibrate-prompts`` x ``--calibrate-steps`` at ``--calibrate-size``) and the export
   stage's FP8 ONNX export of the transformer. Its JSON gives the export's time, peak RSS (also
   after the weights are loaded, and as a multiple of the BF16 weight bytes) and ONNX sizes.
2. ``build``: the ``tensorrt-rtx`` backend's build of that ONNX (the config's transformer
   profile, ``build.compute_capabilities`` or the FP8 default 8.9 and 12.0), no GPU needed.
   Its builder log gives the FP8 proof: quantized MatMuls inside FP8 GEMM layers, fused
   attention layers, activation and weights memory.

Prints a table and writes ``rtx_fullsize.json`` (and the builder log) to ``--out``. Hold
``flock /tmp/sd35-fullsize.lock`` on shared machines: both steps take over 10 GB at medium size.

    python scripts/rtx_fullsize.py --config configs/sd3.5-medium-random.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sd35trt.artifacts.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "sd35trt-rtx-fullsize/1"
RESULT_FILE = "rtx_fullsize.json"
BUILD_RESULT = "build.result.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/sd3.5-medium-random.yaml", help="a random-weights config")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON, table, log (default runs/rtx-fullsize/<name>)"
    )
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "rtx-fullsize-work", help="ONNX and plan")
    p.add_argument("--keep-work", action="store_true", help="keep the ONNX export and the plan")
    p.add_argument("--calibrate-prompts", type=int, default=2)
    p.add_argument("--calibrate-steps", type=int, default=2)
    p.add_argument("--calibrate-size", type=int, default=256, help="calibration image size (pixels)")
    p.add_argument("--deadline-s", type=float, default=7200.0, help="calibrate + export (s)")
    p.add_argument(
        "--excerpt",
        type=Path,
        metavar="DIR",
        help="instead of a run: write test data from --out's builder log (the first --excerpt-blocks blocks)",
    )
    p.add_argument("--excerpt-blocks", type=int, default=2)
    p.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the build process's work dir
    p.add_argument("--component", default="transformer", help=argparse.SUPPRESS)  # what --build-only builds
    return p.parse_args(argv)


def run_child(cmd: list[str], log_path: Path) -> tuple[int, float, int]:
    """Run ``cmd`` with its output appended to ``log_path`` (and echoed); returns
    ``(exit code, wall seconds, peak RSS bytes)`` from ``wait4``."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024


def proc_status_bytes(key: str) -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process from ``/proc/self/status`` (Linux), bytes.

    Unlike ``wait4``'s ``ru_maxrss``, ``VmHWM`` is the process's own: a child started by ``vfork``
    and ``exec`` (Python's ``subprocess``) inherits its parent's peak in ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def build_step(work: Path, config_path: str, component_name: str = "transformer") -> int:
    """The build process: TensorRT-RTX build of ``work/onnx/<component>.onnx`` into ``work``, as
    ``sd35trt build`` builds that component (its profile from the config and the model directory
    ``work/model``; FP8 for the transformer of a quantized export; the targets of a build with FP8
    engines when the export is quantized). Writes ``work/build.result.json``."""
    from sd35trt.backends.base import BuildJob
    from sd35trt.backends.layers import quantized_linear_nodes
    from sd35trt.backends.machine import MachineInfo
    from sd35trt.backends.tensorrt_rtx import build_rtx_plan
    from sd35trt.components import CONTROLNET_INPUT, Component, ModelDims
    from sd35trt.config import load_config
    from sd35trt.models.loading import model_dir
    from sd35trt.stages.build import (
        CONTROLNET_TEXT_INPUT,
        SKIP_LAYERS_INPUT,
        check_inputs_match,
        engine_profile,
        onnx_inputs,
    )

    config = load_config(config_path)
    component = Component(component_name)
    onnx = work / "onnx" / f"{component.value}.onnx"
    inputs, external = onnx_inputs(onnx)
    skip = inputs[SKIP_LAYERS_INPUT][0] if SKIP_LAYERS_INPUT in inputs else 0
    controlnet = inputs[CONTROLNET_INPUT][1] if CONTROLNET_INPUT in inputs else 0
    text = not component.is_controlnet or CONTROLNET_TEXT_INPUT in inputs
    dims = ModelDims.from_model_dir(model_dir(config, work))
    shapes = engine_profile(config, dims, component, skip, controlnet, text)
    check_inputs_match(onnx.name, inputs, shapes)
    plan = work / f"{component.value}.plan"
    fp8 = component.is_transformer and config.export.quantize
    start = time.perf_counter()
    built = build_rtx_plan(
        BuildJob(
            component=component,
            source=onnx,
            target=plan,
            shapes=shapes,
            settings=config.build,
            fp8=fp8,
            external_data=external,
            machine=MachineInfo.detect(),
            run_dir=work,
            progress=lambda line: print(line, flush=True),
            label=component.value,
            build_has_fp8=config.export.quantize,
        )
    )
    seconds = time.perf_counter() - start
    layers = built.layers
    result = {
        "component": component.value,
        "seconds": round(seconds, 3),
        "plan_bytes": plan.stat().st_size,
        "profile": {name: r.to_json() for name, r in shapes.items()},
        "options": dict(built.options),
        "activation_bytes": built.device_memory_bytes,
        "layers": layers.model_dump(mode="json", exclude={"fp8_gemm_layers"}) if layers else None,
        "fp8_gemms_holding_several": sum(len(v) > 1 for v in layers.fp8_gemm_layers.values())
        if layers
        else None,
        "quantized_nodes": quantized_linear_nodes(onnx) if fp8 else [],
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
    }
    atomic_write_json(work / BUILD_RESULT, result)
    return 0


def write_excerpt(out: Path, target: Path, blocks: int) -> None:
    """Test data from a run: the builder log's layer lines that name ``transformer_blocks.0`` to
    ``blocks - 1`` (any layer, FP8 or not) with the log's memory totals, and those blocks'
    quantized MatMuls as the ONNX listed them (chosen by name, not by what the build did)."""
    from sd35trt.backends.layers import LAYERS_MESSAGE

    doc = json.loads((out / RESULT_FILE).read_text())
    marks = tuple(f"/transformer_blocks.{i}/" for i in range(blocks))
    lines = (out / "builder.log").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(LAYERS_MESSAGE))
    kept = [
        line for line in lines[:start] if "Total Activation Memory" in line or "Total Weights Memory" in line
    ]
    kept.append(lines[start])
    kept += [
        line for line in lines[start + 1 :] if line.startswith("Name: ") and any(m in line for m in marks)
    ]
    quantized = [n for n in doc["build"]["quantized_nodes"] if any(m in n for m in marks)]
    target.mkdir(parents=True, exist_ok=True)
    (target / "transformer_medium_excerpt.log").write_text("\n".join(kept) + "\n")
    (target / "transformer_medium_excerpt.quantized.json").write_text(json.dumps(quantized, indent=1) + "\n")
    print(f"wrote {len(kept)} lines and {len(quantized)} quantized MatMuls to {target}")


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(doc: dict) -> str:
    """The figures, one per line."""
    e, b = doc.get("export") or {}, doc.get("build") or {}
    layers = b.get("layers") or {}
    rows = [
        ("model", doc["model"]),
        ("parameters (transformer)", f"{e.get('parameters', 0):,}"),
        ("BF16 weight bytes", gib(e.get("weights_bf16_bytes"))),
        ("calibrate", f"{doc.get('calibrate_wall_s', 0):.0f} s wall, {doc.get('calibrate_status')}"),
        ("export time", f"{e.get('seconds', 0):.1f} s (process {doc.get('export_wall_s', 0):.0f} s)"),
        (
            "export peak RSS",
            f"{gib(e.get('peak_host_rss_bytes'))} = {e.get('peak_host_rss_over_weights')}x BF16 "
            f"weights; after load {gib(e.get('peak_host_rss_after_load_bytes'))} = "
            f"{e.get('peak_host_rss_after_load_over_weights')}x",
        ),
        (
            "ONNX size",
            f".onnx {e.get('onnx_bytes', 0) / 2**20:.1f} MiB + data {gib(e.get('external_data_bytes'))}",
        ),
        ("build time", f"{b.get('seconds', 0):.1f} s (process {doc.get('build_wall_s', 0):.0f} s)"),
        ("build peak RSS", gib(doc.get("build_peak_rss_bytes"))),
        ("plan size", gib(b.get("plan_bytes"))),
        ("targets", ", ".join((b.get("options") or {}).get("compute_capabilities", []))),
        (
            "FP8 GEMM coverage",
            f"{layers.get('quantized_linear', 0) - layers.get('fell_back_count', 0)}/"
            f"{layers.get('quantized_linear')} quantized MatMuls inside {layers.get('fp8_gemms')} FP8 "
            f"GEMM layers ({b.get('fp8_gemms_holding_several')} holding several)",
        ),
        (
            "fused attention layers",
            f"{len(layers.get('fused_attention', []))} {layers.get('fused_attention_tactics', {})}",
        ),
        ("activation memory", gib(b.get("activation_bytes"))),
        ("weights memory", gib(layers.get("weights_bytes"))),
        ("layers", f"{layers.get('layers')} {layers.get('by_precision')}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_only is not None:
        return build_step(args.build_only, args.config, args.component)
    from sd35trt.config import load_config

    config_path = str(Path(args.config).resolve())
    config = load_config(config_path)
    out = (args.out or REPO / "runs" / "rtx-fullsize" / config.name).resolve()
    if args.excerpt is not None:
        write_excerpt(out, args.excerpt, args.excerpt_blocks)
        return 0
    work_root = args.work_dir.resolve()
    work = work_root / config.name
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "rtx_fullsize.log"
    doc: dict = {"schema": SCHEMA, "model": config.name, "config": args.config, "complete": False}
    evidence = [
        sys.executable,
        str(REPO / "scripts" / "gpu_evidence.py"),
        "--device", "cpu",
        "--configs", config_path,
        "--steps", "calibrate", "export",
        "--height", str(args.calibrate_size),
        "--width", str(args.calibrate_size),
        "--calibrate-prompts", str(args.calibrate_prompts),
        "--calibrate-steps", str(args.calibrate_steps),
        "--deadline-s", str(args.deadline_s),
        "--step-deadline-s", str(args.deadline_s),
        "--out", str(out / "evidence"),
        "--work-dir", str(work_root),
        "--keep-work",
    ]  # fmt: skip
    code, wall, _ = run_child(evidence, log_path)
    steps = json.loads((out / "evidence" / "gpu_evidence.json").read_text())["steps"]
    by_step = {s["step"]: s for s in steps}
    cal, exp = by_step.get("calibrate", {}), by_step.get("export", {})
    doc.update(
        calibrate_wall_s=cal.get("wall_s"),
        calibrate_status=cal.get("status"),
        export_wall_s=exp.get("wall_s"),
    )
    doc["export"] = {**(exp.get("result") or {}), "peak_host_rss_bytes": exp.get("peak_host_rss_bytes")}
    atomic_write_json(out / RESULT_FILE, doc)
    if code != 0 or exp.get("status") != "ok":
        print(f"the calibrate/export process failed (exit {code}): see {log_path}", file=sys.stderr)
        return 1
    build = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--config",
        config_path,
        "--build-only",
        str(work),
    ]
    code, wall, rss = run_child(build, log_path)
    doc.update(build_wall_s=round(wall, 3), build_peak_rss_bytes=rss)
    if code == 0:
        doc["build"] = json.loads((work / BUILD_RESULT).read_text())
        shutil.copy2(work / "build_logs" / "transformer.log", out / "builder.log")
    doc["complete"] = code == 0
    atomic_write_json(out / RESULT_FILE, doc)
    if not args.keep_work:
        shutil.rmtree(work_root, ignore_errors=True)
    text = table(doc)
    (out / "rtx_fullsize.txt").write_text(text + "\n")
    print("\n" + text + f"\n\n{out / RESULT_FILE}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
