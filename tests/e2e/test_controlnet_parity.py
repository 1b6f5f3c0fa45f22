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


def _run_dir(tiny_config, tmp_path_factory, name: str, settings) -> object:
    """Export and build (ONNX Runtime, no FP8) the tiny model with ``settings(parent)``'s
    ControlNets once per session (``parent``: where ControlNet directories may be written)."""
    from filelock import FileLock

    from sd35trt.config import Backend
    from sd35trt.stages.build import build
    from sd35trt.stages.export import export

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    run_dir = base / f"shared-run-controlnet-{name}" / "tiny"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir.parent / "stages.lock")):
        model = tiny_config.model.model_copy(update={"controlnet": settings(run_dir.parent)})
        export_settings = tiny_config.export.model_copy(update={"quantize": False})
        config = tiny_config.model_copy(update={"model": model, "export": export_settings})
        export(config, run_dir, progress=lambda _line: None)
        build(config, run_dir, Backend.ONNXRUNTIME, progress=lambda _line: None)
    return run_dir


def _saved_controlnet(path, seed: int, own_pos_embed: bool = True):
    """A tiny ControlNet saved at ``path`` (once)."""
    from sd35trt.models.tiny import tiny_controlnet

    if not path.is_dir():
        tiny_controlnet(seed=seed, own_pos_embed=own_pos_embed).save_pretrained(path)
    return path


