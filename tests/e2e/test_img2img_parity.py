"""Image-to-image end to end on the tiny model: the VAE encoder engine of the shared chain.

Parity: engines built from the non-quantized export must reproduce diffusers'
``StableDiffusion3Img2ImgPipeline`` (same weights, image, strength, seed; CFG; batch 2) within
2/255 per pixel, at two sizes and two strengths, from an input image of another size (so the
Lanczos resize is part of it). Then the request's faults: strength outside (0, 1] or too small for
the steps, an unreadable image, a size the engines can't take, engines without a VAE encoder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sd35trt.backends.onnxruntime import OrtEngine
from sd35trt.components import Component
from sd35trt.errors import RequestError
from sd35trt.run import run
from sd35trt.runtime.pipeline import GenerationRequest, Sd35Runtime
from sd35trt.runtime.png import read_png_parameters

pytestmark = pytest.mark.slow

PROMPT = "a red fox in the snow, watercolor"
MAX_PIXEL_DIFF = 2  # of 255


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def init_image():
    """A smooth 96x80 RGB image (not the generation size: diffusers resizes it, so must we)."""
    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x * 2.5, y * 3.0, 128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def engines_dir(unquantized_run):
    return unquantized_run / "engines"


@pytest.fixture(scope="module")
def runtime(engines_dir):
    with Sd35Runtime.load(engines_dir) as rt:
        yield rt


@pytest.fixture(scope="module")
def img2img_pipe(reference_pipe):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("height", "width", "strength"), [(128, 128, 0.6), (64, 128, 0.9)])
def test_engines_match_diffusers_img2img(
    runtime, img2img_pipe, tiny_config, init_image, height, width, strength
):
    import torch

    rt = tiny_config.runtime
    ours = runtime.generate(
        GenerationRequest(
            PROMPT, image=init_image, strength=strength, height=height, width=width, seed=5, num_images=2
        )
    )
    with torch.inference_mode():
        theirs = img2img_pipe(
            [PROMPT] * 2,
            image=[init_image] * 2,  # one copy per generator: image i from seed 5 + i
            strength=strength,
            height=height,
            width=width,
            num_inference_steps=rt.num_inference_steps,
            guidance_scale=rt.guidance_scale,
            negative_prompt=[rt.negative_prompt] * 2,
            max_sequence_length=rt.max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(5 + i) for i in range(2)],
        ).images
    p = ours.params
    # diffusers' own count of the steps it ran (its timesteps cut by strength)
    assert (p.strength, p.skip_layer_guidance) == (strength, None)
    assert p.denoising_steps == img2img_pipe.num_timesteps
    assert ours.timings.image_encoding_s > 0 and len(ours.timings.step_s) == p.denoising_steps
    diffs = [_max_diff(a, b) for a, b in zip(ours.images, theirs, strict=True)]
    print(f"\nimg2img parity {width}x{height} strength {strength}: max pixel difference {max(diffs)}/255")
    assert max(diffs) <= MAX_PIXEL_DIFF
    # Same initial image, different noise per image: a mixed-up batch would still "match".
    assert _max_diff(ours.images[0], ours.images[1]) > 10


def test_the_image_steers_the_result(runtime, init_image):
    request = {"prompt": PROMPT, "strength": 0.5, "seed": 8}
    a = runtime.generate(GenerationRequest(image=init_image, **request)).images[0]
    b = runtime.generate(GenerationRequest(image=init_image.transpose(Image.Transpose.ROTATE_180), **request))
    t2i = runtime.generate(GenerationRequest(PROMPT, seed=8)).images[0]
    assert _max_diff(a, b.images[0]) > 20 and _max_diff(a, t2i) > 20


def test_run_writes_png_recording_strength_and_image(engines_dir, init_image, tmp_path):
    source = tmp_path / "in.jpg"
    init_image.save(source, quality=95)
    out = run(engines_dir, PROMPT, image=source, strength=0.75, seed=3, out=tmp_path / "out.png")
    meta = read_png_parameters(out.paths[0])
    assert meta["strength"] == 0.75 and len(meta["init_image_sha256"]) == 64
    assert meta["skip_layer_guidance"] is None and meta["num_inference_steps"] == 8
    assert "image-to-image at strength 0.75" in out.report()
    again = run(engines_dir, PROMPT, image=source, strength=0.75, seed=3, out=tmp_path / "again.png")
    assert again.paths[0].read_bytes() == out.paths[0].read_bytes()


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"strength": 0.0}, "strength", r"strength 0 is outside \(0, 1\]"),
        ({"strength": 1.5}, "strength", r"strength 1.5 is outside \(0, 1\]"),
        ({"strength": float("nan")}, "strength", "not a finite number"),
        ({"strength": 1e-17}, "strength", "strength 1e-17 of 8 steps leaves no step to run"),
        ({"height": 100}, "height", "not a multiple of 16"),
        ({"width": 512}, "width", "outside the engines' range"),
    ],
)
def test_bad_img2img_requests_fail_before_any_engine_loads(
    engines_dir, init_image, tmp_path, monkeypatch, options, field, message
):
    def refuse(self):
        raise AssertionError(f"engine {self.name} was loaded for an invalid request")

    source = tmp_path / "in.png"
    init_image.save(source)
    monkeypatch.setattr(OrtEngine, "activate", refuse)
    with pytest.raises(RequestError, match=message) as err:
        run(engines_dir, PROMPT, image=source, out=tmp_path / "x.png", **options)
    assert err.value.field == field
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_skip_layer_guidance_asked_for_with_an_image_is_a_warning(runtime, init_image):
    result = runtime.generate(
        GenerationRequest(PROMPT, image=init_image, strength=0.3, skip_layer_guidance=True, seed=2)
    )
    assert result.params.skip_layer_guidance is None  # what ran is recorded
    assert result.warnings == (
        "skip_layer_guidance has no effect for image-to-image (diffusers' "
        "StableDiffusion3Img2ImgPipeline has none); it was not used",
    )


def test_strength_without_an_image_is_refused(runtime):
    with pytest.raises(RequestError, match="strength applies to image-to-image only") as err:
        runtime.validate(GenerationRequest(PROMPT, strength=0.5))
    assert err.value.field == "strength"


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_is_a_clear_error(engines_dir, init_image, tmp_path, content):
    bad = tmp_path / "bad.png"
    if content == "truncated":
        init_image.save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    reason = "a readable image" if content == "truncated" else "a PNG, JPEG or WebP image"
    with pytest.raises(RequestError, match=rf"image {bad} is not {reason}") as err:
        run(engines_dir, PROMPT, image=bad, out=tmp_path / "x.png")
    assert err.value.field == "image"
    with pytest.raises(RequestError, match="cannot be read") as err:
        run(engines_dir, PROMPT, image=tmp_path / "missing.png", out=tmp_path / "x.png")


def test_engines_without_a_vae_encoder_still_run_text_to_image(engines_dir, init_image, tmp_path):
    old = tmp_path / "engines"
    shutil.copytree(engines_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["engines"][Component.VAE_ENCODER.value]  # as built before image-to-image existed
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "vae_encoder.onnx").unlink()
    with Sd35Runtime.load(old) as rt:
        assert len(rt.generate(GenerationRequest(PROMPT, seed=1)).images) == 1
        with pytest.raises(RequestError, match="have no vae_encoder engine") as err:
            rt.validate(GenerationRequest(PROMPT, image=init_image))
    assert err.value.field == "image"
