"""The build stage with the ONNX Runtime backend, on small ONNX models made here.

The models have exactly the components' I/O contracts (names, dtypes, dynamic axes) at tiny
sizes; the transformer carries an FP8 QuantizeLinear/DequantizeLinear pair on both inputs of a
MatMul, as ModelOpt's export does, so ORT_ENABLE_BASIC is exercised on a real FP8 pattern.
"""

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper
from record_fakes import DIMS
from torch import nn

from sd35trt.artifacts.files import records_for_tree
from sd35trt.artifacts.manifest import RunManifest, Stage, new_record
from sd35trt.artifacts.records import (
    BuildRecord,
    ExportDetails,
    ExportedComponent,
    Fingerprint,
    ValidationStatus,
)
from sd35trt.backends.load import open_engines, verify_engines
from sd35trt.backends.machine import GpuInfo, MachineInfo
from sd35trt.backends.onnxruntime import GRAPH_OPTIMIZATION_LEVEL, OrtEngine, optimize_model
from sd35trt.backends.registry import resolve_backend
from sd35trt.components import (
    Component,
    ComponentSpec,
    TensorSpec,
    TensorType,
    Tolerance,
    exported_components,
    spec,
)
from sd35trt.config import Backend, Config, Precision, config_from_dict
from sd35trt.errors import (
    BackendUnavailableError,
    BuildError,
    ModelError,
    RunDirError,
    StaleArtifactError,
    VerificationError,
)
from sd35trt.stages.build import build, choose_source, onnx_inputs
from sd35trt.stages.export.onnx_files import io_signature

# pos_embed_max_size 8 covers up to 8 * 2 * 8 = 128 px
SKIP_LAYERS = 2
VOCAB = 64
CPU = MachineInfo(tensorrt_version=None, gpu=None)


def _config(**runtime) -> Config:
    return config_from_dict(
        {
            "name": "synthetic",
            "build": {
                "batch": {"min": 1, "opt": 1, "max": 2},
                "height": {"min": 32, "opt": 64, "max": 128},
                "width": {"min": 32, "opt": 64, "max": 128},
            },
            "runtime": {"height": 64, "width": 64, "max_sequence_length": 8, **runtime},
        }
    )


class _Clip(nn.Module):
    def __init__(self, hidden: int, projection: int) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(VOCAB, hidden), nn.Linear(hidden, projection)

    def forward(self, input_ids):
        h = self.emb(input_ids)  # [B, 77, H]
        return h, self.proj(h.mean(1))


class _T5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(VOCAB, DIMS.t5_hidden), nn.Linear(DIMS.t5_hidden, DIMS.t5_hidden)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = DIMS.latent_channels
        self.conv = nn.Conv2d(c, c, 1)
        self.text = nn.Linear(DIMS.joint_attention_dim, c)  # 3-D input: exported as MatMul + Add
        self.pooled = nn.Linear(DIMS.pooled_projection_dim, c)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers):
        cond = (
            self.text(encoder_hidden_states).mean(1)
            + self.pooled(pooled_projections)
            + timestep[:, None] / 1000
        )
        return (self.conv(hidden_states) + cond[:, :, None, None]) * (1 - 0.1 * skip_layers.mean())


class _Vae(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(DIMS.latent_channels, 3, 3, padding=1)

    def forward(self, latent):
        up = nn.functional.interpolate(self.conv(latent), scale_factor=DIMS.vae_scale_factor, mode="nearest")
        return torch.sigmoid(up)  # [B, 3, 8h, 8w]


class _VaeEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, DIMS.latent_channels, DIMS.vae_scale_factor, stride=DIMS.vae_scale_factor)

    def forward(self, image, noise):
        return self.conv(image) + 0.1 * noise  # [B, C, H/8, W/8]


def _sample_inputs(component: Component, batch: int = 1, latent: tuple[int, int] = (8, 8)) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + latent[0])
    sp = spec(component, DIMS, SKIP_LAYERS if component is Component.TRANSFORMER else 0)
    sizes = {
        "batch": batch,
        "latent_height": latent[0],
        "latent_width": latent[1],
        "height": latent[0] * DIMS.vae_scale_factor,
        "width": latent[1] * DIMS.vae_scale_factor,
        "t5_length": 8,
        "text_length": 85,
    }
    out = {}
    for t in sp.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype.value == "int64":
            out[t.name] = torch.randint(0, VOCAB, shape, generator=g)
        elif t.name == "skip_layers":
            out[t.name] = torch.tensor([1.0, 0.0])
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


