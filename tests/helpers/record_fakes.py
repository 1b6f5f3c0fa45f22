"""Fabricated stage-record details, for tests of the manifest logic that need valid records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sd35trt.artifacts.records import (
    BuildDetails,
    BuildMachine,
    BuiltEngine,
    CalibrateDetails,
    CalibrationQuality,
    ExportDetails,
    ExportedComponent,
    QuantizerCounts,
    Stage,
    TensorSignature,
    ValidationStatus,
)
from sd35trt.components import Component, ModelDims, QuantizerKind, exported_components
from sd35trt.config import Backend, Precision

DIMS = ModelDims(
    clip_l_hidden=8,
    clip_l_projection=6,
    clip_g_hidden=12,
    clip_g_projection=10,
    t5_hidden=16,
    latent_channels=4,
    patch_size=2,
    num_layers=2,
    head_dim=4,
    num_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    pos_embed_max_size=8,
    vae_scale_factor=8,
    vae_scaling_factor=1.5,
    vae_shift_factor=0.1,
)
#: Dims of the fabricated engine manifests (CLIP widths equal: no padding to exercise there).
ENGINE_DIMS = dataclasses.replace(DIMS, clip_l_projection=8, clip_g_hidden=8, clip_g_projection=8)


def calibrate_details(**changes) -> CalibrateDetails:
    counts = {k: 1 for k in QuantizerKind}
    fields = {
        "calibration_file": "calibrate/amax.safetensors",
        "prompts_file": "calibration_prompts/calibration.txt",
        "prompt_set_sha256": "a" * 64,
        "num_prompts": 4,
        "heldout_prompt_set_sha256": "b" * 64,
        "seeds": (0, 1),
        "report_seeds": (0,),
        "steps": 2,
        "report_steps": 2,
        "guidance_scale": 4.5,
        "negative_prompt": "",
        "max_sequence_length": 8,
        "batch_size": 2,
        "height": 64,
        "width": 64,
        "device": "cpu",
        "dtype": "float32",
        "summary": QuantizerCounts(enabled=counts, disabled=counts, high_precision_linears=("proj_out",)),
        "report": CalibrationQuality(
            steps=2, metric="relative error", overall_mean_error=0.01, mean_psnr_db=None, mean_ssim=1.0
        ),
        "elapsed_s": 1.5,
        "peak_memory_bytes": 1 << 20,
        "peak_memory_kind": "process peak RSS",
    }
    return CalibrateDetails(**{**fields, **changes})


def exported_component(component: Component, **changes) -> ExportedComponent:
    fields = {
        "onnx": f"onnx/{component.value}.onnx",
        "external_data": None,
        "precision": Precision.FP32,
        "quantized": False,
        "inputs": {"x": TensorSignature(dtype="float32", shape=("batch", 4))},
        "outputs": {"y": TensorSignature(dtype="float32", shape=("batch", 4))},
        "validation": ValidationStatus.PASSED,
    }
    if component is Component.TRANSFORMER:
        fields.update(
            onnx_unquantized=None, onnx_unquantized_external_data=None, fp8_weights=False, fp32_blocks=()
        )
    return ExportedComponent(**{**fields, **changes})


def export_details(model_dir: Path = Path("model"), **changes) -> ExportDetails:
    fields = {
        "model_dir": model_dir,
        "dims": DIMS,
        "opset": 19,
        "skip_layers": (),
        "max_sequence_length": 8,
        "report": "onnx/export_report.json",
        "calibration": None,
        "components": {c: exported_component(c) for c in exported_components()},
    }
    return ExportDetails(**{**fields, **changes})


def build_details(**changes) -> BuildDetails:
    fields = {
        "backend": Backend.ONNXRUNTIME,
        "backend_reason": "asked for",
        "engines_manifest": "engines/manifest.json",
        "components": {
            c: BuiltEngine(
                engine=f"engines/{c.value}.onnx", precision=Precision.FP32, fp8=False, build_seconds=0.1
            )
            for c in exported_components()
        },
        "machine": BuildMachine(tensorrt_version=None, gpu_name=None, compute_capability=None),
    }
    return BuildDetails(**{**fields, **changes})


def details(stage: Stage):
    """Valid details of ``stage`` whose contents do not matter to the test."""
    return {Stage.CALIBRATE: calibrate_details, Stage.EXPORT: export_details, Stage.BUILD: build_details}[
        stage
    ]()


def onnx_model_bytes(values: int, external_location: str | None = None) -> bytes:
    """A real ONNX model (``y = x + w``, ``w`` of ``values`` floats) standing in for an engine file.

    With ``external_location`` the weights are an external-data reference to that location
    (offset 0, ``4 * values`` bytes), as a crafted artefact would point at a file elsewhere.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(values, dtype=np.float32), "w")
    if external_location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", str(4 * values))):
            w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "stand_in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [values])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()
