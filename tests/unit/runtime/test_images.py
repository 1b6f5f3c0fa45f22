"""The one reader of input images (``run --image``, HTTP and Triton ``init_image``), faults.md #33.

Real files, built byte for byte (:mod:`bad_images`): every corrupt file or other format is one
:class:`RequestError` naming the field, EXIF orientation and 16-bit greyscale are read as
diffusers' ``load_image`` would want them, and the CLI says it in one line.
"""

from __future__ import annotations

import hashlib
import io

import bad_images
import numpy as np
import pytest
from PIL import Image, ImageOps

from sd35trt.errors import RequestError
from sd35trt.runtime.images import MAX_IMAGE_PIXELS, read_image


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (bad_images.broken_chunk_png(), r"is not a readable image \(broken PNG file"),  # SyntaxError
        (bad_images.dds(), "is not a PNG, JPEG or WebP image"),  # NotImplementedError before
        (bad_images.ccitt_tiff(), "is not a PNG, JPEG or WebP image"),
        (bad_images.bmp(), "is not a PNG, JPEG or WebP image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "is not a PNG, JPEG or WebP image"),
        (
            bad_images.one_bit_png(8192, 8191),
            rf"is 8192x8191 pixels, more than the {MAX_IMAGE_PIXELS} allowed",
        ),
    ],
    ids=["syntax-error-png", "dds", "ccitt-tiff", "bmp", "eps", "1-bit-bomb"],
)
def test_corrupt_files_and_other_formats_are_one_request_error(data, text):
    """faults.md #33: a corrupt PNG raised SyntaxError, a DDS NotImplementedError (500 + traceback);
    TIFF, BMP, EPS (Ghostscript) and the rest of Pillow's formats were decoded."""
    with pytest.raises(RequestError, match=rf"^init_image {len(data)} bytes {text}") as err:
        read_image(data, "init_image")
    assert err.value.field == "init_image" and "\n" not in str(err.value)


def test_exif_orientation_is_applied_as_diffusers_load_image_does():
    """faults.md #33: a phone photo (EXIF orientation 6) went in sideways."""
    from diffusers.utils import load_image

    data = bad_images.exif_rotated_jpeg(160, 96)
    ours = read_image(data)
    assert ours.size == (96, 160)  # upright: stored 160x96, shown rotated 90 degrees
    theirs = load_image(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs))


def test_the_recorded_sha256_is_of_the_upright_pixels(tmp_path):
    from test_img2img import CONFIG, _limits

    from sd35trt.runtime.request import GenerationRequest, resolve_request

    data = bad_images.exif_rotated_jpeg(160, 96)
    params = resolve_request(
        GenerationRequest("a cat", image=read_image(data), strength=0.5, width=96, height=160, seed=1),
        _limits(),
        CONFIG.runtime,
    )
    upright = Image.open(io.BytesIO(data))
    upright = ImageOps.exif_transpose(upright).convert("RGB")  # already 96x160: no resize
    assert params.image_sha256 == hashlib.sha256(upright.tobytes()).hexdigest()


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32896, 128), (65535, 255), (257 * 37, 37)])
def test_16_bit_greyscale_is_scaled_to_8_bits(value, expected):
    """faults.md #33: a 16-bit greyscale PNG at mid-grey became pure white (Pillow clips I;16 to 255)."""
    data = bad_images.grey16_png(value)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = read_image(data)
    assert image.mode == "L"
    assert set(np.asarray(image.convert("RGB")).ravel().tolist()) == {expected}


def test_run_refuses_a_corrupt_image_as_a_user_error(tmp_path):
    """faults.md #33: ``sd35trt run --image broken.png`` printed a SyntaxError traceback; now it is
    a user error (``main()`` prints those as one line, exit 1). The image is read before any
    engine loads, so an empty engines directory is enough."""
    from typer.testing import CliRunner

    from sd35trt.cli import app

    bad = tmp_path / "broken.png"
    bad.write_bytes(bad_images.broken_chunk_png())
    result = CliRunner().invoke(app, ["run", "a cat", "--engines", str(tmp_path), "--image", str(bad)])
    assert isinstance(result.exception, RequestError), result.exception
    assert str(result.exception) == (
        f"image {bad} is not a readable image (broken PNG file (chunk b'\\x00\\x01\\x02\\x03'))"
    )
