"""Precision of exported transformer graphs: the float32 timestep, fp32 blocks, FP8 weight layout.

The transformer graph of every shipped SD3.5 config is exported for real from a cut architecture.
Full-size SD3.5 transformers take far too long to export on a CPU, so each shipped config's
architecture (sd35trt/models/tiny.py: patch size, head dim 64, RMS qk-norm, dual-attention blocks, joint
and pooled dims) is cut to two blocks, two attention heads and a small positional-embedding
table, with random weights, and exported through :func:`sd35trt.stages.export.export_component` in the
config's own precision (BF16). At the published widths one large block alone has ~200 M
parameters and the export holds several copies of the graph: the four configs took 11 minutes
and 8 GB of RAM on 2 shared cores. FP8 is left out (no calibration): the input dtypes and fp32
blocks do not depend on it. The dtypes are read back from the ONNX file that export wrote.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from sd35trt.components import Component
from sd35trt.config import Architecture, ModelSettings, ModelSource, Precision, Range, load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SD35_CONFIGS = sorted((REPO / "configs").glob("sd3.5-*.yaml"))
BLOCKS = 2  # block 0 is a full joint block, block 1 the context_pre_only last one
HEADS = 2
POS_EMBED_MAX_SIZE = 16  # the table is 192^2 x 2432 (large) or 384^2 x 1536 floats at full size


def _architecture(cfg) -> Architecture:
    if cfg.model.source is ModelSource.RANDOM:
        return cfg.model.architecture
    # A local config is named after the model it is for (sd3.5-large-turbo is an sd3.5-large).
    return next(
        a for a in (Architecture.SD35_LARGE, Architecture.SD35_MEDIUM) if cfg.name.startswith(a.value)
    )


def _cut(cfg):
    """``cfg`` on its architecture cut to BLOCKS blocks; block indices it names move to block 0."""
    runtime = cfg.runtime
    if runtime.skip_layer_guidance is not None:
        slg = runtime.skip_layer_guidance.model_copy(update={"layers": (0,)})
        runtime = runtime.model_copy(update={"skip_layer_guidance": slg})
    return cfg.model_copy(
        update={
            "model": ModelSettings(source=ModelSource.RANDOM, architecture=_architecture(cfg)),
            "calibrate": cfg.calibrate.model_copy(
                update={"high_precision_blocks": (0,) if cfg.calibrate.high_precision_blocks else ()}
            ),
            "export": cfg.export.model_copy(
                update={"quantize": False, "fp32_blocks": (0,) if cfg.export.fp32_blocks else ()}
            ),
            "build": cfg.build.model_copy(
                update={
                    "batch": Range(min=1, opt=1, max=2),
                    "height": Range.static(64),
                    "width": Range.static(64),
                }
            ),
            "runtime": runtime.model_copy(update={"max_sequence_length": 8, "height": 64, "width": 64}),
        }
    )


def _cut_architecture(full):
    def cut(arch: Architecture):
        a = full(arch)
        if arch is Architecture.TINY:
            return a
        tr = dict(a.transformer, num_layers=BLOCKS, pos_embed_max_size=POS_EMBED_MAX_SIZE)
        tr.update(num_attention_heads=HEADS, caption_projection_dim=HEADS * tr["attention_head_dim"])
        tr["dual_attention_layers"] = tuple(i for i in tr["dual_attention_layers"] if i < BLOCKS)
        return dataclasses.replace(a, transformer=tr)

    return cut


@pytest.fixture(scope="module")
def export_transformer(tmp_path_factory):
    """``export(cfg) -> ONNX path`` of a cut config's transformer, exported once per distinct graph.

    The large configs (local, turbo, random) share one architecture and export settings, so they
    share one export.
    """
    from sd35trt.models import tiny
    from sd35trt.models.loading import model_dir
    from sd35trt.stages.export import export_component

    done: dict[tuple, tuple[Path, list[str]]] = {}

    def export(cfg):
        slg = cfg.runtime.skip_layer_guidance
        key = (cfg.model.architecture, cfg.export, slg.layers if slg else ())
        if key not in done:
            out = tmp_path_factory.mktemp("export")
            root = model_dir(cfg, out / "run")
            lines: list[str] = []
            (path,) = export_component(cfg, root, Component.TRANSFORMER, out / "onnx", progress=lines.append)
            done[key] = (path, lines)
        return done[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "architecture_config", _cut_architecture(tiny.architecture_config))
        yield export


def _types(model) -> dict[str, int]:
    g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def test_the_shipped_sd35_configs_are_all_covered():
    names = {p.stem for p in SD35_CONFIGS}
    assert {"sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"} <= names
    for path in SD35_CONFIGS:
        cfg = load_config(path)
        assert cfg.export.precision.transformer is Precision.BF16, path.name
        _architecture(cfg)  # every one maps to a published architecture


@pytest.mark.parametrize("path", SD35_CONFIGS, ids=lambda p: p.stem)
def test_bf16_export_of_every_shipped_config_has_a_float32_timestep(path, export_transformer):
    shipped = load_config(path)
    cfg = _cut(shipped)
    onnx_path, lines = export_transformer(cfg)
    model = onnx.load(str(onnx_path))
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    bf16 = TensorProto.BFLOAT16
    assert inputs["timestep"] == TensorProto.FLOAT
    assert inputs["hidden_states"] == inputs["encoder_hidden_states"] == inputs["pooled_projections"] == bf16
    assert inputs.get("skip_layers", bf16) == bf16

    # The sinusoidal embedding is computed from the float32 timestep in float32 (as diffusers does),
    # and only its result is cast to bfloat16.
    types = _types(model)
    sinusoid = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sinusoid and all(types[n.input[0]] == types[n.output[0]] == TensorProto.FLOAT for n in sinusoid)

    # The config's fp32 block (block 35 of the large configs, block 0 of the cut model) computes in
    # float32, the others in bfloat16.
    gemms = [
        n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and "/transformer_blocks." in n.name
    ]
    by_block: dict[int, set[int]] = {}
    for n in gemms:
        block = int(n.name.split("/transformer_blocks.")[1].split("/")[0])
        by_block.setdefault(block, set()).add(types[n.output[0]])
    fp32 = set(cfg.export.fp32_blocks)
    assert by_block == {b: {TensorProto.FLOAT if b in fp32 else bf16} for b in range(BLOCKS)}
    assert bool(fp32) is (35 in shipped.export.fp32_blocks)
    # validated although ORT has no bf16 kernels on the CPU: in the graph's float32 form
    assert any("transformer" in line and "(float32 form)" in line for line in lines)


def _block(node) -> int | None:
    """The transformer block a node belongs to, from its scope name."""
    if "/transformer_blocks." not in node.name:
        return None
    return int(node.name.split("/transformer_blocks.")[1].split("/")[0])


@pytest.fixture(scope="module")
def fp32_block_export(tiny_config, tiny_model_dir, tmp_path_factory):
    """The tiny transformer exported in BF16 with FP8 and block 0 in fp32 (out of FP8 as well)."""
    import torch

    from sd35trt.models import quantize
    from sd35trt.models.tiny import build_components
    from sd35trt.stages.export import export_component

    calibrate = tiny_config.calibrate.model_copy(update={"high_precision_blocks": (0,)})
    precision = tiny_config.export.precision.model_copy(update={"transformer": Precision.BF16})
    export = tiny_config.export.model_copy(update={"precision": precision, "fp32_blocks": (0,)})
    cfg = tiny_config.model_copy(update={"calibrate": calibrate, "export": export})
    out = tmp_path_factory.mktemp("fp32-block")

    # A calibration with block 0 kept out of FP8 (amax from random inputs: only the layout matters).
    transformer = build_components(Architecture.TINY, only={"transformer"})["transformer"]
    gen = torch.Generator().manual_seed(0)

    def forward_loop(model):
        model(
            hidden_states=torch.randn(2, 16, 8, 8, generator=gen),
            encoder_hidden_states=torch.randn(2, 20, 96, generator=gen),
            pooled_projections=torch.randn(2, 80, generator=gen),
            timestep=torch.tensor([900.0, 100.0]),
        )

    quantize.quantize(transformer, calibrate, forward_loop)
    quantize.save_calibration(transformer, out / "amax.safetensors")
    paths = export_component(
        cfg, tiny_model_dir, Component.TRANSFORMER, out / "onnx", calibration=out / "amax.safetensors"
    )
    return [onnx.load(str(p)) for p in paths]


def test_fp32_block_computes_in_float32_between_casts_and_the_others_in_bf16(fp32_block_export):
    fp8, unquantized = fp32_block_export
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    for model in (fp8, unquantized):
        types = _types(model)
        gemms: dict[int, set[int]] = {}
        for n in model.graph.node:
            if n.op_type in ("MatMul", "Gemm") and _block(n) is not None:
                gemms.setdefault(_block(n), set()).add(types[n.output[0]])
        assert gemms == {0: {f32}, 1: {bf16}, 2: {bf16}}
        assert {v.name: v.type.tensor_type.elem_type for v in model.graph.input}["timestep"] == f32

        # Casts at the boundary: the block's three inputs (image and text streams, the
        # conditioning) are widened from bf16 on entry, its two outputs narrowed back on exit.
        producers = {o: n for n in model.graph.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in model.graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        casts = [n for n in model.graph.node if n.op_type == "Cast" and _block(n) is None]
        to = {n.name: next(a.i for a in n.attribute if a.name == "to") for n in casts}
        widen = [
            n
            for n in casts
            if to[n.name] == f32
            and types[n.input[0]] == bf16
            and any(_block(u) == 0 for u in consumers[n.output[0]])
        ]
        narrow = [
            n
            for n in casts
            if to[n.name] == bf16
            and types[n.input[0]] == f32
            and n.input[0] in producers
            and _block(producers[n.input[0]]) == 0
        ]
        assert (len(widen), len(narrow)) == (3, 2)

    # FP8: none in the fp32 block, the others quantized, every weight straight from DQ into its GEMM.
    qdq = [n for n in fp8.graph.node if n.op_type == "DequantizeLinear"]
    assert {_block(n) for n in qdq} >= {1, 2} and 0 not in {_block(n) for n in qdq}
    assert _dq_weight_users(fp8) and all(ok for _, ok in _dq_weight_users(fp8))


def _dq_weight_users(model) -> list[tuple[str, bool]]:
    """Per dequantized weight: (its DQ, whether every user is a MatMul / Gemm(transB=0) reading it as B)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    out = []
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        q = producers.get(dq.input[0])
        weight = dq.input[0] if q is None else q.input[0]
        if weight not in inits:
            continue  # an activation's Q/DQ
        users = [n for n in model.graph.node if dq.output[0] in n.input]
        ok = bool(users) and all(
            u.op_type in ("MatMul", "Gemm")
            and list(u.input).index(dq.output[0]) == 1
            and next((a.i for a in u.attribute if a.name == "transB"), 0) == 0
            for u in users
        )
        out.append((dq.name, ok))
    return out


