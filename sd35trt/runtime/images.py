"""Input images (image-to-image): one reader for ``run --image``, HTTP and Triton ``init_image``.

Input files are untrusted: a few KB can declare tens of millions of pixels, Pillow knows dozens
of formats (some reach external programs), and a corrupt file can raise almost any exception
from a decoder.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

from sd35trt.errors import RequestError, first_line

#: Input images above this many pixels (2^25 = 33.5 M, more than a 24 MP camera's 6000 x 4000)
#: are refused before they are decoded into memory: a few KB of PNG can declare 67 M pixels, which
#: decode into hundreds of MB (Pillow's own decompression-bomb limit is about 179 M).
MAX_IMAGE_PIXELS = 2**25
#: Input image formats (Pillow's names), as documented; no other decoder is ever run.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def read_image(source: bytes | str | Path, field_name: str = "image") -> Any:
    """Decode an input image file into a PIL image, as diffusers' ``load_image`` reads it.

    - formats: :data:`IMAGE_FORMATS` only (PNG, JPEG, WebP), recognised from the file's first
      bytes before any decoder runs; other formats (TIFF, BMP, DDS, EPS, ...) are refused;
    - size: at most :data:`MAX_IMAGE_PIXELS` pixels, read from the header before decoding;
    - EXIF orientation applied (``PIL.ImageOps.exif_transpose``, as ``load_image`` does), so the
      pixels, and the sha256 recorded of them (``init_image_sha256``), are the upright image;
    - 16-bit greyscale (``I;16``, ``I``) scaled to 8 bits (``round(v / 257)``; Pillow's own
      conversion clips it, turning mid-grey white).

    Args:
        source: the file's bytes, or its path.
        field_name: the request field, for the error.

    Returns:
        A fully loaded PIL image (mode ``L`` for 16-bit greyscale, else as decoded).

    Raises:
        RequestError: the file is missing, not PNG/JPEG/WebP, corrupt or truncated, or over
            :data:`MAX_IMAGE_PIXELS` (one line, whatever Pillow raised).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    what = f"{source}" if isinstance(source, str | Path) else f"{len(source)} bytes"
    try:
        handle = open(source, "rb") if isinstance(source, str | Path) else io.BytesIO(source)  # noqa: SIM115
    except OSError as err:
        raise RequestError(field_name, f"{field_name} {what} cannot be read: {err.strerror}") from None
    with handle:
        try:
            image = Image.open(handle, formats=IMAGE_FORMATS)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    field_name,
                    f"{field_name} {what} is {image.width}x{image.height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS} allowed",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
        except UnidentifiedImageError:
            raise RequestError(
                field_name, f"{field_name} {what} is not a PNG, JPEG or WebP image (the formats accepted)"
            ) from None
        except (
            Image.DecompressionBombError,
            OSError,  # truncated data, decoder errors
            SyntaxError,  # Pillow's "broken PNG file", bad chunks
            ValueError,
            NotImplementedError,
            EOFError,
            IndexError,
            struct.error,
        ) as err:
            reason = first_line(err)[:200]
            raise RequestError(
                field_name, f"{field_name} {what} is not a readable image ({reason})"
            ) from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np

        grey = np.asarray(image, dtype=np.float64)  # [H, W] in 0..65535
        image = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image
