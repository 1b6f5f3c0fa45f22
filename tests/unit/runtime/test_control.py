"""ControlNet conditioning without engines: the request's checks, preprocessing, the window, the specs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from sd35trt.components import Component, profile, spec
from sd35trt.config import Architecture, ControlType, load_config
from sd35trt.errors import RequestError
from sd35trt.models.tiny import model_dims
from sd35trt.runtime.control import preprocess, resolve_control
from sd35trt.runtime.request import GenerationRequest

TINY = model_dims(Architecture.TINY)
SCALE = "controlnet_conditioning_scale"


def _picture(w: int = 64, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[(x > w // 4) & (x < 3 * w // 4) & (y > h // 4) & (y < 3 * h // 4)] = 255  # a white square
    return Image.fromarray(rgb)


def _resolve(built=(ControlType.CANNY,), **kwargs):
    return resolve_control(GenerationRequest("p", **kwargs), built, 64, 64)


def test_canny_marks_the_square_s_outline_and_nothing_else():
    edges = np.asarray(preprocess(_picture(), ControlType.CANNY))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()
    assert edges[32, 16, 0] == 255 or edges[32, 17, 0] == 255  # the left side of the square
    assert edges[32, 32, 0] == 0 and edges[2, 2, 0] == 0  # inside and outside: flat


def test_blur_smooths_and_depth_is_taken_as_given():
    pic = _picture(256, 256)
    blurred = np.asarray(preprocess(pic, ControlType.BLUR), dtype=np.int16)
    assert 0 < blurred[128, 64, 0] < 255  # the edge is smeared
    assert preprocess(pic, ControlType.DEPTH) is pic


def test_guidance_window_is_diffusers_controlnet_keep():
    (c,) = _resolve(control_image=_picture(), control_guidance_start=0.25, control_guidance_end=0.75)
    steps = 8
    keep = [c.keep(i, steps) for i in range(steps)]
    # diffusers: 1 - float(i / n < start or (i + 1) / n > end)
    assert keep == [1.0 - float(i / steps < 0.25 or (i + 1) / steps > 0.75) for i in range(steps)]
    assert keep == [0, 0, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"control_image": _picture(), "control_type": "depth"}, "control_type"),
        ({"control_image": _picture(), "control_type": "sketch"}, "control_type"),
        (
            {"control_image": _picture(), "controlnet_conditioning_scale": -0.1},
            "controlnet_conditioning_scale",
        ),
        (
            {"control_image": _picture(), "controlnet_conditioning_scale": float("nan")},
            "controlnet_conditioning_scale",
        ),
        ({"control_image": _picture(64, 32)}, "control_image"),
        ({"control_image": _picture().convert("F")}, "control_image"),
        ({"control_image": "pic.png"}, "control_image"),
        ({"control_image": _picture(), "control_guidance_end": 0.0}, "control_guidance_start"),
        ({"control_guidance_start": 0.1}, "control_guidance_start"),
    ],
)
def test_bad_control_fields_are_one_line_naming_the_field(kwargs, field):
    with pytest.raises(RequestError) as err:
        _resolve(**kwargs)
    assert err.value.field == field and "\n" not in str(err.value)


def test_engines_without_a_controlnet_refuse_a_control_image():
    with pytest.raises(RequestError, match="no controlnet engine") as err:
        resolve_control(GenerationRequest("p", control_image=_picture()), (), 64, 64)
    assert err.value.field == "control_image"


def test_the_transformer_takes_residuals_only_with_a_controlnet():
    build = load_config("configs/tiny.yaml").build
    plain = spec(Component.TRANSFORMER, TINY, 1)
    with_cn = spec(Component.TRANSFORMER, TINY, 1, controlnet=2)
    assert with_cn.input_names == [*plain.input_names, "controlnet_block_samples"]
    assert plain.output_names == with_cn.output_names
    residuals = with_cn.inputs[-1]
    assert residuals.shape == ("batch", 2, "image_tokens", TINY.num_heads * TINY.head_dim)
    assert spec(Component.CONTROLNET_CANNY, TINY, controlnet=2).outputs == (residuals,)
    ranges = profile(Component.TRANSFORMER, TINY, build, controlnet=2)
    latent = ranges["hidden_states"]
    tokens = ranges["controlnet_block_samples"]
    p2 = TINY.patch_size**2
    assert tokens.max[2] == latent.max[2] * latent.max[3] // p2
    assert tokens.min[2] == latent.min[2] * latent.min[3] // p2
    assert dataclasses.asdict(
        profile(Component.TRANSFORMER, TINY, build)["hidden_states"]
    ) == dataclasses.asdict(latent)


TWO = (ControlType.CANNY, ControlType.BLUR)


def test_lists_pair_images_with_types_and_one_value_applies_to_all():
    pic = _picture()
    canny, blur = _resolve(TWO, control_image=[pic, pic], controlnet_conditioning_scale=[1.0, 0.5])
    assert (canny.control_type, canny.conditioning_scale) == (ControlType.CANNY, 1.0)  # engines' order
    assert (blur.control_type, blur.conditioning_scale) == (ControlType.BLUR, 0.5)
    assert canny.image_sha256 == blur.image_sha256 and canny.image.tobytes() != blur.image.tobytes()
    first, second = _resolve(
        TWO, control_image=[pic, pic], control_type=["blur", "canny"], control_guidance_end=0.5
    )
    assert (first.control_type, second.control_type) == (ControlType.BLUR, ControlType.CANNY)
    assert first.guidance_end == second.guidance_end == 0.5
    # one of two built: the other is not run
    (only,) = _resolve(TWO, control_image=pic, control_type="blur")
    assert only.control_type is ControlType.BLUR
    assert _resolve(TWO) == ()


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (
            {"control_image": [_picture()]},
            "control_type",
            "1 control image(s) for engines with 2 ControlNet(s)",
        ),
        (
            {"control_image": [_picture()] * 2, "control_type": ["canny", "depth"]},
            "control_type",
            "control_type[1] depth",
        ),
        (
            {"control_image": [_picture()] * 2, "control_type": ["blur", "blur"]},
            "control_type",
            "control_type[1] blur is also control_type[0]",
        ),
        (
            {"control_image": [_picture()] * 2, "control_type": ["blur"]},
            "control_type",
            "1 value(s), control_image 2",
        ),
        (
            {"control_image": [_picture()] * 2, SCALE: [0.5, 2.5]},
            SCALE,
            "controlnet_conditioning_scale[1] 2.5 is outside",
        ),
        ({"control_image": [_picture()] * 2, SCALE: [0.5, 0.5, 0.5]}, SCALE, "has 3 values, control_image 2"),
        ({"control_image": [_picture(), _picture(64, 32)]}, "control_image", "control_image[1] is 64x32"),
        ({"control_image": []}, "control_image", "empty list"),
        (
            {
                "control_image": [_picture()] * 2,
                "control_guidance_start": [0.0, 0.6],
                "control_guidance_end": [1.0, 0.5],
            },
            "control_guidance_start",
            "control_guidance_start[1] 0.6 must be below control_guidance_end[1] 0.5",
        ),
    ],
)
def test_bad_lists_name_the_field_and_the_index(kwargs, field, message):
    with pytest.raises(RequestError) as err:
        _resolve(TWO, **kwargs)
    assert err.value.field == field and message in str(err.value) and "\n" not in str(err.value)


class _FakeControlNet:
    """An engine whose residuals are its ``value`` wherever the control latents are nonzero."""

    def __init__(self, value: float):
        self.value, self.calls = value, 0

    def infer(self, feeds):
        import torch

        self.calls += 1
        return {
            "controlnet_block_samples": torch.full((1, 2, 4, 8), self.value) * feeds["controlnet_cond"].sum()
        }


def test_residuals_are_the_scaled_sum_of_the_nets_inside_their_windows():
    import torch

    from sd35trt.runtime.control import ControlNetPass, ControlResiduals

    pic = _picture()
    canny, blur = _resolve(
        TWO,
        control_image=[pic, pic],
        controlnet_conditioning_scale=[1.0, 0.5],
        control_guidance_start=[0.0, 0.5],
    )
    a, b = _FakeControlNet(1.0), _FakeControlNet(10.0)
    ones = torch.ones(1, 1, 1, 1)
    residuals = ControlResiduals(
        (1, 2, 4, 8), "cpu", [ControlNetPass(a, canny, ones), ControlNetPass(b, blur, ones)]
    )
    x, t = torch.zeros(1), torch.zeros(1)
    assert torch.equal(residuals(0, 4, x, t), torch.full((1, 2, 4, 8), 1.0))  # blur's window not open yet
    assert b.calls == 0  # outside its window a net is not run
    assert torch.equal(residuals(2, 4, x, t), torch.full((1, 2, 4, 8), 1.0 + 0.5 * 10.0))
    assert torch.equal(ControlResiduals((1, 2, 4, 8), "cpu")(0, 4, x, t), torch.zeros(1, 2, 4, 8))
