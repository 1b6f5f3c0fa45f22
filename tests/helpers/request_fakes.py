"""Fabricated engine limits for request tests: the tiny model's profiles, no engines."""

from __future__ import annotations

from sd35trt.components import Component, profile, spec
from sd35trt.config import Architecture, config_from_dict
from sd35trt.models.tiny import model_dims
from sd35trt.runtime.request import RequestLimits

TINY = model_dims(Architecture.TINY)
CONFIG = config_from_dict(
    {
        "name": "t",
        "build": {
            "batch": {"min": 1, "opt": 1, "max": 2},
            "height": {"min": 64, "opt": 128, "max": 256},
            "width": {"min": 64, "opt": 128, "max": 192},
        },
        "runtime": {
            "num_inference_steps": 8,
            "guidance_scale": 4.5,
            "height": 128,
            "width": 128,
            "negative_prompt": "blurry",
            "skip_layer_guidance": {"layers": [1], "scale": 2.8, "start": 0.01, "stop": 0.2},
        },
    }
)


def limits(slg: bool = True, **build) -> RequestLimits:
    cfg = CONFIG.model_copy(update={"build": CONFIG.build.model_copy(update=build)}) if build else CONFIG
    n = 1 if slg else 0
    specs = {c: spec(c, TINY, n if c is Component.TRANSFORMER else 0) for c in Component}
    profiles = {
        c: profile(c, TINY, cfg.build, skip_layers=n if c is Component.TRANSFORMER else 0) for c in Component
    }
    return RequestLimits.from_profiles(
        specs, profiles, TINY, cfg.runtime.skip_layer_guidance if slg else None
    )
