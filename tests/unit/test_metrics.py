"""sd35trt.metrics: PSNR and SSIM on 8-bit RGB images."""

import math

import numpy as np
import pytest

from sd35trt.metrics import psnr, ssim, to_uint8


def _image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _perturbed(a, amplitude):
    noise = np.random.default_rng(1).integers(-amplitude, amplitude + 1, a.shape)
    return np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr(a, a) == math.inf
    # An error of 1 everywhere is an MSE of 1: 10 log10(255^2) = 48.13 dB.
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 192
    assert psnr(a, b) == pytest.approx(10 * math.log10(192), abs=1e-9)


def test_ssim_identical_is_one_and_drops_with_noise():
    a = _image()
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 41, a.shape), 0, 255).astype(
        np.uint8
    )
    slight = np.clip(a.astype(int) + np.random.default_rng(1).integers(-4, 5, a.shape), 0, 255).astype(
        np.uint8
    )
    assert 0.0 < ssim(a, noisy) < ssim(a, slight) < 1.0
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))


def test_bad_inputs_are_refused():
    a = _image()
    with pytest.raises(ValueError, match=r"differ in shape"):
        psnr(a, _image(size=16))
    with pytest.raises(ValueError, match=r"image b must be a uint8 \[H, W, 3\] array, got float32"):
        ssim(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"image a must be a uint8"):
        psnr(a[..., :1], a[..., :1])
    with pytest.raises(ValueError, match=r"at least 7x7"):
        ssim(a[:5, :5], a[:5, :5])


def test_to_uint8_rounds_and_clips():
    x = np.array([[[-0.5, 0.0, 0.6 / 255]], [[0.998, 1.0, 2.0]]], np.float32)
    assert to_uint8(x).tolist() == [[[0, 0, 1]], [[254, 255, 255]]]
