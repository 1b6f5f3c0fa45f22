"""A real TensorRT-RTX build of the tiny model with its ControlNet (``make test-rtx``).

The built-in tiny ControlNet (canny) through FP8 calibration (with the ControlNet's residuals in
the loop), export with the transformer in BF16 (so the ControlNet is too: it takes the
transformer's precision, without FP8) and the ``tensorrt-rtx`` build, no GPU needed. Checked from
the engine manifest and the builders' logs: every engine built, the transformer's FP8 proof with
its ``controlnet_block_samples`` input live, the ControlNet engine in BF16 with no FP8 GEMM, and
``sd35trt inspect``'s lines. Small calibration (2 prompts x 2 steps): the build is what is tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sd35trt.artifacts.engine_manifest import read_engine_manifest
from sd35trt.backends.layers import quantized_linear_nodes
from sd35trt.components import CONTROLNET_INPUT, Component, exported_components
from sd35trt.config import Backend, ControlNetSettings, ControlType, Precision
from sd35trt.stages.build import build, onnx_inputs
from sd35trt.stages.export.steps import component_precision

pytestmark = pytest.mark.tensorrt_rtx

trt = pytest.importorskip("tensorrt_rtx")

CONTROLNET_BLOCKS = 2  # the tiny ControlNet's num_layers (sd35trt.models.tiny.tiny_controlnet)


@pytest.fixture(scope="module")
def config(tiny_config):
    """The tiny config with ``model.controlnet: {type: canny}``, a BF16 transformer export."""
    cal = tiny_config.calibrate.model_copy(update={"num_prompts": 2, "steps": 2, "report_prompts": 1})
    precision = tiny_config.export.precision.model_copy(update={"transformer": Precision.BF16})
    return tiny_config.model_copy(
        update={
            "model": tiny_config.model.model_copy(
                update={"controlnet": ControlNetSettings(type=ControlType.CANNY)}
            ),
            "calibrate": cal,
            "export": tiny_config.export.model_copy(update={"precision": precision}),
        }
    )


@pytest.fixture(scope="module")
def rtx_controlnet_run(config, tmp_path_factory) -> Path:
    from sd35trt.stages.calibrate import calibrate
    from sd35trt.stages.export import export

    run_dir = tmp_path_factory.mktemp("rtx-controlnet") / "tiny"
    calibrate(config, run_dir, log=lambda _line: None)
    export(config, run_dir, progress=lambda _line: None)
    build(config, run_dir, Backend.TENSORRT_RTX, progress=lambda _line: None)
    return run_dir


def test_every_engine_is_built_with_the_controlnet(rtx_controlnet_run):
    manifest = read_engine_manifest(rtx_controlnet_run / "engines")
    assert manifest.backend is Backend.TENSORRT_RTX
    assert Component.CONTROLNET_CANNY in manifest.engines
    assert set(manifest.engines) == set(exported_components(cache=False, controlnets=(ControlType.CANNY,)))
    for rec in manifest.engines.values():
        plan = (rtx_controlnet_run / "engines" / rec.file.path).read_bytes()
        assert len(plan) == rec.file.size > 100_000  # a compiled plan, not a placeholder
        assert rec.compute_capabilities == ((8, 9), (12, 0)) and rec.tensorrt_version == trt.__version__
    # the manifest records the ControlNet: its engine by type, and the residuals the transformer takes
    assert manifest.engines[Component.TRANSFORMER].controlnet_layers == CONTROLNET_BLOCKS
    spec = manifest.spec(Component.TRANSFORMER)
    assert CONTROLNET_INPUT in {t.name for t in spec.inputs}


def test_the_transformer_fp8_proof_covers_every_quantized_matmul_with_the_residual_input(rtx_controlnet_run):
    run = rtx_controlnet_run
    source = run / "onnx" / "transformer.onnx"
    inputs, _ = onnx_inputs(source)
    assert inputs[CONTROLNET_INPUT][1] == CONTROLNET_BLOCKS  # [B, n, image_tokens, inner]
    rec = read_engine_manifest(run / "engines").engines[Component.TRANSFORMER]
    quantized = quantized_linear_nodes(source)
    layers = rec.layers
    assert rec.fp8 and len(quantized) == layers.quantized_linear > 0 and layers.fp8_complete
    assert sorted(n for v in layers.fp8_gemm_layers.values() for n in v) == sorted(quantized)
    assert set(layers.output_precisions) <= {"fp8", "bf16", "fp32", "int32", "int64"}
    assert layers.output_precisions.get("bf16", 0) > 0
    # the residual input is read by an engine layer, not dropped as dead (as the tiny SD3-layout
    # ControlNet's zeroed pooled_projections is: "Input Tensor ... is unused")
    log = (run / rec.options["build_log"]).read_text().splitlines()
    assert not any("unused" in line and CONTROLNET_INPUT in line for line in log)
    layer_inputs = [line.split("Outputs:")[0] for line in log if "LayerType:" in line]
    assert any(f"Name: {CONTROLNET_INPUT}, Dimensions" in line for line in layer_inputs)


def test_the_controlnet_engine_is_bf16_with_no_fp8_gemm(rtx_controlnet_run, config):
    run = rtx_controlnet_run
    rec = read_engine_manifest(run / "engines").engines[Component.CONTROLNET_CANNY]
    assert rec.precision is component_precision(config, Component.CONTROLNET_CANNY) is Precision.BF16
    assert not rec.fp8 and quantized_linear_nodes(run / "onnx" / "controlnet_canny.onnx") == []
    layers = rec.layers
    assert layers.detailed and layers.layers > 10 and layers.fp8_gemms == 0
    assert layers.output_precisions.get("bf16", 0) > 0 and "fp8" not in layers.output_precisions
    assert "fp32" not in layers.output_precisions  # BF16 throughout, as exported


def test_inspect_shows_the_controlnet(rtx_controlnet_run):
    from typer.testing import CliRunner

    from sd35trt.cli import app

    result = CliRunner().invoke(app, ["inspect", str(rtx_controlnet_run)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    engine = next(line for line in lines if "controlnet_canny.plan" in line and "built for" in line)
    assert "bf16, built for sm_89, sm_120" in engine and "fp8" not in engine
    assert (
        f"  controlnet: canny (controlnet_canny engine, bf16); the transformer takes their "
        f"{CONTROLNET_BLOCKS} block residuals as {CONTROLNET_INPUT}"
    ) in lines
    assert any("FP8 proof (builder log): every quantized MatMul is inside an FP8 GEMM" in x for x in lines)