def fp8_qdq(model: onnx.ModelProto, node_name: str, scales: list[float]) -> None:
    """Put an FP8 E4M3 Q/DQ pair (float8e4m3fn zero point) on each input of node ``node_name``."""
    at, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == node_name)
    zp = f"{node_name}_zp"
    model.graph.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    pairs = []
    for i, scale in enumerate(scales):
        s, q, dq = f"{node_name}_s{i}", f"{node_name}_q{i}", f"{node_name}_dq{i}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), s))
        pairs += [
            helper.make_node("QuantizeLinear", [node.input[i], s, zp], [q], name=q),
            helper.make_node("DequantizeLinear", [q, s, zp], [dq], name=dq),
        ]
        node.input[i] = dq
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:at], *pairs, *nodes[at:]])


def _export(component: Component, module: nn.Module, path: Path) -> None:
    sp = spec(component, DIMS, SKIP_LAYERS if component is Component.TRANSFORMER else 0)
    feeds = _sample_inputs(component)
    torch.onnx.export(
        module.eval(),
        tuple(feeds[n] for n in sp.input_names),
        str(path),
        input_names=sp.input_names,
        output_names=sp.output_names,
        dynamic_axes=sp.dynamic_axes,
        opset_version=19,
        dynamo=False,
    )
    if component is Component.TRANSFORMER:
        model = onnx.load(str(path))
        matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
        fp8_qdq(model, matmul.name, [0.02, 0.004])
        assert [i.endswith(("_dq0", "_dq1")) for i in matmul.input] == [True, True]
        onnx.checker.check_model(model)
        onnx.save(model, str(path))


