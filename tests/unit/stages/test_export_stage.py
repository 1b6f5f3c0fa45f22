"""Export stage decisions made before any tracing (no model needed)."""

from __future__ import annotations

from sd35trt.components import Component
from sd35trt.config import Precision
from sd35trt.stages.export.stage import _warn_slow_on_cpu


def _with_vae(tiny_config, precision: Precision):
    p = tiny_config.export.precision.model_copy(update={"vae_decoder": precision})
    return tiny_config.model_copy(update={"export": tiny_config.export.model_copy(update={"precision": p})})


def test_an_fp16_vae_exported_on_the_cpu_is_announced_naming_the_setting(tiny_config):
    """A full-size FP16 VAE decoder took hours to trace on a CPU (185 s per 8x8 latent in FP16)."""
    parts = (Component.CLIP_L, Component.VAE_DECODER, Component.VAE_ENCODER)
    lines: list[str] = []
    _warn_slow_on_cpu(_with_vae(tiny_config, Precision.FP16), parts, "cpu", lines.append)
    assert [line.split(" is ")[0] for line in lines] == ["warning: export.precision.vae_decoder"]
    assert lines[0].endswith("set export.precision.vae_decoder to fp32 or bf16")
    quiet: list[str] = []
    _warn_slow_on_cpu(_with_vae(tiny_config, Precision.FP16), parts, "cuda", quiet.append)
    _warn_slow_on_cpu(_with_vae(tiny_config, Precision.FP32), parts, "cpu", quiet.append)
    assert quiet == []