def _single_run(tiny_config, tmp_path_factory, control_type: ControlType, layout: str):
    def settings(parent):
        # the large layout: a directory of its own, named by model.controlnet.path
        path = (
            None
            if layout == "sd3"
            else _saved_controlnet(parent / "controlnet", tiny_config.model.seed, False)
        )
        return ControlNetSettings(type=control_type, path=None if path is None else str(path))

    run_dir = _run_dir(tiny_config, tmp_path_factory, f"{control_type.value}-{layout}", settings)
    folder = run_dir / "model" / "controlnet" if layout == "sd3" else run_dir.parent / "controlnet"
    return run_dir, folder


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join((case[0].value, case[1])))
def controlled(request, tiny_config, tmp_path_factory):
    """``(control type, run directory, runtime, diffusers ControlNet pipeline)`` per case; diffusers
    loads the ControlNet itself (and lends a ``use_pos_embed: false`` one the transformer's
    positional embedding itself)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from sd35trt.models.loading import load_pipeline

    control_type, layout = request.param
    run_dir, folder = _single_run(tiny_config, tmp_path_factory, control_type, layout)
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


def _reference(pipe, tiny_config, control_image, guidance, scale, **window):
    import torch

    torch.manual_seed(SEED)  # the control images' posterior samples (global generator)
    with torch.inference_mode():
        return pipe(
            PROMPT,
            control_image=control_image,
            controlnet_conditioning_scale=scale,
            **window,
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
        assert ours.params.control[0].image_sha256 in params
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


# Two ControlNets in one engine set (diffusers' SD3MultiControlNetModel): the built-in canny one and
# a blur one of another seed, named by path.
BLUR_SEED_OFFSET = 1


@pytest.fixture(scope="module")
def two_nets(tiny_config, tmp_path_factory):
    """``(runtime, canny ControlNet, blur ControlNet, base pipeline)`` of engines built with both."""
    from diffusers import SD3ControlNetModel

    from sd35trt.models.loading import load_pipeline

    def settings(parent):
        blur = _saved_controlnet(parent / "blur", tiny_config.model.seed + BLUR_SEED_OFFSET)
        return (
            ControlNetSettings(type=ControlType.CANNY),
            ControlNetSettings(type=ControlType.BLUR, path=str(blur)),
        )

    run_dir = _run_dir(tiny_config, tmp_path_factory, "canny+blur", settings)
    base = load_pipeline(tiny_config, run_dir, device="cpu")
    nets = [
        SD3ControlNetModel.from_pretrained(folder, use_safetensors=True)
        for folder in (run_dir / "model" / "controlnet", run_dir.parent / "blur")
    ]
    with Sd35Runtime.load(run_dir / "engines") as rt:
        assert rt.info.limits.controlnets == (ControlType.CANNY, ControlType.BLUR)  # one engine each
        yield rt, *nets, base


def _pipeline(base, nets):
    from diffusers import StableDiffusion3ControlNetPipeline

    pipe = StableDiffusion3ControlNetPipeline(
        **base.components, controlnet=nets if len(nets) > 1 else nets[0]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _made(picture, control_type):
    return preprocess(picture.resize((W, H), resample=Image.Resampling.LANCZOS), control_type)


@pytest.mark.parametrize("guidance", [4.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.3, 0.8)], ids=["1.0-0.5", "0.3-0.8"])
def test_two_controlnets_match_diffusers_multi_controlnet(two_nets, tiny_config, picture, guidance, scales):
    rt, canny, blur, base = two_nets
    ours = rt.generate(
        GenerationRequest(
            PROMPT, control_image=[picture, picture], controlnet_conditioning_scale=list(scales),
            guidance_scale=guidance, height=H, width=W, seed=SEED, num_inference_steps=STEPS,
        )
    )  # fmt: skip
    images = [_made(picture, ControlType.CANNY), _made(picture, ControlType.BLUR)]
    theirs = _reference(_pipeline(base, [canny, blur]), tiny_config, images, guidance, list(scales))
    assert _max_diff(ours.images[0], theirs) <= MAX_PIXEL_DIFF
    if scales == (1.0, 0.5) and guidance > 1:
        # the second net changes the result (summing only the first would match nothing here)
        (first,) = [c for c in ours.params.control if c.control_type is ControlType.CANNY]
        alone = rt.generate(
            GenerationRequest(
                PROMPT, control_image=picture, control_type="canny", guidance_scale=guidance,
                height=H, width=W, seed=SEED, num_inference_steps=STEPS,
            )
        )  # fmt: skip
        assert first.conditioning_scale == 1.0
        assert _max_diff(ours.images[0], alone.images[0]) > 4 * MAX_PIXEL_DIFF
        recorded = ours.images[0].info[PARAMETERS_KEY]  # every control image, its type, scale, window
        for c in ours.params.control:
            assert c.image_sha256 in recorded and c.control_type.value in recorded


def test_two_controlnets_with_their_own_guidance_windows(two_nets, tiny_config, picture):
    rt, canny, blur, base = two_nets
    window = {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]}
    ours = rt.generate(
        GenerationRequest(
            PROMPT, control_image=[picture, picture], controlnet_conditioning_scale=[1.0, 0.8],
            guidance_scale=4.5, height=H, width=W, seed=SEED, num_inference_steps=STEPS, **window,
        )
    )  # fmt: skip
    images = [_made(picture, ControlType.CANNY), _made(picture, ControlType.BLUR)]
    theirs = _reference(_pipeline(base, [canny, blur]), tiny_config, images, 4.5, [1.0, 0.8], **window)
    assert _max_diff(ours.images[0], theirs) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("control_type", [ControlType.BLUR, ControlType.CANNY])
def test_one_of_two_controlnets_equals_the_single_controlnet_pipeline(
    two_nets, tiny_config, picture, control_type
):
    rt, canny, blur, base = two_nets
    ours = rt.generate(
        GenerationRequest(
            PROMPT, control_image=picture, control_type=control_type.value, controlnet_conditioning_scale=0.7,
            guidance_scale=4.5, height=H, width=W, seed=SEED, num_inference_steps=STEPS,
        )
    )  # fmt: skip
    net = canny if control_type is ControlType.CANNY else blur
    theirs = _reference(_pipeline(base, [net]), tiny_config, _made(picture, control_type), 4.5, 0.7)
    assert _max_diff(ours.images[0], theirs) <= MAX_PIXEL_DIFF


def test_two_controlnet_request_faults_name_field_and_index(two_nets, picture):
    rt = two_nets[0]

    def fault(**kwargs) -> RequestError:
        with pytest.raises(RequestError) as err:
            rt.validate(GenerationRequest(PROMPT, height=H, width=W, **kwargs))
        assert "\n" not in str(err.value)
        return err.value

    err = fault(control_image=[picture, picture], control_type=["canny", "depth"])
    assert err.field == "control_type" and "control_type[1] depth" in str(err)
    err = fault(control_image=[picture, picture], control_type=["blur", "blur"])
    assert err.field == "control_type" and "also control_type[0]" in str(err)
    err = fault(control_image=[picture, picture], controlnet_conditioning_scale=[0.5, 0.5, 0.5])
    assert err.field == "controlnet_conditioning_scale"
    err = fault(control_image=[picture, picture], controlnet_conditioning_scale=[0.5, 3.0])
    assert err.field == "controlnet_conditioning_scale" and "[1] 3 is outside" in str(err)
