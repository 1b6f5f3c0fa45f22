"""What exporting an SD3.5-large ControlNet costs on a CPU machine, with random weights.

The shape is that of Stability AI's SD3.5-large ControlNets (canny, depth, blur) as diffusers'
``scripts/convert_sd3_controlnet_to_diffusers.py`` builds them
(:func:`sd35trt.models.tiny.controlnet_config`): 19 single-stream blocks of 38 heads x 64, no text
input, the transformer's positional embedding: 2.15 B parameters. The config is
``configs/sd3.5-large-random.yaml`` (BF16 export, 1024x1024 profile) with ``model.controlnet``.
``--blocks N`` cuts the ControlNet to N blocks (saved to a local directory named by
``model.controlnet.path``), to measure where the full size does not fit and extrapolate.

One ``export_component`` run of the ControlNet in this process (trace, save, validate against
PyTorch), timed per step, with the process's peak RSS (``ru_maxrss``) as each step starts and at
the end. With ``--build``, then the ``tensorrt-rtx`` backend's build of that ONNX in a child
process (``scripts/rtx_fullsize.py``'s build step: the config's ControlNet profile, targets from
``build.compute_capabilities`` or their default, no GPU needed), with its own wall time, peak RSS
(``wait4``), plan size and layer precisions. Prints one JSON object and writes it to ``--out``
(and the builder log beside it). Hold ``flock /tmp/sd35-fullsize.lock`` on shared machines.

    flock /tmp/sd35-fullsize.lock python scripts/controlnet_fullsize.py --blocks 4
    flock /tmp/sd35-fullsize.lock python scripts/controlnet_fullsize.py --build --out runs/cn.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "sd3.5-large-random.yaml"))
    p.add_argument("--blocks", type=int, default=None, help="cut the ControlNet to this many blocks")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "controlnet-fullsize-work")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--build", action="store_true", help="then build the ONNX with TensorRT-RTX")
    p.add_argument("--keep-work", action="store_true", help="keep the ONNX (and the plan)")
    args = p.parse_args(argv)

    import torch

    from sd35trt.components import Component
    from sd35trt.config import ControlNetSettings, ControlType, load_config
    from sd35trt.models.loading import model_dir
    from sd35trt.models.tiny import controlnet_config, make_controlnet
    from sd35trt.stages.export import export_component

    config = load_config(args.config)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cn = ControlNetSettings(type=ControlType.CANNY)
    shape = controlnet_config(config.model.architecture)
    if args.blocks is not None:
        shape = {**shape, "num_layers": args.blocks}
        folder = work / "controlnet"
        make_controlnet(shape, config.model.seed, torch.bfloat16, 0.02).save_pretrained(folder)
        cn = cn.model_copy(update={"path": str(folder)})
    config = config.model_copy(update={"model": config.model.model_copy(update={"controlnet": cn})})
    root = model_dir(config, work)  # work/model, where the build step reads the dims
    steps: list[dict] = []
    start = time.perf_counter()

    def phase(name: str) -> None:
        steps.append(
            {"step": name, "at_s": round(time.perf_counter() - start, 1), "peak_rss_gib": _rss_gib()}
        )

    files = export_component(
        config, root, Component.CONTROLNET_CANNY, work / "onnx", phase=phase, device="cpu"
    )
    onnx_bytes = sum(f.stat().st_size for f in (work / "onnx").iterdir() if f.is_file())
    result = {
        "architecture": config.model.architecture.value,
        "controlnet_layers": shape["num_layers"],
        "parameters": sum(p.numel() for p in make_controlnet_meta(shape).parameters()),
        "precision": config.export.precision.transformer.value,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(_rss_gib(), 2),
        "steps": steps,
        "onnx_files": [f.name for f in files],
        "onnx_bytes": onnx_bytes,
        "torch_threads": torch.get_num_threads(),
    }
    code = 0
    if args.build:
        code = _build(args, work, result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return code


def _build(args: argparse.Namespace, work: Path, result: dict) -> int:
    """The TensorRT-RTX build of ``work/onnx/controlnet_canny.onnx`` in a child process; its figures go
    into ``result["build"]`` (its own peak RSS, ``VmHWM``) and ``result["build_wall_s"]``."""
    import gc

    from rtx_fullsize import BUILD_RESULT, proc_status_bytes, run_child  # this directory's script

    from sd35trt.components import Component
    from sd35trt.models.loading import trim_heap

    gc.collect()
    trim_heap()  # what the export left in glibc's heap goes back before the build starts
    log = work / "build.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "rtx_fullsize.py"),
        "--config",
        str(Path(args.config).resolve()),
        "--build-only",
        str(work),
        "--component",
        Component.CONTROLNET_CANNY.value,
    ]
    exporter_rss = proc_status_bytes("VmRSS")
    code, wall, _ = run_child(cmd, log)  # wait4's peak would be this process's (vfork)
    result["exporter_rss_during_build_gib"] = None if exporter_rss is None else round(exporter_rss / 2**30, 2)
    result["build_wall_s"] = round(wall, 1)
    result["build_exit_code"] = code
    if code == 0:
        built = json.loads((work / BUILD_RESULT).read_text())
        layers = built.get("layers") or {}
        result["build"] = {
            "seconds": built["seconds"],
            "peak_rss_gib": round(built["peak_rss_bytes"] / 2**30, 2),
            "plan_bytes": built["plan_bytes"],
            "targets": built["options"].get("compute_capabilities"),
            "activation_bytes": built["activation_bytes"],
            "weights_bytes": layers.get("weights_bytes"),
            "layers": layers.get("layers"),
            "layer_precisions": layers.get("by_precision"),
            "fp8_gemms": layers.get("fp8_gemms"),
            "profile": built["profile"],
        }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, args.out.with_suffix(".build.log"))
        builder_log = work / "build_logs" / f"{Component.CONTROLNET_CANNY.value}.log"
        if builder_log.is_file():
            shutil.copy2(builder_log, args.out.with_suffix(".builder.log"))
    return code


def make_controlnet_meta(shape: dict):
    """The ControlNet of ``shape`` on the meta device (parameter count only)."""
    import torch

    from sd35trt.models.tiny import make_controlnet

    with torch.device("meta"):
        return make_controlnet(shape)


if __name__ == "__main__":
    sys.exit(main())
