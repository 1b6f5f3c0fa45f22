"""Export's validation arithmetic and its choice of shapes (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sd35trt.components import (
    Component,
    Sampling,
    Tolerance,
    sample_shapes,
    spec,
    validation_tolerance,
)
from sd35trt.config import Architecture, BuildSettings, Precision, Range
from sd35trt.models.tiny import model_dims
from sd35trt.stages.export.validate import compare, describe_failure

DIMS = model_dims(Architecture.TINY)


def test_compare_allows_atol_plus_rtol_of_the_reference_and_flags_the_rest():
    ref = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)
    tol = Tolerance(rtol=1e-2, atol=1e-3)  # allowed = 1e-3 + 1e-2 * 4 = 0.041
    ok, bad = compare({"a": ref + 0.04, "b": ref + 0.05}, {"a": ref, "b": ref}, tol)
    assert ok.ok and not bad.ok
    assert math.isclose(ok.allowed, 0.041, rel_tol=1e-6)
    assert math.isclose(bad.rel, 0.05 / 4, rel_tol=1e-4)
    line = describe_failure("transformer", {"hidden_states": (2, 16, 8, 8)}, bad)
    assert line.startswith(
        "transformer b at hidden_states [2, 16, 8, 8]: max |onnx - torch| 0.05 > allowed 0.041"
    )


def test_compare_treats_nan_missing_and_misshapen_outputs_as_failures():
    ref = np.ones((2, 3), np.float32)
    nan = ref.copy()
    nan[0, 0] = np.nan
    checks = compare({"a": nan, "c": ref[:1]}, {"a": ref, "b": ref, "c": ref}, Tolerance(1.0, 1.0))
    assert [(c.output, c.ok, c.max_abs) for c in checks] == [
        ("a", False, math.inf),
        ("b", False, math.inf),
        ("c", False, math.inf),
    ]
    assert checks[0].to_json()["max_abs"] == "inf"  # JSON has no inf


def test_sample_shapes_trace_at_opt_and_validate_at_both_ends_of_the_profile():
    build = BuildSettings(height=Range(min=64, opt=128, max=256), width=Range(min=64, opt=128, max=256))
    trace, *checks = sample_shapes(Component.TRANSFORMER, DIMS, build, max_sequence_length=256, skip_layers=1)
    assert trace["hidden_states"] == (2, 16, 16, 16)
    # batch min / max, image sides min(64, 128) / min(256, 192): small, and each unlike the trace
    assert [c["hidden_states"] for c in checks] == [(1, 16, 8, 8), (4, 16, 24, 24)]
    # T5 lengths capped at 32 (trace), 16 and 24: 77 CLIP tokens + those
    assert [s["encoder_hidden_states"][1] for s in (trace, *checks)] == [109, 93, 101]
    assert all(
        c["encoder_hidden_states"] == (c["hidden_states"][0], c["encoder_hidden_states"][1], 96)
        for c in checks
    )
    assert all(c["skip_layers"] == (1,) for c in checks)


def test_full_size_profiles_are_traced_and_validated_at_small_shapes():
    """sd3.5 at a static 1024x1024 profile: traced at 256, validated at 128 and 192 pixels."""
    from sd35trt.config import Architecture
    from sd35trt.models.tiny import model_dims

    dims = model_dims(Architecture.SD35_LARGE)
    static = BuildSettings(batch=Range.static(1), height=Range.static(1024), width=Range.static(1024))
    shapes = sample_shapes(Component.TRANSFORMER, dims, static)
    assert [s["hidden_states"] for s in shapes] == [(2, 16, 32, 32), (1, 16, 16, 16), (2, 16, 24, 24)]


def test_a_static_profile_still_gets_a_second_validation_shape():
    static = BuildSettings(batch=Range.static(1), height=Range.static(128), width=Range.static(128))
    _, *checks = sample_shapes(Component.VAE_DECODER, DIMS, static)
    assert [c["latent"] for c in checks] == [(1, 16, 16, 16), (2, 16, 16, 16)]


def test_spec_says_how_to_sample_each_input():
    sp = spec(Component.TRANSFORMER, DIMS, skip_layers=2)
    assert {t.name: t.sampling for t in sp.inputs} == {
        "hidden_states": Sampling.NORMAL,
        "encoder_hidden_states": Sampling.NORMAL,
        "pooled_projections": Sampling.NORMAL,
        "timestep": Sampling.TIMESTEP,
        "skip_layers": Sampling.GATE,
    }
    assert spec(Component.T5, DIMS).inputs[0].sampling is Sampling.TOKENS


def test_validation_tolerance_by_precision_and_quantization():
    sp = spec(Component.TRANSFORMER, DIMS)
    assert validation_tolerance(sp, Precision.FP32) == sp.tolerance
    assert validation_tolerance(sp, Precision.FP32, quantized=True) == sp.fp8_tolerance
    bf16 = validation_tolerance(sp, Precision.BF16, quantized=True)
    assert bf16.rtol > sp.fp8_tolerance.rtol and bf16.atol > sp.fp8_tolerance.atol


def test_a_graph_onnx_runtime_cannot_run_is_one_line_saying_why(tmp_path):
    """ORT's NOT_IMPLEMENTED (as for a BF16 Gemm on the CPU) becomes NotValidated, not a crash."""
    import onnx
    from onnx import TensorProto, helper

    from sd35trt.stages.export import validate

    i64 = TensorProto.INT64
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, i64, [2, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", i64, [2, 2])],
    )
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    feeds = [{"a": np.ones((2, 2), np.int64), "b": np.ones((2, 2), np.int64)}]
    with pytest.raises(validate.NotValidated, match=r"^ONNX Runtime cannot load gemm.onnx: .*Gemm") as err:
        validate.run_cases(path, [validate.CPU], feeds)
    assert "\n" not in str(err.value)


def test_float32_compute_runs_a_bf16_t5_as_its_float32_form_does():
    """T5's feed-forward casts its input to ``wo.weight.dtype`` before ``wo`` runs: the BF16 full-size
    export failed there ("expected m1 and m2 to have the same dtype"). Computed in float32, the result
    is that of a float32 model holding the BF16-rounded weights, to one BF16 rounding of ``wo``'s
    input, and the weights stay BF16."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from sd35trt.stages.export.reference import float32_compute

    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    torch.manual_seed(0)
    bf16 = T5EncoderModel(cfg).eval().to(torch.bfloat16)
    widened = T5EncoderModel(cfg).eval()
    widened.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad(), float32_compute(bf16):
        got = bf16(ids)[0]
    with torch.no_grad():
        want = widened(ids)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
