"""Image similarity metrics on 8-bit RGB images (``uint8 [H, W, 3]`` numpy arrays), so calibration
reports and ``sd35trt eval`` compute PSNR and SSIM the same way (data range 255)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    import numpy as np

    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            shape = getattr(x, "shape", None)
            dtype = getattr(x, "dtype", type(x).__name__)
            raise ValueError(f"image {name} must be a uint8 [H, W, 3] array, got {dtype} {shape}")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] (``[..., H, W, 3]``) to 8-bit, rounding to nearest."""
    import numpy as np

    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of ``b`` against the reference ``a`` in dB (peak 255; ``math.inf``
    for identical images); both uint8 ``[H, W, 3]``.

    Raises:
        ValueError: the arrays are not uint8 RGB images of one shape.
    """
    import numpy as np

    _check_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of ``b`` against the reference ``a`` (scikit-image, 7x7 windows, data
    range 255): the mean over the image and its channels, in [-1, 1]; both uint8 ``[H, W, 3]``.

    Raises:
        ValueError: the arrays are not uint8 RGB images of one shape, or are smaller than 7x7.
    """
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels, got {a.shape[0]}x{a.shape[1]}")
    return float(structural_similarity(a, b, data_range=255, channel_axis=-1))
