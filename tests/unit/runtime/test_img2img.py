"""Image-to-image logic without engines: the strength's schedule against diffusers, image input checks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.components import Component, profile, spec
from sd35trt.config import Architecture, config_from_dict
from sd35trt.errors import RequestError
from sd35trt.models.tiny import model_dims
from sd35trt.runtime.images import read_image
from sd35trt.runtime.img2img import image_tensor, img2img_schedule
from sd35trt.runtime.request import GenerationRequest, RequestLimits, resolve_request
from sd35trt.runtime.scheduler import FlowMatchEuler

TINY = model_dims(Architecture.TINY)
CONFIG = config_from_dict(
    {
        "name": "t",
        "build": {
            "height": {"min": 64, "opt": 128, "max": 256},
            "width": {"min": 64, "opt": 128, "max": 256},
        },
        "runtime": {"steps": 8, "height": 128, "width": 128},
    }
)


def _limits(components=tuple(Component)) -> RequestLimits:
    specs = {c: spec(c, TINY) for c in components}
    profiles = {c: profile(c, TINY, CONFIG.build) for c in components}
    return RequestLimits.from_profiles(specs, profiles, TINY, None)


@pytest.mark.parametrize("steps", [4, 8, 28])
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.95, 1.0])
def test_schedule_is_diffusers_get_timesteps_and_scale_noise_sigma(steps, strength):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(steps)
    holder = StableDiffusion3Img2ImgPipeline.__new__(StableDiffusion3Img2ImgPipeline)
    holder.scheduler = theirs
    timesteps, count = StableDiffusion3Img2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    ours = img2img_schedule(FlowMatchEuler(shift=3.0), steps, strength)
    assert len(ours) == count == len(timesteps)
    assert torch.equal(ours.timesteps, timesteps)
    # scale_noise mixes at the sigma of the first kept step
    sample, noise = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    mixed = theirs.scale_noise(sample, timesteps[:1], noise)
    assert mixed.item() == ours.sigmas[0].item()


def test_image_tensor_is_diffusers_pil_to_numpy():
    from diffusers.image_processor import VaeImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=32, width=48)  # [-1, 1]
    assert torch.equal(2.0 * image_tensor(image) - 1.0, theirs)


def test_image_is_made_rgb_and_resized_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    params = resolve_request(
        GenerationRequest("a cat", image=rgb.convert("RGBA"), strength=0.5, width=64, height=96, seed=1),
        _limits(),
        CONFIG.runtime,
    )
    assert params.image.size == (64, 96) and params.image.mode == "RGB" and params.strength == 0.5
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(rgb, height=96, width=64)
    assert torch.equal(2.0 * image_tensor(params.image) - 1.0, theirs)
    assert params.to_json()["init_image_sha256"] == params.image_sha256 and "image" not in params.to_json()
    default = resolve_request(GenerationRequest("a cat", image=rgb, seed=1), _limits(), CONFIG.runtime)
    assert default.strength == 0.6 and default.image.size == (128, 128)  # the engines' default size
    assert default.batch_key != params.batch_key


def test_image_to_image_needs_a_vae_encoder_engine():
    without = _limits(tuple(c for c in Component if c.required))
    assert without.img2img_size is None and _limits().img2img_size == ((64, 256), (64, 256))
    with pytest.raises(RequestError, match="have no vae_encoder engine") as err:
        resolve_request(GenerationRequest("a cat", image=Image.new("RGB", (8, 8))), without, CONFIG.runtime)
    assert err.value.field == "image"


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (Pillow reads sizes before pixels)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_read_image_refuses_bombs_and_garbage_before_decoding():
    with pytest.raises(
        RequestError, match=r"init_image .* is 9000x9000 pixels, more than the \d+ allowed"
    ) as err:
        read_image(_png_claiming(9000, 9000), "init_image")
    assert err.value.field == "init_image"
    with pytest.raises(RequestError, match=r"not a readable image \(Image size .* decompression bomb"):
        read_image(_png_claiming(20000, 20000))  # Pillow's own limit, before ours is reached
    with pytest.raises(RequestError, match=r"image 5 bytes is not a PNG, JPEG or WebP image"):
        read_image(b"hello")
    ok = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(ok, format="PNG")
    assert read_image(ok.getvalue()).size == (3, 2)
