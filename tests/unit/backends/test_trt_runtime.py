"""TensorRT runtime logic that needs no TensorRT: graph cache, shared activations, weight
streaming settings, the layer-information parser and the FP8 check (issue 14: 2, 3, 4, 8, C)."""

from __future__ import annotations

import json

import pytest
import torch

from sd35trt.backends.graphs import GraphCache
from sd35trt.backends.layers import (
    LayerInfoError,
    Precision,
    parse_layer_information,
    quantized_linear_nodes,
    summarize,
)
from sd35trt.backends.tensorrt import ActivationMemory, WeightStreaming, apply_weight_streaming
from sd35trt.components import Component
from sd35trt.config import BuildSettings, config_from_dict
from sd35trt.errors import BuildError
from sd35trt.stages.build import check_fp8

# -- point 2: the graph cache ------------------------------------------------------------------


def test_graph_cache_keeps_both_slg_shapes_and_captures_each_once():
    captured = []
    cache = GraphCache(lambda key: captured.append(key) or f"graph{key}")
    cfg, skip = ((2, 16, 8, 8),), ((1, 16, 8, 8),)
    # 40 steps, SLG window over part of them: CFG and skip passes alternate.
    results = [cache.lookup(k) for _ in range(20) for k in (cfg, skip)]
    assert results[:2] == [None, None]  # first sight of each shape: run eagerly, no capture
    assert captured == [cfg, skip] and cache.captures == 2
    assert results[2:] == [f"graph{cfg}", f"graph{skip}"] * 19


def test_graph_cache_is_bounded_and_evicts_the_least_recently_used():
    evicted = []
    cache = GraphCache(lambda key: f"g{key}", capacity=2, on_evict=evicted.append)
    for key in ("a", "a", "b", "b", "a", "c", "c"):
        cache.lookup(key)
    assert evicted == ["gb"] and "a" in cache and "c" in cache and len(cache) == 2
    cache.clear()
    assert evicted == ["gb", "ga", "gc"] and len(cache) == 0
    assert cache.lookup("a") == "ga"  # seen before: captured again right away
    with pytest.raises(ValueError, match="capacity"):
        GraphCache(lambda key: key, capacity=0)


def test_an_engine_called_once_per_image_never_captures():
    cache = GraphCache(lambda key: pytest.fail("captured a shape seen once"))
    assert cache.lookup(((1, 77),)) is None and cache.captures == 0


# -- point 4: one shared activation buffer -----------------------------------------------------


class _Cpu:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.allocations: list[int] = []

    def empty(self, shape, dtype):
        self.allocations.append(shape[0])
        return torch.empty(shape, dtype=dtype)


def test_activation_memory_is_one_buffer_sized_for_the_largest_engine():
    cpu = _Cpu()
    memory = ActivationMemory(cpu, reserve=300)
    bound: dict[str, tuple[int, int]] = {}

    def binder(name):
        return lambda address, size: bound.__setitem__(name, (address, size))

    memory.attach("clip_l", 100, binder("clip_l"))
    memory.attach("transformer", 300, binder("transformer"))
    assert cpu.allocations == [300] and memory.size_bytes == 300
    assert bound["clip_l"][0] == bound["transformer"][0] and bound["clip_l"][1] == 100
    # An engine larger than recorded grows the buffer and re-points every attached context.
    memory.attach("vae_decoder", 500, binder("vae_decoder"))
    assert cpu.allocations == [300, 500] and len({a for a, _ in bound.values()}) == 1
    assert bound["clip_l"][1] == 100 and memory.peak_bytes == 500
    for name in ("clip_l", "transformer", "vae_decoder"):
        memory.detach(name)
    assert memory.size_bytes == 0  # freed with the last engine


# -- point 3: weight streaming from config to engine --------------------------------------------


class _Engine:
    def __init__(self, streamable: int) -> None:
        self.streamable_weights_size = streamable
        self.weight_streaming_budget_v2 = None

    def get_weight_streaming_automatic_budget(self) -> int:
        return 777


def test_weight_streaming_budget_is_applied_to_the_engine():
    engine = _Engine(streamable=1000)
    assert apply_weight_streaming(engine, WeightStreaming(400)) == 400
    assert engine.weight_streaming_budget_v2 == 400
    assert apply_weight_streaming(engine, WeightStreaming(5000)) == 1000  # at most everything
    assert apply_weight_streaming(engine, WeightStreaming(None)) == 777  # TensorRT's automatic budget
    assert apply_weight_streaming(_Engine(streamable=0), WeightStreaming(400)) is None


def test_weight_streaming_budget_needs_weight_streaming_and_defaults_are_nvidias():
    assert BuildSettings().optimization_level == 4  # ModelOpt / demo/Diffusion FP8 builds
    ok = BuildSettings(weight_streaming=True, weight_streaming_budget_gib=2.5)
    assert ok.weight_streaming_budget_gib == 2.5
    with pytest.raises(Exception, match="weight_streaming_budget_gib needs weight_streaming: true"):
        config_from_dict({"name": "x", "build": {"weight_streaming_budget_gib": 1}})


# -- C: layer information (samples written from TensorRT's documented JSON format) ---------------


def _tensor(name: str, fmt: str) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": [2, 4096, 1536], "Format/Datatype": fmt}


FP8 = "Row major linear FP8 format (kLINEAR)"
BF16 = "Row major linear BF16 format (kLINEAR)"
FP32 = "Row major linear FP32 format (kLINEAR)"

