"""FP8 validation at full depth: narrow SD3 transformers of 24 (BF16) and 38 (FP32) blocks.

ONNX Runtime's FP8 result used to drift from ModelOpt's fake quant with depth (rounding ties
flipping E4M3 codes, then cascading; see :mod:`sd35trt.stages.export.reference`). Here each
model is calibrated with ModelOpt, traced and rewritten by the export stage's own steps, run by
ONNX Runtime and compared with the stage's reference under the stage's checks (output tolerance,
share of FP8 codes off a rounding tie): it passes, at ~2e-7 relative error. The same graph with
one quantizer's scale 10 % off (Q and DQ, as a wrong calibration would store it; FP32 model),
or one weight's dequantization scale 2 % off (BF16 model), fails. Tiny width (2 heads of 16) and
small shapes keep it to seconds; the depth, the dual-attention blocks (0-12, as SD3.5-medium)
and the 16-bit path are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from sd35trt.components import Component, ModelDims, spec, validation_tolerance
from sd35trt.config import Architecture, CalibrateSettings, Precision
from sd35trt.models import tiny

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.quantization")

#: (batch, latent side, text length): a shape other than the traced one
CASES = [(2, 12, 20)]
#: Per precision, one wrong scale: (node name part, the ops whose scale is off, the factor).
WRONG = {
    # one weight's DequantizeLinear scale 2 % off: the output error stays small (the reference
    # follows ONNX Runtime's codes), the next quantizer's codes show it
    Precision.BF16: ("blocks.12/attn/to_q/weight_quantizer", ("DequantizeLinear",), 1.02),
    # one input quantizer's Q and DQ scale 10 % off, as a wrong calibration would store it
    Precision.FP32: ("blocks.12/ff/net.2/input_quantizer", ("QuantizeLinear", "DequantizeLinear"), 0.9),
}


def _dims(transformer: dict) -> ModelDims:
    arch = tiny.architecture_config(Architecture.TINY)
    return ModelDims.from_configs(transformer, arch.clip_l, arch.clip_g, arch.t5, arch.vae)


def _shapes(dims: ModelDims, batch: int, side: int, text: int) -> dict[str, tuple[int, ...]]:
    return {
        "hidden_states": (batch, 16, side, side),
        "encoder_hidden_states": (batch, text, dims.joint_attention_dim),
        "pooled_projections": (batch, dims.pooled_projection_dim),
        "timestep": (batch,),
    }


@pytest.fixture(
    scope="module", params=[(24, Precision.BF16), (38, Precision.FP32)], ids=["24-bf16", "38-fp32"]
)
def exported(request, tmp_path_factory):
    """A narrow transformer of the given depth, calibrated, exported by the stage's steps."""
    from diffusers import SD3Transformer2DModel

    from sd35trt.models.modules import wrap
    from sd35trt.models.quantize import quantize
    from sd35trt.stages.export import onnx_files, onnx_tools, steps, tracing

    layers, precision = request.param
    config = dict(tiny.architecture_config(Architecture.TINY).transformer)
    config.update(num_layers=layers, dual_attention_layers=tuple(range(13)), pos_embed_max_size=16)
    dims = _dims(config)
    sp = spec(Component.TRANSFORMER, dims)
    dtype = tracing.torch_dtype(precision)
    torch.manual_seed(0)
    raw = SD3Transformer2DModel(**config).eval().to(dtype).requires_grad_(False)

    def calibrate(model):
        for i in range(2):
            x = tracing.make_inputs(sp, _shapes(dims, 2, 8, 12), precision, case=100 + i)
            model(**dict(zip(sp.input_names, x, strict=True)))

    with torch.no_grad():
        quantize(raw, CalibrateSettings(), calibrate)
    tracing.snap_amax(raw, precision)
    module = wrap(Component.TRANSFORMER, raw)
    out = tmp_path_factory.mktemp(f"depth{layers}")
    traced = out / "traced.onnx"
    sample = tracing.make_inputs(sp, _shapes(dims, 1, 16, 16), precision, case=0)
    with tracing.fp8_tracing(module):
        tracing.trace(module, sp, sample, traced, 19)
    model = steps.load_traced(traced, True, 19, 19, Component.TRANSFORMER)
    onnx_tools.pretranspose_qdq_weights(model, traced)
    model = onnx_tools.clean_up(model, fold=False)
    path = out / "transformer.onnx"
    onnx_files.save_model(model, path, traced, external=False)
    return module, sp, dims, precision, path


def _validate(exported, path: Path) -> list[str]:
    """The stage's validation of the graph at ``path``: its failure lines."""
    from sd35trt.stages.export import reference, tracing, validate

    module, sp, dims, precision, _ = exported
    shapes = [_shapes(dims, *c) for c in CASES]
    cases = [tracing.make_inputs(sp, s, precision, case=i) for i, s in enumerate(shapes, 1)]
    feeds = [{n: tracing.to_numpy(x) for n, x in zip(sp.input_names, c, strict=True)} for c in cases]
    run = validate.run_cases(path, [validate.CPU], feeds, codes=True)
    assert run.compute == ("float32" if precision is Precision.BF16 else "graph")
    ref = reference.pytorch_reference(module, sp, cases, precision, run.codes)
    tol = validation_tolerance(sp, Precision.FP32, quantized=True)
    entry, failures = validate.check_cases(run, "transformer", shapes, ref.outputs, tol, ref.against(True))
    why = ref.codes.failure("transformer")
    if not failures and why is None:  # a right graph: float32 noise, nothing cascades
        assert entry["max_rel"] < 1e-5 and ref.codes.far == 0
    return failures + ([why] if why else [])


def _with_scale(path: Path, node_part: str, ops: tuple[str, ...], factor: float) -> Path:
    """A copy of the graph with the scale of the Q/DQ nodes named ``*node_part*`` times ``factor``."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    hit = 0
    for node in model.graph.node:
        if node.op_type in ops and node_part in node.name:
            scale = inits[node.input[1]]
            scaled = numpy_helper.to_array(scale).astype("float32") * factor
            if scale.data_type == onnx.TensorProto.BFLOAT16:
                bits = torch.tensor(scaled).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                new = onnx.helper.make_tensor(
                    f"{scale.name}_wrong", scale.data_type, scale.dims, bits, raw=True
                )
            else:
                new = numpy_helper.from_array(scaled, f"{scale.name}_wrong")
            model.graph.initializer.append(new)
            node.input[1] = new.name
            hit += 1
    assert hit == len(ops)
    out = path.with_name(f"wrong_{hit}_{factor}.onnx")
    onnx.save(model, str(out))
    return out


def test_full_depth_fp8_graph_passes_validation(exported):
    assert _validate(exported, exported[-1]) == []


def test_one_wrong_scale_fails_validation(exported):
    node_part, ops, factor = WRONG[exported[3]]
    failures = _validate(exported, _with_scale(exported[-1], node_part, ops, factor))
    assert any("of the FP8 codes of transformer.transformer_blocks.12." in f for f in failures)
