"""FP8 ControlNet engines on the tiny model against FP32 ones: PSNR per seed (README's bound).

Runs the tiny model with ``model.controlnet: {type: canny}`` through calibrate (the ControlNet in
the calibration loop), export and build (ONNX Runtime) twice, FP8 and FP32, then generates the
same canny-controlled requests with both and prints the PSNR of each image pair. About 5 minutes
on 2 CPU cores. Exits 1 when a PSNR is below the bound. With ``--large-layout`` the ControlNet is
the tiny one in SD3.5-large's layout (``use_pos_embed: false``, no text input), written to
``WORK_DIR/controlnet`` and named by ``model.controlnet.path``. With ``--two`` the engines have
two ControlNets, canny and a blur one drawn from another seed, and every request uses both.

Usage: python scripts/controlnet_fp8_psnr.py [WORK_DIR] [--large-layout | --two]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sd35trt.config import Backend, config_from_dict, load_config
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.stages.build import build
from sd35trt.stages.calibrate import calibrate
from sd35trt.stages.export import export

#: The README's bound for FP8 against FP32 engines of the tiny model, with a control image.
MIN_PSNR_DB = 40.0
PROMPT = "a red fox in the snow, watercolor"
REPO = Path(__file__).resolve().parent.parent


def _config(quantize: bool, controlnet_path: Path | None = None, blur_path: Path | None = None):
    cfg = load_config(REPO / "configs" / "tiny.yaml").model_dump(mode="json")
    cfg["model"]["controlnet"] = {"type": "canny"}
    if controlnet_path is not None:
        cfg["model"]["controlnet"]["path"] = str(controlnet_path)
    if blur_path is not None:
        cfg["model"]["controlnet"] = [cfg["model"]["controlnet"], {"type": "blur", "path": str(blur_path)}]
    cfg["export"]["quantize"] = quantize
    cfg["calibrate"].update(
        num_prompts=4,
        steps=3,
        prompts=str(REPO / "calibration_prompts" / "calibration.txt"),
        heldout_prompts=str(REPO / "calibration_prompts" / "heldout.txt"),
    )
    return config_from_dict(cfg)


def _picture() -> Image.Image:
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2.5, y * 2.5, 128 + 90 * np.sin(x / 11.0) * np.cos(y / 9.0)], axis=-1)
    rgb[20:70, 30:80] = (250, 240, 20)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / max(np.mean(d**2), 1e-12)))


def main(work: Path, large_layout: bool = False, two: bool = False) -> int:
    from sd35trt.models.tiny import tiny_controlnet

    path = blur = None
    if large_layout:
        path = work / "controlnet"
        tiny_controlnet(own_pos_embed=False).save_pretrained(path)
    if two:
        blur = work / "blur"
        tiny_controlnet(seed=1).save_pretrained(blur)
    control = {"control_image": [_picture()] * 2, "control_type": ["canny", "blur"]} if two else {}
    images = {}
    for quantize in (True, False):
        config, run = _config(quantize, path, blur), work / ("fp8" if quantize else "fp32") / "tiny"
        if quantize:
            calibrate(config, run, log=lambda _line: None)
        export(config, run, progress=lambda _line: None)
        build(config, run, Backend.ONNXRUNTIME, progress=lambda _line: None)
        with Sd35Runtime.load(run / "engines") as rt:
            images[quantize] = [
                rt.generate(
                    GenerationRequest(PROMPT, **(control or {"control_image": _picture()}), seed=s)
                ).images[0]
                for s in (1, 2, 3)
            ]
    values = [psnr(a, b) for a, b in zip(images[True], images[False], strict=True)]
    what = "canny + blur" if two else "canny"
    print(f"PSNR of FP8 vs FP32 engines (dB), {what} control, seeds 1-3:", [round(v, 2) for v in values])
    return 0 if min(values) >= MIN_PSNR_DB else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--large-layout", "--two")]
    work = Path(args[0]) if args else Path("runs/controlnet-fp8-psnr")
    sys.exit(main(work, "--large-layout" in sys.argv, "--two" in sys.argv))
