"""ONNX graph work of the export stage, on a small Linear stack quantized with ModelOpt."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sd35trt.errors import ModelError
from sd35trt.stages.export import onnx_files, onnx_tools

torch = pytest.importorskip("torch")
mtq = pytest.importorskip("modelopt.torch.quantization")


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A 3-layer MLP with FP8 fake quant on the first two Linears, traced to ONNX (trt:: ops)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 8),
    ).eval()
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"].append(
        {"quantizer_name": "4.*", "enable": False}
    )  # the last Linear stays high precision

    def loop(m):
        for _ in range(4):
            m(torch.randn(2, 5, 16))

    mtq.quantize(model, cfg, loop)
    raw = tmp_path_factory.mktemp("raw") / "mlp.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.randn(2, 5, 16),),
            str(raw),
            dynamo=False,
            opset_version=19,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}},
            do_constant_folding=False,
        )
    return model, raw


def _processed(raw: Path):
    model = onnx.load(str(raw), load_external_data=False)
    assert onnx_tools.rewrite_fp8_qdq(model) == 4  # input + weight quantizer of two Linears
    return onnx_tools.clean_up(model)


def _max_rel(torch_model, path: Path, shapes) -> float:
    sess = _ort_session(path)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = torch_model(x).numpy()
        (y,) = sess.run(None, {"x": x.numpy()})
        assert y.shape == ref.shape
        worst = max(worst, float(np.abs(y - ref).max() / np.abs(ref).max()))
    return worst


def test_rewrite_gives_standard_fp8_qdq(quantized):
    _, raw = quantized
    traced = onnx.load(str(raw), load_external_data=False)
    assert {n.domain for n in traced.graph.node} >= {"trt"}

    model = _processed(raw)
    assert onnx_tools.custom_ops(model) == set()
    assert "trt" not in {o.domain for o in model.opset_import}
    inits = {t.name: t for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 4
    for q in qs:
        assert inits[q.input[2]].data_type == TensorProto.FLOAT8E4M3FN
        assert types[q.output[0]] == TensorProto.FLOAT8E4M3FN
    # The excluded last Linear reads no dequantized tensor.
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert [any(producers.get(i) in ("DequantizeLinear", "Transpose") for i in m.input) for m in matmuls] == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(("fp8_weights", "external"), [(False, False), (True, True)])
def test_qdq_graph_runs_in_ort_and_matches_fake_quant(quantized, tmp_path, fp8_weights, external):
    torch_model, raw = quantized
    model = _processed(raw)
    if fp8_weights:
        assert onnx_tools.fold_fp8_weights(model, raw) == 2
        model = onnx_tools.clean_up(model, fold=False)
        fp8_inits = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN and t.dims]
        assert len(fp8_inits) == 2
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 2  # activations only
    path = tmp_path / "mlp.onnx"
    files = onnx_files.save_model(model, path, raw, external=external)
    assert files == ([path, tmp_path / "mlp.onnx.data"] if external else [path])
    onnx_files.check_onnx_file(path)
    assert _max_rel(torch_model, path, [(1, 3, 16), (4, 7, 16)]) < 1e-3


def test_stripped_graph_is_the_unquantized_model_and_shares_the_data_file(quantized, tmp_path):
    torch_model, raw = quantized
    model = _processed(raw)
    onnx_files.save_model(model, tmp_path / "mlp.onnx", raw, external=True)
    plain = onnx_tools.clean_up(onnx_tools.strip_qdq(model))
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(onnx_files.count_ops(plain))
    onnx.save_model(plain, str(tmp_path / "mlp_plain.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data", "mlp_plain.onnx"]
    onnx_files.check_onnx_file(tmp_path / "mlp_plain.onnx")

    from sd35trt.models.quantize import quantizers

    enabled = [q for q in quantizers(torch_model).values() if q.is_enabled]
    for q in enabled:
        q.disable()
    try:
        assert _max_rel(torch_model, tmp_path / "mlp_plain.onnx", [(2, 5, 16)]) < 1e-5
    finally:
        for q in enabled:
            q.enable()


def _trace_2d(torch_model, path: Path) -> Path:
    """The quantized MLP traced on 2-D inputs: the exporter writes its Linears as Gemm(transB=1)."""
    with torch.no_grad():
        torch.onnx.export(
            torch_model,
            (torch.randn(3, 16),),
            str(path),
            dynamo=False,
            opset_version=19,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            do_constant_folding=False,
        )
    return path


def _weight_paths(model) -> list[tuple[str, ...]]:
    """Per GEMM reading a dequantized weight: the ops from the weight initializer to the GEMM."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    paths = []
    for gemm in (n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")):
        chain, name = [], gemm.input[1]
        while name not in inits and name in producers:
            node = producers[name]
            chain.append(node.op_type)
            name = node.input[0]
        if "DequantizeLinear" in chain:
            paths.append(tuple(reversed(chain)))
    return paths


@pytest.mark.parametrize(
    ("rank", "external", "fp8_weights"), [(3, False, False), (3, True, True), (2, True, False)]
)
def test_pretransposed_weights_feed_the_gemm_straight_from_dq_with_the_same_numbers(
    quantized, tmp_path, rank, external, fp8_weights
):
    torch_model, raw = quantized
    if rank == 2:
        (tmp_path / "raw2d").mkdir()
        raw = _trace_2d(torch_model, tmp_path / "raw2d" / "mlp.onnx")
    if external:  # the traced weights in a data file, as the exporter writes models over 2 GB
        moved = tmp_path / "traced" / "mlp.onnx"
        moved.parent.mkdir()
        onnx.save_model(onnx.load(str(raw)), str(moved), save_as_external_data=True, size_threshold=0)
        raw = moved
    before = _processed(raw)
    gemm = "Gemm" if rank == 2 else "MatMul"
    expected = ("QuantizeLinear", "DequantizeLinear") + (() if rank == 2 else ("Transpose",))
    assert _weight_paths(before) == [expected, expected]
    reference_path = tmp_path / "before.onnx"
    onnx_files.save_model(before, reference_path, raw, external=False)  # reads the weights before they move

    model = _processed(raw)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    assert onnx_tools.pretranspose_qdq_weights(model, raw) == 2
    if fp8_weights:
        assert onnx_tools.fold_fp8_weights(model, raw) == 2
    model = onnx_tools.clean_up(model, fold=False)
    after = _weight_paths(model)
    assert after == [("DequantizeLinear",) if fp8_weights else ("QuantizeLinear", "DequantizeLinear")] * 2
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    gemms = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and producers.get(n.input[1]) == "DequantizeLinear"
    ]
    assert [n.op_type for n in gemms] == [gemm] * 2
    assert all(next((a.i for a in n.attribute if a.name == "transB"), 0) == 0 for n in gemms)
    # The two quantized weights are stored [in, out] (as FP8 with fp8_weights).
    stored = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    suffix = "_fp8" if fp8_weights else ""
    assert sum(stored.get(n + suffix) == s[::-1] for n, s in shapes.items()) == 2

    path = tmp_path / "mlp.onnx"
    onnx_files.save_model(model, path, raw, external=external)
    onnx_files.check_onnx_file(path)
    x = np.random.default_rng(3).standard_normal((4, 16) if rank == 2 else (2, 5, 16)).astype(np.float32)
    (want,) = _ort_session(reference_path).run(None, {"x": x})
    (got,) = _ort_session(path).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        fake_quant = torch_model(torch.from_numpy(x)).numpy()
    assert np.abs(got - fake_quant).max() <= 1e-3 * np.abs(fake_quant).max()


