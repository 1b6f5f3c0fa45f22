"""ControlNet end to end on the tiny model: export, ONNX Runtime engines, parity with diffusers.

Engines built from a non-quantized export with ``model.controlnet`` (the tiny ControlNet the
built-in model carries, in the SD3 layout; and a tiny one in SD3.5-large's layout, named by
``model.controlnet.path``: no positional embedding of its own, no text input) must reproduce
diffusers' ``StableDiffusion3ControlNetPipeline`` (same weights, control image, scale, seed) within
1/255 per pixel, for canny and blur control images, with and without CFG, at two conditioning
scales. diffusers draws the control image's posterior
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
from sd35trt.runtime.png import PARAMETERS_KEY

pytestmark = pytest.mark.slow

PROMPT = "a red fox in the snow, watercolor"
MAX_PIXEL_DIFF = 1  # of 255
SEED = 3
H, W, STEPS = 64, 64, 4  # small and few: the whole file runs on one xdist worker


#: (control type, layout): the built-in tiny ControlNet (SD3 layout) and SD3.5-large's layout.
CASES = [(ControlType.CANNY, "sd3"), (ControlType.BLUR, "sd3"), (ControlType.CANNY, "sd3.5-large")]


def _run_dir(tiny_config, tmp_path_factory, control_type: ControlType, layout: str):
    from filelock import FileLock

    from sd35trt.config import Backend
    from sd35trt.models.tiny import tiny_controlnet
    from sd35trt.stages.build import build
    from sd35trt.stages.export import export

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    run_dir = base / f"shared-run-controlnet-{control_type.value}-{layout}" / "tiny"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = None
    with FileLock(str(run_dir.parent / "stages.lock")):
        if layout != "sd3":  # a directory of its own, named by model.controlnet.path
            path = run_dir.parent / "controlnet"
            if not path.is_dir():
                tiny_controlnet(seed=tiny_config.model.seed, own_pos_embed=False).save_pretrained(path)
        settings = ControlNetSettings(type=control_type, path=None if path is None else str(path))
        model = tiny_config.model.model_copy(update={"controlnet": settings})
        export_settings = tiny_config.export.model_copy(update={"quantize": False})
        config = tiny_config.model_copy(update={"model": model, "export": export_settings})
        export(config, run_dir, progress=lambda _line: None)
        build(config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    return run_dir, path or run_dir / "model" / "controlnet"


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join((case[0].value, case[1])))
def controlled(request, tiny_config, tmp_path_factory):
    """``(control type, run directory, runtime, diffusers ControlNet pipeline)`` per case; diffusers
    loads the ControlNet itself (and lends a ``use_pos_embed: false`` one the transformer's
    positional embedding itself)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from sd35trt.models.loading import load_pipeline

    control_type, layout = request.param
    run_dir, folder = _run_dir(tiny_config, tmp_path_factory, control_type, layout)
    base = load_pipeline(tiny_config, run_dir, device="cpu")
    controlnet = SD3ControlNetModel.from_pretrained(folder, use_safetensors=True)
    assert controlnet.config.use_pos_embed is (layout == "sd3")
    pipe = StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    with Sd35Runtime.load(run_dir / "engines") as rt:
        yield control_type, run_dir, rt, pipe


@pytest.fixture(scope="module")
def picture():
    """A 96x96 picture (resized to the generation size) with edges and smooth shading."""
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2.5, y * 2.5, 128 + 90 * np.sin(x / 11.0) * np.cos(y / 9.0)], axis=-1)
    rgb[20:70, 30:80] = (250, 240, 20)
    rgb[(x - 30) ** 2 + (y - 70) ** 2 < 200] = (10, 20, 200)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _reference(pipe, tiny_config, control_image, guidance, scale):
    import torch

    torch.manual_seed(SEED)  # the control image's posterior sample (global generator)
    with torch.inference_mode():
        return pipe(
            PROMPT,
            control_image=control_image,
            controlnet_conditioning_scale=scale,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(SEED),
            max_sequence_length=tiny_config.runtime.max_sequence_length,
        ).images[0]


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("guidance", [4.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_engines_match_diffusers(controlled, tiny_config, picture, guidance, scale):
    control_type, _, rt, pipe = controlled
    ours = rt.generate(
        GenerationRequest(
            PROMPT, control_image=picture, controlnet_conditioning_scale=scale, guidance_scale=guidance,
            height=H, width=W, seed=SEED, num_inference_steps=STEPS,
        )
    )  # fmt: skip
    # diffusers takes the control image as made: here from the picture at the generation size
    sized = picture.resize((W, H), resample=Image.Resampling.LANCZOS)
    theirs = _reference(pipe, tiny_config, preprocess(sized, control_type), guidance, scale)
    assert _max_diff(ours.images[0], theirs) <= MAX_PIXEL_DIFF
    if scale == 1.0 and guidance > 1:
        # the control image changes the result (a wiring that dropped it would match a reference
        # that dropped it too); zero residuals give the plain image
        plain = rt.generate(
            GenerationRequest(
                PROMPT, guidance_scale=guidance, height=H, width=W, seed=SEED, num_inference_steps=STEPS,
                skip_layer_guidance=False,  # as with a control image (no SLG in diffusers' pipeline)
            )
        )  # fmt: skip
        assert _max_diff(ours.images[0], plain.images[0]) > 4 * MAX_PIXEL_DIFF
        zero = rt.generate(
            GenerationRequest(
                PROMPT, control_image=picture, controlnet_conditioning_scale=0.0, guidance_scale=guidance,
                height=H, width=W, seed=SEED, num_inference_steps=STEPS,
            )
        )  # fmt: skip
        assert _max_diff(zero.images[0], plain.images[0]) == 0
        params = ours.images[0].info[PARAMETERS_KEY]  # the PNG text chunk's JSON
        assert ours.params.control.image_sha256 in params
        assert control_type.value in params


def test_request_faults_name_their_field(controlled, picture):
    control_type, _, rt, _ = controlled
    other = next(t for t in ControlType if t is not control_type)

    def field_of(**kwargs) -> str:
        with pytest.raises(RequestError) as err:
            rt.validate(GenerationRequest(PROMPT, height=H, width=W, **kwargs))
        assert "\n" not in str(err.value)
        return err.value.field

    assert field_of(control_image=picture, control_type=other.value) == "control_type"
    assert (
        field_of(control_image=picture, controlnet_conditioning_scale=2.5) == "controlnet_conditioning_scale"
    )
    assert field_of(control_image=picture.resize((96, 48))) == "control_image"  # another aspect ratio
    assert field_of(control_image=picture.convert("I;16")) == "control_image"  # 16-bit mode
    assert field_of(control_image=picture, control_guidance_start=0.8, control_guidance_end=0.2) == (
        "control_guidance_start"
    )
    assert field_of(controlnet_conditioning_scale=0.5) == "controlnet_conditioning_scale"  # no image