def test_exported_fp8_weights_reach_their_gemm_straight_from_dequantize(exported_run):
    """The tiny run's FP8 export: no Transpose between a weight's DQ and its MatMul (TensorRT's FP8 GEMM).

    That the numbers are unchanged is the export's own validation against ModelOpt's fake quant,
    which passed for this graph (tests/e2e/test_export.py checks its report).
    """
    import json

    model = onnx.load(str(exported_run / "onnx" / "transformer.onnx"))
    users = _dq_weight_users(model)
    bad = [name for name, ok in users if not ok]
    assert users and not bad, bad
    report = json.loads((exported_run / "onnx" / "export_report.json").read_text())["graphs"]["transformer"]
    assert report["fp8"]["weights_pretransposed"] == len(users)
    assert report["validation"]["status"] == "passed"


def test_an_fp32_block_the_transformer_does_not_have_is_refused_before_anything_runs(
    tiny_config, tiny_model_dir, tmp_path
):
    from sd35trt.errors import ConfigError
    from sd35trt.stages.export import export_component

    precision = tiny_config.export.precision.model_copy(update={"transformer": Precision.BF16})
    export = tiny_config.export.model_copy(
        update={"precision": precision, "quantize": False, "fp32_blocks": (3,)}
    )
    cfg = tiny_config.model_copy(update={"export": export})
    with pytest.raises(
        ConfigError, match=r"export\.fp32_blocks has \[3\]; this transformer has 3 blocks: allowed 0\.\.2"
    ):
        export_component(cfg, tiny_model_dir, Component.TRANSFORMER, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("source", [ModelSource.RANDOM, ModelSource.TINY])
def test_fp16_clip_exports_from_random_and_saved_weights(tiny_config, tmp_path, source):
    """A random-weight model traces its text encoders with eager attention too: torch's SDPA export
    casts the scores to float32 and a 16-bit CLIP graph then fails the ONNX checker ("LayerNormalization
    Scale has inconsistent type float16"), which stopped `sd35trt export` of sd3.5-medium-random."""
    from sd35trt.models.loading import model_dir
    from sd35trt.stages.export import export_component

    precision = tiny_config.export.precision.model_copy(update={"clip_l": Precision.FP16})
    cfg = tiny_config.model_copy(
        update={
            "model": ModelSettings(source=source, architecture=Architecture.TINY),
            "export": tiny_config.export.model_copy(update={"precision": precision}),
        }
    )
    root = model_dir(cfg, tmp_path / "run")
    (path,) = export_component(cfg, root, Component.CLIP_L, tmp_path / "onnx", progress=lambda _: None)
    model = onnx.load(path)
    assert not [n.name for n in model.graph.node if n.op_type == "Trilu"]  # no SDPA causal-mask pattern
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("layer_norm1.weight")} == {
        TensorProto.FLOAT16
    }