# --------------------------------------------------------------------------------------------
# External-data guards
# --------------------------------------------------------------------------------------------

WEIGHT = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)


def _write_external(model_dir: Path, location: str, length: int = WEIGHT.nbytes) -> Path:
    """A one-MatMul model whose weight points at ``location``."""
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=WEIGHT.shape)
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        [w],
    )
    path = model_dir / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path)
    )
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """Valid weight bytes outside the model directory: a naive loader would happily read them."""
    (tmp_path / "model").mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHT.tobytes())
    return secret


@pytest.mark.parametrize("kind", ["escape", "absolute", "symlink"])
def test_unsafe_external_locations_are_refused_before_parsing(outside, kind):
    model_dir = outside.parent / "model"
    if kind == "escape":
        location, why = "../secret.bin", "escapes the model directory"
    elif kind == "absolute":
        location, why = str(outside), "absolute path"
    else:
        os.symlink(outside, model_dir / "weights.bin")
        location, why = "weights.bin", "symlink"
    path = _write_external(model_dir, location)

    with pytest.raises(ModelError) as err:
        onnx_files.check_external_data(path)
    message = str(err.value)
    assert "\n" not in message
    assert all(part in message for part in (str(path), "'W'", repr(location), why, "relative path"))
    with pytest.raises(ModelError):
        onnx_files.check_onnx_file(path)
    # onnx's own loader and checker (kept on) refuse it as well.
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(path), full_check=True)


