"""TensorRT-RTX backend logic: the builder-log layer report on real captured builds, targets,
machine checks. No ``tensorrt_rtx`` needed (``test_tensorrt_rtx_build.py`` builds for real).

``data/rtx/transformer_tiny_sm89.log`` is what the backend's logger kept from a real TensorRT-RTX
1.7.1.116 build (no GPU) of the tiny FP8 transformer for compute capability 8.9;
``transformer_tiny.quantized.json`` the quantized MatMuls of that ONNX (``quantized_linear_nodes``);
``transformer_medium_excerpt.log`` the layer lines naming blocks 0 and 1 and the memory totals of
the full-size SD3.5-medium FP8 transformer's build (``scripts/rtx_fullsize.py --excerpt``), with
those blocks' quantized MatMuls, as the ONNX lists them, in ``transformer_medium_excerpt.quantized.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd35trt.artifacts.engine_manifest import EngineRecord
from sd35trt.artifacts.manifest import FileRecord
from sd35trt.backends.layers import LayerInfoError, Precision, parse_builder_log, quantized_linear_nodes
from sd35trt.backends.machine import GpuInfo, MachineInfo
from sd35trt.backends.tensorrt_rtx import TensorRTRtxBackend, build_targets, check_targets
from sd35trt.components import Component
from sd35trt.config import Backend, BuildSettings, ComputeCapability, config_from_dict
from sd35trt.config import Precision as Dtype
from sd35trt.errors import BuildError, ConfigError
from sd35trt.stages.build import check_fp8

DATA = Path(__file__).resolve().parents[1] / "data" / "rtx"
TINY_LOG = DATA / "transformer_tiny_sm89.log"
VERSION = "1.7.1.116"


def _quantized(name: str) -> list[str]:
    return json.loads((DATA / name).read_text())


def test_tiny_build_log_accounts_for_every_quantized_matmul_in_fp8_gemms():
    log = parse_builder_log(TINY_LOG.read_text())
    quantized = _quantized("transformer_tiny.quantized.json")
    report = log.report(quantized)
    gemms = [layer for layer in log.layers if layer.layer_type == "gemm"]
    # Measured on the real build: 35 GEMM layers, 29 reading FP8 activations and FP8 weights.
    assert (report.layers, len(gemms), report.fp8_gemms, report.quantized_linear) == (120, 35, 29, 43)
    assert report.fp8_complete and report.fell_back == [] and report.source == "builder log"
    # Every quantized MatMul sits in exactly one FP8 GEMM; q/k/v projections share one.
    inside = [n for nodes in report.fp8_gemm_layers.values() for n in nodes]
    assert sorted(inside) == sorted(quantized)
    fused = [nodes for nodes in report.fp8_gemm_layers.values() if len(nodes) == 3]
    assert fused and all(
        {n.rsplit("/", 2)[-2] for n in nodes}
        <= {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
        for nodes in fused
    )
    # The 6 other GEMMs are attention's two matrix products, in float.
    plain = [g for g in gemms if not g.is_fp8_gemm]
    assert len(plain) == 6 and all(Precision.FP8 not in g.inputs for g in plain)
    assert (report.activation_bytes, report.weights_bytes) == (24310784, 348804)
    assert report.output_precisions["fp8"] > 0 and report.output_precisions["fp32"] > 0


def test_a_matmul_outside_fp8_gemms_is_named_and_refused():
    text = TINY_LOG.read_text()
    # The builder log of a build where to_out.0 of block 1 ran in float: its GEMM reads Float.
    victim = next(
        line
        for line in text.splitlines()
        if line.startswith("Name: /transformer/transformer_blocks.1/attn/to_out.0")
    )
    text = text.replace(victim, victim.replace("Datatype: FP8", "Datatype: Float"))
    report = parse_builder_log(text).report(_quantized("transformer_tiny.quantized.json"))
    assert report.fell_back == ["/transformer/transformer_blocks.1/attn/to_out.0/MatMul"]
    with pytest.raises(
        BuildError, match=r"1 fell back to higher precision \(/transformer/transformer_blocks\.1/attn/"
    ):
        check_fp8(Component.TRANSFORMER, report, "onnx/transformer.onnx", allow_partial=False)


def test_onnx_node_names_match_exactly_not_by_prefix():
    line = (
        "Name: g, LayerType: gemm, Inputs: [ { Name: a, Dimensions: [2,4], Datatype: FP8, Format: x }], "
        "Constants: [ { Name: w, Dimensions: [4,4], Datatype: FP8, Format: x }], Outputs: [ { Name: y, "
        "Dimensions: [2,4], Datatype: BFloat16, Format: x }], TacticName: t, StreamId: 0, "
        "Metadata: [ONNX Layer: /blk/ff/MatMul_1]"
    )
    report = parse_builder_log(f"[V] Layers:\n{line}\n").report(["/blk/ff/MatMul", "/blk/ff/MatMul_1"])
    assert report.fell_back == ["/blk/ff/MatMul"] and report.output_precisions == {"bf16": 1}


def test_fp8_activations_with_float_weights_are_no_fp8_gemm():
    line = (
        "Name: g, LayerType: gemm, Inputs: [ { Name: a, Datatype: FP8 }], Constants: [ { Name: w, "
        "Datatype: BFloat16 }], Outputs: [ { Name: y, Datatype: BFloat16 }], TacticName: t, StreamId: 0, "
        "Metadata: [ONNX Layer: /m/MatMul]"
    )
    assert parse_builder_log(f"[V] Layers:\n{line}\n").report(["/m/MatMul"]).fell_back == ["/m/MatMul"]


@pytest.mark.parametrize(
    "text",
    ["[I] Total Activation Memory: 5 bytes\n", "[V] Layers:\nName: broken line without fields\n"],
)
def test_a_log_without_a_readable_layers_section_is_an_error(text):
    with pytest.raises(LayerInfoError):
        parse_builder_log(text)


def test_medium_excerpt_shows_fp8_gemms_and_fused_attention():
    """Blocks 0 and 1 of the full-size build (targets 8.9 and 12.0; the log lists the 12.0 graph):
    their 36 quantized MatMuls in 36 FP8 GEMMs, and joint and dual attention fused in each."""
    log = parse_builder_log((DATA / "transformer_medium_excerpt.log").read_text())
    report = log.report(_quantized("transformer_medium_excerpt.quantized.json"))
    assert (report.quantized_linear, report.fp8_gemms, report.fp8_complete) == (36, 36, True)
    assert report.fused_attention_tactics == {"_gemm_mha_v2": 4}  # attn and attn2 of two blocks
    fused = [layer for layer in log.layers if layer.name in report.fused_attention]
    assert all("/attn" in layer.metadata and "Softmax" in layer.metadata for layer in fused)
    # The whole build's totals (measured: 385/385 MatMuls in FP8 GEMMs, 37 fused attention layers).
    assert (log.activation_bytes, log.weights_bytes) == (298684928, 2276487556)


def test_quantized_matmuls_are_found_behind_a_dequantize_without_zero_point(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # As the export writes them: Q has the FP8 zero point, DQ omits it (its type is its input's).
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dqx"),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="/q/MatMul"),
        helper.make_node("DequantizeLinear", ["xq8", "s"], ["xd8"], name="dq_uint8"),
        helper.make_node("MatMul", ["xd8", "w"], ["z"], name="/uint8/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("xq8", TensorProto.UINT8, [2, 4]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("y", "z")],
        [zp, scale, w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    assert quantized_linear_nodes(path) == ["/q/MatMul"]


# -- targets ------------------------------------------------------------------------------------


def test_compute_capabilities_from_yaml_numbers_and_defaults():
    settings = config_from_dict({"name": "x", "build": {"compute_capabilities": [8.9, 12.0]}}).build
    assert settings.compute_capabilities == (ComputeCapability.SM89, ComputeCapability.SM120)
    assert build_targets(BuildSettings(), fp8=True) == (ComputeCapability.SM89, ComputeCapability.SM120)
    assert [c.value for c in build_targets(BuildSettings(), fp8=False)] == ["8.0", "8.6", "8.9", "12.0"]


def test_fp8_for_a_target_without_it_is_refused_naming_the_target():
    with pytest.raises(ConfigError, match=r"build.compute_capabilities has 8\.6, which runs no FP8"):
        config_from_dict({"name": "x", "build": {"compute_capabilities": ["8.6", "8.9"]}})
    with pytest.raises(ConfigError, match=r"'8\.9', '12\.0'"):
        config_from_dict({"name": "x", "build": {"compute_capabilities": ["9.0"]}})  # Hopper: TensorRT's
    sm = (ComputeCapability.SM80, ComputeCapability.SM89)
    with pytest.raises(ConfigError, match=r"has 8\.0, which cannot run the FP8 layers of t\.onnx"):
        check_targets(sm, {Precision.FP8}, "t.onnx")
    with pytest.raises(ConfigError, match=r"has 8\.9, which cannot run the FP4 layers"):
        check_targets((ComputeCapability.SM89, ComputeCapability.SM120), {Precision.FP4}, "t.onnx")
    check_targets((ComputeCapability.SM120,), {Precision.FP4, Precision.FP8}, "t.onnx")


# -- machine checks -----------------------------------------------------------------------------


def _record(version: str = VERSION) -> EngineRecord:
    f = FileRecord("transformer.plan", 10, "0" * 64)
    return EngineRecord(
        component=Component.TRANSFORMER,
        backend=Backend.TENSORRT_RTX,
        file=f,
        precision=Dtype.FP32,
        fp8=True,
        profile={},
        source_onnx=f,
        build_seconds=1.0,
        tensorrt_version=version,
        compute_capabilities=((8, 9), (12, 0)),
    )


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        (MachineInfo(None, GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)), VERSION), None),
        (MachineInfo(None, GpuInfo("NVIDIA GeForce RTX 5090", (12, 0)), VERSION), None),
        (
            MachineInfo(None, GpuInfo("NVIDIA H200", (9, 0)), VERSION),
            "this GPU is NVIDIA H200 (sm_90), not a target (they run on compute capability 8.9 (RTX 4090",
        ),
        (
            MachineInfo(None, None, VERSION),
            "this machine has no CUDA GPU (they run on compute capability 8.9",
        ),
        (MachineInfo(None, GpuInfo("RTX 4090", (8, 9)), "1.8.0.1"), "this machine has TensorRT-RTX 1.8.0.1"),
        (MachineInfo(None, GpuInfo("RTX 4090", (8, 9)), None), "this machine has no TensorRT-RTX"),
    ],
)
def test_a_gpu_outside_the_targets_or_another_version_is_refused(machine, expected):
    problem = TensorRTRtxBackend().incompatibility(_record(), machine)
    assert problem == expected if expected is None else problem.startswith(expected)


def test_a_build_machine_without_gpu_reuses_engines_of_the_same_version():
    backend = TensorRTRtxBackend()
    assert backend.rebuild_reason(_record(), MachineInfo(None, None, VERSION)) is None
    assert backend.rebuild_reason(_record("1.6.0.1"), MachineInfo(None, None, VERSION)) is not None
    assert backend.built_for(_record()) == f"sm_89, sm_120 / TensorRT-RTX {VERSION}"
    assert backend.recorded_machine(MachineInfo("10.0", None, VERSION)).tensorrt_version == VERSION
