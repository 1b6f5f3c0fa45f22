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
the end; prints one JSON object and writes it to ``--out``. Hold ``flock /tmp/sd35-fullsize.lock``
on shared machines.

    flock /tmp/sd35-fullsize.lock python scripts/controlnet_fullsize.py --blocks 4
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
    root = model_dir(config, work / "run")
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
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def make_controlnet_meta(shape: dict):
    """The ControlNet of ``shape`` on the meta device (parameter count only)."""
    import torch

    from sd35trt.models.tiny import make_controlnet

    with torch.device("meta"):
        return make_controlnet(shape)


if __name__ == "__main__":
    sys.exit(main())