SAMPLE_10 = {
    "Layers": [
        {
            "Name": "/transformer_blocks.0/attn/to_q/MatMul + /transformer_blocks.0/attn/to_q/Add",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [_tensor("x_q", FP8), _tensor("w_q", FP8)],
            "Outputs": [_tensor("q", BF16)],
            "ParameterType": "MatrixMultiply",
            "TacticName": "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x64",
            "Metadata": "[ONNX Layer: /transformer_blocks.0/attn/to_q/MatMul]",
        },
        {
            "Name": "/transformer_blocks.0/attn/to_k/MatMul",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [_tensor("x_k", BF16), _tensor("w_k", BF16)],
            "Outputs": [_tensor("k", BF16)],
            "TacticName": "sm90_xmma_gemm_bf16bf16_bf16f32",
            "Metadata": "[ONNX Layer: /transformer_blocks.0/attn/to_k/MatMul]",
        },
        {
            "Name": "_gemm_mha_v2_myl0_3",
            "LayerType": "kgen",
            "Inputs": [_tensor("q", BF16), _tensor("k", BF16), _tensor("v", BF16)],
            "Outputs": [_tensor("attn", BF16)],
            "TacticName": "fmha_v2_flash_attention_bf16_64_32_S_qkv_64_sm90",
        },
        {
            "Name": "/norm_out/Reformat",
            "LayerType": "Reformat",
            "Inputs": [_tensor("a", BF16)],
            "Outputs": [_tensor("b", FP32)],
        },
    ],
    "Bindings": ["hidden_states", "noise_pred"],
}


def test_layer_information_is_parsed_into_precisions_gemms_and_attention():
    layers, detailed = parse_layer_information(json.dumps(SAMPLE_10))
    assert detailed and [layer.precision for layer in layers] == [
        Precision.FP8,
        Precision.BF16,
        Precision.BF16,
        Precision.FP32,  # a reformat is the type it writes
    ]
    quantized = ["/transformer_blocks.0/attn/to_q/MatMul", "/transformer_blocks.0/attn/to_k/MatMul"]
    report = summarize(layers, detailed, quantized)
    assert (report.fp8_gemms, report.quantized_linear, report.fp8_complete) == (1, 2, False)
    assert report.fell_back == ["/transformer_blocks.0/attn/to_k/MatMul"] and report.fell_back_count == 1
    assert report.fused_attention == ["_gemm_mha_v2_myl0_3"]
    assert report.by_precision == {"fp8": 1, "bf16": 2, "fp32": 1}
    assert "1/2 quantized MatMuls in 1 FP8 GEMMs; fused attention layers 1" in report.summary()


def test_tensorrt_11_layer_information_and_names_only_builds():
    sample_11 = {
        "Layers": [
            {
                "Name": "gemm",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [{"Name": "a", "DataType": "FP8"}, {"Name": "b", "DataType": "FP8"}],
                "Outputs": [{"Name": "c", "DataType": "BFloat16"}],
                "Metadata": "[ONNX Layer: /proj/MatMul]",
            }
        ],
        "I/O Tensors": [{"Name": "a", "IOMode": "Input", "DataType": "FP8"}],
    }
    layers, detailed = parse_layer_information(json.dumps(sample_11))
    assert detailed and layers[0].is_fp8_gemm and summarize(layers, True, ["/proj/MatMul"]).fp8_complete
    names_only, detailed = parse_layer_information(json.dumps({"Layers": ["a", "b"], "Bindings": []}))
    report = summarize(names_only, detailed, ["/proj/MatMul"])
    assert not detailed and report.layers == 2 and "without detailed layer information" in report.summary()
    assert check_fp8(Component.TRANSFORMER, report, "onnx/transformer.onnx", False) is None


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps([1]),
        json.dumps({"Layers": {"a": 1}}),
        json.dumps({"Layers": [{"LayerType": "x"}]}),
    ],
)
def test_malformed_layer_information_is_an_error(text):
    with pytest.raises(LayerInfoError):
        parse_layer_information(text)


def test_fp8_check_names_the_layers_that_fell_back():
    layers, detailed = parse_layer_information(json.dumps(SAMPLE_10))
    report = summarize(layers, detailed, ["/transformer_blocks.0/attn/to_q/MatMul", "/blocks.1/ff/MatMul"])
    with pytest.raises(BuildError) as err:
        check_fp8(Component.TRANSFORMER, report, "onnx/transformer.onnx", allow_partial=False)
    assert str(err.value) == (
        "the transformer engine has 1 FP8 GEMM layers for 2 FP8-quantized Linear layers in "
        "onnx/transformer.onnx: 1 fell back to higher precision (/blocks.1/ff/MatMul); "
        "build with --allow-partial-fp8 to accept it"
    )
    warning = check_fp8(Component.TRANSFORMER, report, "onnx/transformer.onnx", allow_partial=True)
    assert warning is not None and warning.endswith("(allowed by --allow-partial-fp8)")


def test_quantized_linear_nodes_are_counted_from_the_onnx(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dqx"),
        helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="qw"),
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="dqw"),
        helper.make_node("Transpose", ["wd"], ["wt"], name="t"),
        helper.make_node("MatMul", ["xd", "wt"], ["y"], name="/quantized/MatMul"),
        helper.make_node("MatMul", ["y", "w"], ["z"], name="/plain/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [zp, scale, w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    assert quantized_linear_nodes(path) == ["/quantized/MatMul"]