def make_export_run(root: Path, config: Config) -> Path:
    """A run directory as the export stage leaves it (ONNX files, model dir, export record)."""
    torch.manual_seed(0)
    run_dir = root / "run"
    model_dir = root / "model"
    for sub, name in (
        ("tokenizer", "vocab.json"),
        ("tokenizer_2", "vocab.json"),
        ("tokenizer_3", "spiece.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        (model_dir / sub).mkdir(parents=True)
        (model_dir / sub / name).write_text(json.dumps({"folder": sub}))
    onnx_dir = run_dir / "onnx"
    onnx_dir.mkdir(parents=True)
    modules = {
        Component.CLIP_L: _Clip(DIMS.clip_l_hidden, DIMS.clip_l_projection),
        Component.CLIP_G: _Clip(DIMS.clip_g_hidden, DIMS.clip_g_projection),
        Component.T5: _T5(),
        Component.TRANSFORMER: _Transformer(),
        Component.VAE_DECODER: _Vae(),
        Component.VAE_ENCODER: _VaeEncoder(),
    }
    entries = {}
    for component, module in modules.items():
        path = onnx_dir / f"{component.value}.onnx"
        _export(component, module, path)
        signature = io_signature(onnx.load(str(path)))
        is_transformer = component is Component.TRANSFORMER
        entries[component] = ExportedComponent(
            onnx=f"onnx/{component.value}.onnx",
            external_data=None,
            precision=Precision.FP32,
            quantized=is_transformer,
            inputs=signature["inputs"],
            outputs=signature["outputs"],
            validation=ValidationStatus.PASSED,
            onnx_unquantized=None,
            fp8_weights=False if is_transformer else None,
            fp32_blocks=() if is_transformer else None,
        )
    details = ExportDetails(
        model_dir=model_dir,
        dims=DIMS,
        opset=19,
        skip_layers=tuple(range(SKIP_LAYERS)),
        max_sequence_length=config.runtime.max_sequence_length,
        report="onnx/export_report.json",
        calibration=None,
        components=entries,
    )
    record = new_record(
        Stage.EXPORT,
        config.digest(*Stage.EXPORT.config_sections),
        records_for_tree(run_dir, "onnx"),
        details=details,
    )
    RunManifest(run_dir).put(Stage.EXPORT, record)
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return make_export_run(tmp_path_factory.mktemp("synthetic"), _config())


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory) -> tuple[Path, BuildRecord, list[str]]:
    run_dir = tmp_path_factory.mktemp("built") / "run"
    shutil.copytree(exported, run_dir)
    lines: list[str] = []
    record = build(_config(), run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lines.append)
    return run_dir, record, lines


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_build_writes_engines_manifest_and_record(built):
    run_dir, record, lines = built
    engines_dir = run_dir / "engines"
    assert record == RunManifest(run_dir).verified(Stage.BUILD, Fingerprint.of(_config(), Stage.BUILD))
    assert record.details.backend is Backend.ONNXRUNTIME
    assert record.details.components[Component.TRANSFORMER].fp8 is True
    data = json.loads((engines_dir / "manifest.json").read_text())
    assert set(data["engines"]) == {c.value for c in exported_components(cache=False)}
    tr = data["engines"]["transformer"]
    assert tr["file"]["path"] == "transformer.onnx" and tr["fp8"] is True and tr["precision"] == "fp32"
    assert tr["skip_layers"] == SKIP_LAYERS
    assert tr["profile"]["hidden_states"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}
    assert tr["profile"]["encoder_hidden_states"]["max"] == [4, 85, 16]
    assert tr["options"]["graph_optimization_level"] == GRAPH_OPTIMIZATION_LEVEL
    assert (tr["tensorrt_version"], tr["gpu_name"], tr["compute_capability"]) == (None, None, None)
    assert tr["build_seconds"] > 0
    exported = RunManifest(run_dir).get(Stage.EXPORT).files
    assert tr["source_onnx"] == next(f.to_json() for f in exported if f.path == "onnx/transformer.onnx")
    assert data["dims"] == DIMS.to_json() and data["runtime_defaults"]["max_sequence_length"] == 8
    assert {f["path"] for f in data["support_files"]} == {
        "tokenizer/vocab.json",
        "tokenizer_2/vocab.json",
        "tokenizer_3/spiece.json",
        "scheduler/scheduler_config.json",
        "config.yaml",
    }
    assert yaml.safe_load((engines_dir / "config.yaml").read_text())["name"] == _config().name
    # One progress line per component start and end.
    assert next(ln for ln in lines if "onnxruntime build from" in ln).startswith("[1/6] clip_l")
    assert sum("done in" in ln for ln in lines) == 6
    assert data["engines"]["vae_encoder"]["profile"]["image"] == {
        "min": [1, 3, 32, 32],
        "opt": [1, 3, 64, 64],
        "max": [2, 3, 128, 128],
    }


def test_fp8_qdq_survives_in_the_transformer_engine(built):
    run_dir, _, _ = built
    ops = [n.op_type for n in onnx.load(str(run_dir / "engines" / "transformer.onnx")).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "MatMulIntegerToFloat" not in ops
    fp8_inits = [
        t.name
        for t in onnx.load(str(run_dir / "engines" / "transformer.onnx")).graph.initializer
        if t.data_type == TensorProto.FLOAT8E4M3FN
    ]
    assert len(fp8_inits) >= 2  # the weight's Q was folded into an FP8 initializer


@pytest.mark.parametrize(("batch", "latent"), [(1, (4, 8)), (4, (16, 12))])
def test_engines_match_the_exported_graphs(built, batch, latent):
    run_dir, _, _ = built
    manifest = verify_engines(run_dir / "engines")
    engines = open_engines(manifest, intra_op_threads=1)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for component, engine in engines.items():
        assert isinstance(engine, OrtEngine)
        feeds = _sample_inputs(component, batch, latent)
        reference = ort.InferenceSession(str(run_dir / "onnx" / f"{component.value}.onnx"), plain)
        expected = reference.run(None, {n: t.numpy() for n, t in feeds.items()})
        with engine:
            got = engine.infer(feeds)
        for name, want in zip(engine.spec.output_names, expected, strict=True):
            assert got[name].dtype == torch.float32 and tuple(got[name].shape) == want.shape
            np.testing.assert_allclose(
                got[name].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{component} {name}"
            )


def test_up_to_date_build_is_reused_and_force_rebuilds(built, tmp_path):
    run_dir = _copy(built[0], tmp_path)
    marker = run_dir / "engines" / "stray.txt"
    marker.write_text("left by hand")
    lines: list[str] = []
    again = build(_config(), run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lines.append)
    assert again == built[1] and marker.exists() and any("up to date" in ln for ln in lines)
    # A file no record lists is never removed (faults.md #29): the rebuild is refused, naming it.
    with pytest.raises(RunDirError, match=r"holds files no build record lists \(engines/stray\.txt\)"):
        build(_config(), run_dir, Backend.ONNXRUNTIME, force=True, machine=CPU, progress=lines.append)
    assert marker.read_text() == "left by hand"
    marker.unlink()
    rebuilt = build(_config(), run_dir, Backend.ONNXRUNTIME, force=True, machine=CPU, progress=lines.append)
    assert rebuilt.created >= built[1].created
    # A damaged engine is a reason to rebuild, not to fail.
    (run_dir / "engines" / "vae_decoder.onnx").write_bytes(b"truncated")
    build(_config(), run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lines.append)
    verify_engines(run_dir / "engines")
    # So is a change of a build-relevant setting.
    changed = _config(guidance_scale=1.0)
    record = build(changed, run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lines.append)
    assert record.config_digest == Fingerprint.of(changed, Stage.BUILD).digest != rebuilt.config_digest


def test_auto_without_tensorrt_uses_onnxruntime_and_says_so(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    lines: list[str] = []
    record = build(_config(), run_dir, Backend.AUTO, machine=CPU, progress=lines.append)
    assert record.details.backend is Backend.ONNXRUNTIME
    assert lines[0] == (
        "build backend onnxruntime "
        "(auto: no TensorRT (import tensorrt failed) and no CUDA GPU, using ONNX Runtime)"
    )


def test_tensorrt_requested_where_absent_fails_and_keeps_engines(built, tmp_path):
    run_dir = _copy(built[0], tmp_path)
    before = (run_dir / "engines" / "manifest.json").read_bytes()
    with pytest.raises(BackendUnavailableError, match=r"backend tensorrt needs TensorRT and a CUDA GPU"):
        build(_config(), run_dir, Backend.TENSORRT, machine=CPU, progress=lambda _: None)
    assert (run_dir / "engines" / "manifest.json").read_bytes() == before
    assert RunManifest(run_dir).get(Stage.BUILD) == built[1]


def test_failed_build_publishes_nothing(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    rec = RunManifest(run_dir).get(Stage.EXPORT)
    moved = rec.details.model_copy(update={"model_dir": tmp_path / "nowhere"})
    RunManifest(run_dir).put(Stage.EXPORT, rec.model_copy(update={"details": moved}))
    with pytest.raises(ModelError, match=r"nowhere/tokenizer is missing"):
        build(_config(), run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lambda _: None)
    assert not (run_dir / "engines").exists() and not list(run_dir.glob(".engines*"))
    assert RunManifest(run_dir).get(Stage.BUILD) is None


def test_stale_or_corrupt_export_is_refused(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    other = config_from_dict({**_config().model_dump(mode="json"), "export": {"opset": 20}})
    with pytest.raises(StaleArtifactError, match=r"export output .* is stale"):
        build(other, run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lambda _: None)
    onnx_file = run_dir / "onnx" / "t5.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(VerificationError, match=r"t5\.onnx has \d+ bytes"):
        build(_config(), run_dir, Backend.ONNXRUNTIME, machine=CPU, progress=lambda _: None)


def _fp8_matmul_model(n: int = 4) -> tuple[onnx.ModelProto, np.ndarray]:
    """``y = fq(x) @ fq(w)`` with FP8 fake quantization of both operands; ``w`` is ``[8, n]``."""
    w = np.random.default_rng(0).standard_normal((8, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    fp8_qdq(model, node.name, [0.05, float(np.abs(w).max() / 448)])
    onnx.checker.check_model(model)
    return model, w


def _matmul_spec(n: int) -> ComponentSpec:
    return ComponentSpec(
        Component.TRANSFORMER,
        inputs=(TensorSpec("x", TensorType.FLOAT, ("b", 8)),),
        outputs=(TensorSpec("y", TensorType.FLOAT, ("b", n)),),
        tolerance=Tolerance(rtol=1e-3, atol=1e-4),
    )


def _fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    return (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


def test_engine_gives_the_fp8_fake_quant_result_at_the_build_level(tmp_path):
    """The built engine computes FP8 E4M3 Q/DQ exactly as fake quant does, at the level the build records."""
    model, w = _fp8_matmul_model()
    src = tmp_path / "fp8.onnx"
    onnx.save(model, str(src))
    options = optimize_model(src, tmp_path / "engine.onnx", external_data=False)
    assert options["graph_optimization_level"] == GRAPH_OPTIMIZATION_LEVEL
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    with OrtEngine(_matmul_spec(4), tmp_path / "engine.onnx") as engine:
        y = engine.infer({"x": torch.from_numpy(x)})["y"].numpy()
    expected = _fake_quant(x, 0.05) @ _fake_quant(w, float(np.abs(w).max() / 448))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(y - x @ w).max() > 1e-3  # FP8 really happened: the unquantized product differs


def test_external_data_models_build_with_their_data_file(tmp_path):
    model, _ = _fp8_matmul_model(n=512)  # 4 KiB of FP8 weights: above the external-data threshold
    src = tmp_path / "big.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    assert onnx_inputs(src)[1]  # recognised as external data, location accepted
    optimize_model(src, tmp_path / "engine.onnx", external_data=True)
    assert (tmp_path / "engine.onnx.data").stat().st_size > 0
    with OrtEngine(_matmul_spec(512), tmp_path / "engine.onnx") as engine:
        assert engine.infer({"x": torch.ones(2, 8)})["y"].shape == (2, 512)


@pytest.mark.parametrize("location", ["../outside.data", "/abs/path.data", "link.data"])
def test_unsafe_external_data_locations_are_refused(tmp_path, location):
    model, _ = _fp8_matmul_model()
    sub = tmp_path / "m"
    sub.mkdir()
    src = sub / "m.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="real.data", size_threshold=0)
    (tmp_path / "outside.data").write_bytes((sub / "real.data").read_bytes())
    (sub / "link.data").symlink_to(sub / "real.data")
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(src))
    with pytest.raises(ModelError, match=rf"m\.onnx.*{location.split('/')[-1]}"):
        onnx_inputs(src)


def test_bfloat16_inputs_and_outputs_round_trip(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["last_hidden_state"])],
        "bf16",
        [helper.make_tensor_value_info("input_ids", TensorProto.BFLOAT16, ["b", 3])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.BFLOAT16, ["b", 3])],
    )
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    sp = spec(Component.T5, DIMS)
    x = torch.tensor([[1.5, -2.25, 3.0]])  # fp32 in: converted to the engine's bf16
    with OrtEngine(sp, path) as engine:
        y = engine.infer({"input_ids": x})["last_hidden_state"]
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.to(torch.bfloat16))


def test_choose_source_falls_back_without_fp8():
    entry = ExportedComponent(
        onnx="onnx/transformer.onnx",
        external_data=None,
        precision=Precision.BF16,
        quantized=True,
        inputs={},
        outputs={},
        validation=ValidationStatus.PASSED,
        onnx_unquantized="onnx/transformer_bf16.onnx",
        fp8_weights=False,
    )
    ampere, ada = GpuInfo("NVIDIA A100", (8, 0)), GpuInfo("NVIDIA L4", (8, 9))
    src = choose_source(Component.TRANSFORMER, entry, Backend.TENSORRT, ampere)
    assert (src.path, src.fp8) == ("onnx/transformer_bf16.onnx", False) and "sm_80) has no FP8" in src.note
    assert choose_source(Component.TRANSFORMER, entry, Backend.TENSORRT, ada).fp8 is True
    assert choose_source(Component.TRANSFORMER, entry, Backend.ONNXRUNTIME, None).fp8 is True
    with pytest.raises(BuildError, match=r"NVIDIA A100 \(sm_80\) has no FP8 .* no unquantized transformer"):
        no_fallback = entry.model_copy(update={"onnx_unquantized": None})
        choose_source(Component.TRANSFORMER, no_fallback, Backend.TENSORRT, ampere)


def test_resolve_backend():
    gpu = MachineInfo("11.4.0", GpuInfo("NVIDIA H100", (9, 0)))
    assert resolve_backend(Backend.AUTO, gpu)[0].backend is Backend.TENSORRT
    assert resolve_backend(Backend.ONNXRUNTIME, gpu)[0].backend is Backend.ONNXRUNTIME
    backend, reason = resolve_backend(Backend.AUTO, MachineInfo("11.4.0", None))
    assert (backend.backend, reason) == (Backend.ONNXRUNTIME, "auto: no CUDA GPU, using ONNX Runtime")
    with pytest.raises(
        BackendUnavailableError, match=r"this machine has no TensorRT \(import tensorrt failed\)"
    ):
        resolve_backend(Backend.TENSORRT, MachineInfo(None, gpu.gpu))


# The TensorRT build path runs against fakes derived from the real TensorRT 10 and 11 bindings in
# tests/unit/test_tensorrt_api.py.
