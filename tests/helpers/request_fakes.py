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


def engines_manifest(directory, backend=None):
    """Write ``directory/manifest.json``: the tiny model's engines as ``CONFIG`` builds them (the
    files themselves are absent: for what reads only the manifest). Returns the directory."""
    import json
    from pathlib import Path

    from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, EngineManifest, EngineRecord
    from sd35trt.artifacts.records import FileRecord
    from sd35trt.config import Backend, Precision

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    slg = CONFIG.runtime.skip_layer_guidance
    engines = {}
    for c in Component:
        skip = len(slg.layers) if c is Component.TRANSFORMER else 0
        engines[c] = EngineRecord(
            backend=backend or Backend.ONNXRUNTIME,
            file=FileRecord(f"{c.value}.onnx", 1, "0" * 64),
            precision=Precision.FP32,
            fp8=False,
            profile=profile(c, TINY, CONFIG.build, skip_layers=skip),
            source_onnx=FileRecord(f"onnx/{c.value}.onnx", 1, "0" * 64),
            build_seconds=0.1,
            skip_layers=skip,
        )
    manifest = EngineManifest(
        backend=backend or Backend.ONNXRUNTIME,
        engines=engines,
        dims=TINY,
        runtime_defaults=CONFIG.runtime,
        build_settings={},
        support_files=(),
    )
    (directory / ENGINE_MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    return directory
