"""Reading images a request gives (image-to-image's image, a ControlNet's control image)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sd35trt.errors import RequestError

#: Input images above this many pixels are refused before they are decoded into memory
#: (Pillow's own decompression-bomb limit is about 179 M).
MAX_IMAGE_PIXELS = 64 * 2**20


def read_image(source: bytes | str | Path, field_name: str = "image") -> Any:
    """Decode an image file (PNG, JPEG, WebP, ...) into a PIL image, fully loaded.

    Args:
        source: the file's bytes, or its path.
        field_name: the request field, for the error.

    Raises:
        RequestError: the file is missing, not an image, truncated, or over
            :data:`MAX_IMAGE_PIXELS` (checked before the pixels are decoded).
    """
    from PIL import Image, UnidentifiedImageError

    what = f"{source}" if isinstance(source, str | Path) else f"{len(source)} bytes"
    try:
        handle = open(source, "rb") if isinstance(source, str | Path) else io.BytesIO(source)  # noqa: SIM115
    except OSError as err:
        raise RequestError(field_name, f"{field_name} {what} cannot be read: {err.strerror}") from None
    with handle:
        try:
            image = Image.open(handle)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    field_name,
                    f"{field_name} {what} is {image.width}x{image.height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS} allowed",
                )
            image.load()
        except UnidentifiedImageError:
            raise RequestError(
                field_name, f"{field_name} {what} is not a readable image (unknown format)"
            ) from None
        except (Image.DecompressionBombError, OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RequestError(
                field_name, f"{field_name} {what} is not a readable image ({reason})"
            ) from None
    return image
