"""The export stage on the tiny model: files, record, FP8 Q/DQ placement, dynamic shapes, failures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from sd35trt.artifacts.files import records_for_tree, sha256_file
from sd35trt.artifacts.manifest import RunManifest, Stage, new_record
from sd35trt.artifacts.records import TensorSignature, ValidationStatus
from sd35trt.components import Component, exported_components
from sd35trt.config import Precision
from sd35trt.errors import ExportError, StaleArtifactError
from sd35trt.models.quantize import CALIBRATION_FILE
from sd35trt.stages.export import REPORT_FILE, UNQUANTIZED_STEM, export

pytestmark = pytest.mark.slow

GRAPHS = [c.value for c in exported_components(controlnet=False)] + [UNQUANTIZED_STEM]
OUTPUTS = {
    "clip_l": ["hidden_states", "text_embeds"],
    "clip_g": ["hidden_states", "text_embeds"],
    "t5": ["last_hidden_state"],
    "transformer": ["noise_pred"],
    UNQUANTIZED_STEM: ["noise_pred"],
    "vae_decoder": ["image"],
    "vae_encoder": ["latent"],
}


def _quiet(_line: str) -> None:
    pass


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_record_lists_the_graphs_and_how_they_were_made(exported_run, tiny_config):
    manifest = RunManifest(exported_run)
    rec = manifest.verified(Stage.EXPORT, tiny_config.digest(*Stage.EXPORT.config_sections))
    assert {f.path for f in rec.files} == {f"onnx/{g}.onnx" for g in GRAPHS} | {f"onnx/{REPORT_FILE}"}
    assert rec.upstream == {Stage.CALIBRATE: manifest.get(Stage.CALIBRATE).digest()}
    d = rec.details
    assert (d.opset, d.skip_layers, d.max_sequence_length) == (19, (1,), 256)
    assert d.calibration.sha256 == sha256_file(exported_run / "calibrate" / CALIBRATION_FILE)
    for c in exported_components(controlnet=False):
        entry = d.components[c]
        assert entry.onnx == f"onnx/{c.value}.onnx"
        assert (entry.precision, entry.quantized) == (Precision.FP32, c is Component.TRANSFORMER)
        assert entry.validation is ValidationStatus.PASSED
        model = onnx.load(str(exported_run / entry.onnx))
        assert {o.domain: o.version for o in model.opset_import}[""] == 19
        assert list(entry.outputs) == OUTPUTS[c.value]
    tr = d.components[Component.TRANSFORMER]
    assert tr.onnx_unquantized == f"onnx/{UNQUANTIZED_STEM}.onnx"
    assert (tr.fp8_weights, tr.fp32_blocks) == (False, ())
    assert tr.inputs["hidden_states"] == TensorSignature(
        dtype="float32", shape=("batch", 16, "latent_height", "latent_width")
    )
    assert tr.inputs["encoder_hidden_states"].shape == ("batch", "text_length", 96)
    assert tr.inputs["skip_layers"] == TensorSignature(dtype="float32", shape=(1,))
    t5 = d.components[Component.T5]
    assert t5.inputs["input_ids"] == TensorSignature(dtype="int64", shape=("batch", "t5_length"))
    assert t5.fp8_weights is None and t5.fp32_blocks is None


def test_report_has_per_output_errors_at_two_shapes(exported_run):
    graphs = json.loads((exported_run / "onnx" / REPORT_FILE).read_text())["graphs"]
    assert sorted(graphs) == sorted(GRAPHS)
    for name, g in graphs.items():
        v = g["validation"]
        assert v["status"] == "passed", name
        assert len(v["cases"]) >= 2
        assert len({tuple(next(iter(c["shapes"].values()))) for c in v["cases"]}) == len(v["cases"])
        for case in v["cases"]:
            assert sorted(case["outputs"]) == sorted(OUTPUTS[name])
            assert all(o["ok"] and o["max_abs"] <= o["allowed"] for o in case["outputs"].values())
    fp8 = graphs["transformer"]
    assert fp8["validation"]["against"] == "modelopt fake quant"
    assert fp8["validation"]["max_rel"] <= 1e-3
    # FP8 changes the numbers: the graph differs measurably from the unquantized model.
    info = [o["rel"] for c in fp8["vs_unquantized"]["cases"] for o in c["outputs"].values()]
    assert min(info) > 1e-4


def _fed_by_dq(node, producers) -> list[bool]:
    """Per input: whether it comes from a DequantizeLinear (through Transpose/Reshape/Cast)."""
    out = []
    for name in node.input:
        p = producers.get(name)
        while p is not None and p.op_type in ("Transpose", "Reshape", "Cast"):
            p = producers.get(p.input[0])
        out.append(p is not None and p.op_type == "DequantizeLinear")
    return out


def test_fp8_qdq_in_the_transformer_and_not_in_excluded_layers(exported_run, tiny_config):
    model = onnx.load(str(exported_run / "onnx" / "transformer.onnx"))
    nodes = model.graph.node
    inits = {t.name: t for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert qs and len(qs) == sum(n.op_type == "DequantizeLinear" for n in nodes)
    assert all(inits[q.input[2]].data_type == TensorProto.FLOAT8E4M3FN for q in qs)
    assert all(types[q.output[0]] == TensorProto.FLOAT8E4M3FN for q in qs)
    assert {n.domain for n in nodes} <= {""}

    producers = {o: n for n in nodes for o in n.output}
    compute = [n for n in nodes if n.op_type in ("MatMul", "Gemm", "Conv")]
    prefixes = tuple(f"/transformer/{p.rstrip('*')}" for p in tiny_config.calibrate.exclude)
    excluded = [n for n in compute if n.name.startswith(prefixes)]
    assert len(excluded) >= len(prefixes)  # every excluded module is found by name
    assert not any(any(_fed_by_dq(n, producers)) for n in excluded), [n.name for n in excluded]
    for name in ("attn/to_q/MatMul", "ff/net.2/MatMul", "norm1/linear/Gemm"):
        (node,) = [n for n in compute if n.name == f"/transformer/transformer_blocks.0/{name}"]
        assert _fed_by_dq(node, producers)[:2] == [True, True], name  # activation and weight

    for graph in ("clip_l", "clip_g", "t5", "vae_decoder", UNQUANTIZED_STEM):
        ops = {n.op_type for n in onnx.load(str(exported_run / "onnx" / f"{graph}.onnx")).graph.node}
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}, graph


def test_dynamic_shapes_match_pytorch_at_sizes_not_traced(exported_run, tiny_config):
    import torch

    from sd35trt.models.loading import load_pipeline
    from sd35trt.models.modules import wrap

    pipe = load_pipeline(tiny_config, exported_run, device="cpu", dtype=torch.float32)
    transformer = wrap(Component.TRANSFORMER, pipe.transformer, slg_layers=(1,))
    vae = wrap(Component.VAE_DECODER, pipe.vae)
    fp8 = _session(exported_run / "onnx" / "transformer.onnx")
    plain = _session(exported_run / "onnx" / f"{UNQUANTIZED_STEM}.onnx")
    decoder = _session(exported_run / "onnx" / "vae_decoder.onnx")
    gen = torch.Generator().manual_seed(7)
    for batch, h, w, skip in [(3, 8, 24, 1.0), (1, 24, 16, 0.0), (2, 12, 12, 0.0)]:
        args = (
            torch.randn(batch, 16, h, w, generator=gen),  # [B, 16, h, w]
            torch.randn(batch, 333, 96, generator=gen),  # [B, 77 + 256, D]
            torch.randn(batch, 80, generator=gen),  # [B, P]
            torch.rand(batch, generator=gen) * 1000,  # [B]
            torch.tensor([skip]),  # [1]
        )
        with torch.no_grad():
            ref = transformer(*args).numpy()
            image = vae(args[0]).numpy()
        feeds = dict(
            zip(
                ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "skip_layers"],
                [a.numpy() for a in args],
                strict=True,
            )
        )
        (got,) = plain.run(None, feeds)
        (got_fp8,) = fp8.run(None, feeds)
        (got_image,) = decoder.run(None, {"latent": args[0].numpy()})
        scale = np.abs(ref).max()
        assert got.shape == got_fp8.shape == ref.shape == (batch, 16, h, w)
        assert np.abs(got - ref).max() <= 1e-4 * scale
        assert np.abs(got_fp8 - ref).max() <= 5e-2 * scale  # FP8 error, but not garbage
        assert got_image.shape == image.shape == (batch, 3, 8 * h, 8 * w)
        assert np.abs(got_image - image).max() <= 1e-4


def test_up_to_date_export_is_not_redone(exported_run, tiny_config):
    before = RunManifest(exported_run).get(Stage.EXPORT)
    assert export(tiny_config, exported_run, progress=_quiet) == before


def test_validation_failures_are_collected_and_nothing_is_published(
    exported_run, tiny_config, copy_run, monkeypatch
):
    from sd35trt.stages.export import tracing

    run = copy_run(exported_run)
    record = RunManifest(run).get(Stage.EXPORT)
    original = tracing.reference

    def perturbed(*args):  # PyTorch and the graphs now disagree by 1.0 everywhere
        return {k: v + 1.0 for k, v in original(*args).items()}

    monkeypatch.setattr(tracing, "reference", perturbed)
    with pytest.raises(ExportError) as err:
        export(tiny_config, run, force=True, progress=_quiet)
    message = str(err.value)
    assert "\n" not in message
    expected = [f"{g} {o} at" for g, outs in OUTPUTS.items() for o in outs]
    assert all(e in message for e in expected), message
    assert message.startswith(f"export validation failed ({2 * len(expected)}):")  # two shapes each
    assert RunManifest(run).get(Stage.EXPORT) == record
    RunManifest(run).verified(Stage.EXPORT)  # the earlier export is untouched
    assert not list(run.glob(".onnx.*"))


def test_stale_calibration_is_detected(exported_run, tiny_config, copy_run):
    """faults.md 16: a calibration re-made with other settings makes the export stale, by name."""
    run = copy_run(exported_run)
    manifest = RunManifest(run)
    cal = manifest.get(Stage.CALIBRATE)
    # What a calibrate run with other settings leaves: another amax file, another config digest.
    amax = run / cal.details.calibration_file
    amax.write_bytes(amax.read_bytes()[::-1])
    changed = tiny_config.model_copy(
        update={"calibrate": tiny_config.calibrate.model_copy(update={"num_prompts": 2})}
    )
    digest = changed.digest(*Stage.CALIBRATE.config_sections)
    files = records_for_tree(run, Stage.CALIBRATE.directory)
    manifest.put(Stage.CALIBRATE, new_record(Stage.CALIBRATE, digest, files, details=cal.details))

    # What build sees: the export was made from the calibration that has just been replaced.
    with pytest.raises(StaleArtifactError, match="older calibrate output"):
        RunManifest(run).verified(Stage.EXPORT)
    # Exporting with a config the calibration no longer matches is refused, naming the stage and
    # the one command that brings the chain up to date (issue 26.5).
    with pytest.raises(
        StaleArtifactError, match=r"calibrate output .* is stale.*`sd35trt export --upstream`"
    ):
        export(tiny_config, run, progress=_quiet)