def test_the_sd3_layout_controlnet_exports_in_bf16(tiny_config, tiny_model_dir, tmp_path):
    """The built-in tiny ControlNet (SD3 layout: ``force_zeros_for_pooled_projection``) in the
    transformer's BF16: its zeroed pooled projection is made in float32 and cast, since ONNX's
    ConstantOfShape has no bfloat16 output before opset 20 (the checker refused the graph)."""
    from sd35trt.config import ControlNetSettings, ControlType
    from sd35trt.stages.export import export_component

    precision = tiny_config.export.precision.model_copy(update={"transformer": Precision.BF16})
    cfg = tiny_config.model_copy(
        update={
            "model": tiny_config.model.model_copy(
                update={"controlnet": ControlNetSettings(type=ControlType.CANNY)}
            ),
            "export": tiny_config.export.model_copy(update={"precision": precision, "quantize": False}),
        }
    )
    lines: list[str] = []
    (path,) = export_component(
        cfg, tiny_model_dir, Component.CONTROLNET_CANNY, tmp_path, progress=lines.append
    )
    model = onnx.load(str(path))
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    bf16 = TensorProto.BFLOAT16
    assert inputs["hidden_states"] == inputs["pooled_projections"] == bf16
    assert inputs["timestep"] == TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == bf16 for v in model.graph.output)
    types = _types(model)
    assert all(types.get(n.output[0]) != bf16 for n in model.graph.node if n.op_type == "ConstantOfShape")
    assert any("controlnet" in line and "bf16" in line and "(float32 form)" in line for line in lines)