def test_safe_external_data_passes_and_truncation_is_caught(tmp_path):
    (tmp_path / "model.onnx.data").write_bytes(WEIGHT.tobytes())
    path = _write_external(tmp_path, "model.onnx.data")
    onnx_files.check_onnx_file(path)
    (y,) = _ort_session(path).run(None, {"x": np.ones((1, 64), np.float32)})
    np.testing.assert_allclose(y[0], WEIGHT.sum(axis=0))

    (tmp_path / "model.onnx.data").write_bytes(WEIGHT.tobytes()[:-4])
    with pytest.raises(ModelError, match="truncated"):
        onnx_files.check_external_data(path)


def test_save_model_streams_one_aligned_data_file(tmp_path):
    big = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((300, 40)).astype(np.float32), "big"
    )
    small = numpy_helper.from_array(np.ones((3,), np.float32), "small")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("Add", ["h", "small2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40])],
        [big, small, numpy_helper.from_array(np.full((40,), 2.0, np.float32), "small2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    path = tmp_path / "m.onnx"
    onnx_files.save_model(model, path, None, external=True)
    loaded = onnx.load(str(path), load_external_data=False)
    where = {t.name: onnx_files.uses_external_data(t) for t in loaded.graph.initializer}
    assert where == {"big": True, "small": False, "small2": False}
    refs = [onnx_files.external_ref(t) for t in loaded.graph.initializer if onnx_files.uses_external_data(t)]
    assert [(r.location, r.offset % onnx_files.ALIGNMENT) for r in refs] == [("m.onnx.data", 0)]
    x = np.ones((2, 300), np.float32)
    (y,) = _ort_session(path).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ numpy_helper.to_array(big) + 2.0, rtol=1e-5)


def test_bf16_conv_below_opset_22_runs_in_float32_between_casts_and_passes_the_checker(tmp_path):
    import ml_dtypes

    bf16 = TensorProto.BFLOAT16
    w = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2]),
            helper.make_node("Einsum", ["c"], ["y"], equation="nchw->nhwc"),
        ],
        "g",
        [helper.make_tensor_value_info("x", bf16, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", bf16, [1, 2, 2, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    with pytest.raises(onnx.shape_inference.InferenceError, match="bfloat16"):
        onnx.checker.check_model(model, full_check=True)

    model = onnx_tools.clean_up(model, fold=False)  # Einsum -> Transpose, types inferred
    assert onnx_tools.cast_unsupported_bf16(model) == 1
    assert [n.op_type for n in model.graph.node] == [
        "Cast",
        "Cast",
        "Conv",
        "Cast",
        "Transpose",
    ]  # x, w in; y out
    path = tmp_path / "conv.onnx"
    onnx.save_model(onnx.shape_inference.infer_shapes(model), str(path))
    onnx_files.check_onnx_file(path)

    # ORT has no bfloat16 kernels on the CPU (nor bfloat16 FP8 Q/DQ on CUDA): validation opens
    # such graphs in their float32 form (same nodes and BF16 values, float32 compute).
    from sd35trt.stages.export import validate

    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(ml_dtypes.bfloat16)
    sess = validate.session(path, [validate.CPU])
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]  # the float32 copy is gone
    y = validate.run(sess, {"x": x.astype(np.float32)})["y"]
    xs, ws = x.astype(np.float32), w.astype(np.float32)
    patches = xs.reshape(1, 3, 2, 2, 2, 2).transpose(0, 2, 4, 1, 3, 5)  # [1, h, w, C, kh, kw]
    expected = np.einsum("nhwcij,ocij->nhwo", patches, ws)  # [1, 2, 2, 4]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)  # float32 compute, no BF16 rounding
