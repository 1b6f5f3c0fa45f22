"""One component's export, step by step: trace, write the graph(s), validate (:func:`export_graphs`).

Validation failures are collected on each :class:`Graph`; the caller raises them together.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.components import Component, ComponentSpec, ModelDims, sample_shapes, spec, validation_tolerance
from sd35trt.config import Config, Precision
from sd35trt.errors import ExportError
from sd35trt.stages.driver import Progress
from sd35trt.stages.export.report import report_line

if TYPE_CHECKING:
    from onnx import ModelProto

    from sd35trt.models.controlnet import ResolvedControlNet
    from sd35trt.stages.export import reference, validate


@dataclass
class Job:
    """What every component's export needs, resolved once (by the stage)."""

    config: Config
    root: Path  # the diffusers model directory
    loras: tuple  # ResolvedLora: fused into every component they have weights for
    dims: ModelDims
    out: Path  # the staged onnx/ directory
    scratch: Path
    slg: tuple[int, ...]
    controlnets: dict[Component, ResolvedControlNet]  # model.controlnet's, by component
    calibration: Path | None
    device: str
    providers: list[str]
    external_threshold: int
    progress: Progress
    phase: Progress = lambda _name: None  # receives each export step's name as it starts


@dataclass
class Graph:
    """One written ONNX graph and its validation results."""

    stem: str
    component: Component
    precision: Precision
    quantized: bool
    files: list[Path] = field(default_factory=list)
    signature: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    information: dict | None = None
    fp8: dict | None = None
    seconds: float = 0.0
    #: the data file this graph reads when it is another graph's (the unquantized transformer).
    shared_data: Path | None = None
    #: transformer blocks computed in fp32 inside a 16-bit graph.
    fp32_blocks: tuple[int, ...] = ()

    @property
    def external_data(self) -> Path | None:
        own = next((p for p in self.files if p.suffix == ".data"), None)
        return own or self.shared_data


def component_precision(config: Config, component: Component) -> Precision:
    """The precision ``component`` is exported in (``export.precision``)."""
    # The ControlNet is exported in the transformer's precision (it is made of its blocks).
    model = Component.TRANSFORMER if component.is_controlnet else component.model
    return getattr(config.export.precision, model.value)


def unquantized_stem(component: Component) -> str:
    """File stem of a transformer graph's copy without Q/DQ (``transformer_unquantized`` for the whole)."""
    return f"{component.value}_unquantized"


@dataclass
class _Plan:
    """What one component's export traces and validates, decided before anything is loaded."""

    component: Component
    precision: Precision
    quantized: bool  # the FP8 transformer (or one of its first-block-cache parts)
    sp: ComponentSpec
    trace_shapes: dict[str, tuple[int, ...]]
    check_shapes: list[dict[str, tuple[int, ...]]]
    opset: int
    trace_opset: int
    raw: Path  # the traced graph, in the scratch directory


def export_graphs(job: Job, component: Component, label: str) -> list[Graph]:
    """Trace, process, save and validate one component (two graphs for the FP8 transformer).

    Each step is its own function, so what a step loads is gone when it returns: the module
    after :func:`_trace_component`, the graph protos after :func:`_write_graphs`, the ONNX
    Runtime session inside :func:`_validate_graphs`. An FP8 transformer is loaded twice: to trace,
    and again after ONNX Runtime has run, as its reference follows ONNX Runtime's FP8 codes one
    step away (:mod:`sd35trt.stages.export.reference`); the module and the session never coexist.
    """
    t0 = time.perf_counter()
    plan = _plan(job, component)
    cases, ref = _trace_component(job, plan)
    graphs = _write_graphs(job, plan)
    _validate_graphs(job, plan, graphs, cases, ref)
    graphs[0].seconds = time.perf_counter() - t0
    shutil.rmtree(plan.raw.parent, ignore_errors=True)
    job.progress(report_line(label, graphs))
    return graphs


def _plan(job: Job, component: Component) -> _Plan:
    """The component's spec, precision and shapes (:func:`~sd35trt.components.sample_shapes`)."""
    from sd35trt.stages.export import tracing

    config = job.config
    # the first-block-cache head never gates a block (the config keeps block 0 out of SLG)
    gated = component.is_transformer and component is not Component.TRANSFORMER_FIRST_BLOCK
    n_skip = len(job.slg) if gated else 0
    # the ControlNet residual input is the whole transformer's only (never with runtime.cache);
    # every ControlNet has the same block count and layout (resolve_controlnets checks it)
    nets = list(job.controlnets.values())
    cn = job.controlnets.get(component) or (nets[0] if component is Component.TRANSFORMER and nets else None)
    controlnet = (cn.layers, cn.takes_text) if cn is not None else (0, True)
    trace_shapes, *check_shapes = sample_shapes(
        component, job.dims, config.build, config.runtime.max_sequence_length, n_skip, *controlnet
    )
    raw = job.scratch / component.value / f"{component.value}.onnx"
    raw.parent.mkdir(parents=True)
    return _Plan(
        component=component,
        precision=component_precision(config, component),
        quantized=component.is_transformer and config.export.quantize,
        sp=spec(component, job.dims, n_skip, *controlnet),
        trace_shapes=trace_shapes,
        check_shapes=check_shapes,
        opset=config.export.opset,
        trace_opset=min(config.export.opset, tracing.max_trace_opset()),
        raw=raw,
    )


def _trace_component(job: Job, plan: _Plan) -> tuple[list, reference.Reference | None]:
    """Load the module, draw the validation inputs, trace to ``plan.raw``; the module is freed.

    Returns:
        The validation inputs per case, and PyTorch's outputs for them (None for the FP8
        transformer, whose reference needs ONNX Runtime's codes: :func:`_validate_graphs`).
    """
    from sd35trt.stages.export import reference, tracing

    sp, precision = plan.sp, plan.precision
    job.phase("load")
    module = _load(job, plan)
    vocab = tracing.vocab_size(module)
    cases = [
        tracing.make_inputs(sp, s, precision, case=i, vocab=vocab, device=job.device)
        for i, s in enumerate(plan.check_shapes, 1)
    ]
    ref = None
    if not plan.quantized:
        job.phase("reference")
        ref = reference.pytorch_reference(module, sp, cases, precision)
    job.phase("trace")
    sample = tracing.make_inputs(sp, plan.trace_shapes, precision, case=0, vocab=vocab, device=job.device)
    with tracing.fp8_tracing(module) if plan.quantized else contextlib.nullcontext():
        tracing.trace(module, sp, sample, plan.raw, plan.trace_opset)
    del module, sample
    _free_memory(job.device)
    return cases, ref


def _write_graphs(job: Job, plan: _Plan) -> list[Graph]:
    """Rewrite the traced graph (standard Q/DQ, FP8 weights, clean-up) and save it checked.

    Returns:
        The graph, and for an FP8 transformer with high-precision weights its unquantized twin.
    """
    from sd35trt.stages.export import onnx_files, onnx_tools

    config, component, raw = job.config, plan.component, plan.raw
    job.phase("rewrite")
    model = load_traced(raw, plan.quantized, plan.opset, plan.trace_opset, component)
    graph = Graph(component.value, component, plan.precision, plan.quantized)
    if component.is_transformer and config.export.fp32_blocks:
        graph.fp32_blocks = config.export.fp32_blocks
    if plan.quantized:
        graph.fp8 = {
            "qdq_pairs": onnx_files.count_ops(model).get("QuantizeLinear", 0),
            # TensorRT fuses FP8 GEMMs from DQ -> MatMul: weights stored [in, out], no Transpose.
            "weights_pretransposed": onnx_tools.pretranspose_qdq_weights(model, raw),
            "fp8_weights": False,
        }
        if config.export.fp8_weights:
            graph.fp8["fp8_weights"] = True
            graph.fp8["weights_folded"] = onnx_tools.fold_fp8_weights(model, raw)
        model = onnx_tools.clean_up(model, fold=False)
    path = job.out / f"{component.value}.onnx"
    job.phase("save")
    _save(job, graph, model, raw, path, plan.sp)
    graphs = [graph]
    if plan.quantized and not config.export.fp8_weights:
        # The unquantized graph is the FP8 one without its Q/DQ pairs: no second trace, and with
        # external data it shares the FP8 graph's data file (no second copy on disk).
        job.phase("unquantized")
        stem = unquantized_stem(component)
        plain = Graph(stem, component, plan.precision, quantized=False, fp32_blocks=graph.fp32_blocks)
        unquantized = onnx_tools.clean_up(onnx_tools.strip_qdq(model))
        _save(job, plain, unquantized, path, job.out / f"{stem}.onnx", plan.sp, shared=True)
        graphs.append(plain)
    return graphs


def _validate_graphs(
    job: Job, plan: _Plan, graphs: list[Graph], cases: list, ref: reference.Reference | None
) -> None:
    """Run each graph in ONNX Runtime and compare with PyTorch; results and failures go to ``graphs``."""
    from sd35trt.stages.export import tracing, validate

    job.phase("validate")
    sp = plan.sp
    feeds = [{n: tracing.to_numpy(x) for n, x in zip(sp.input_names, c, strict=True)} for c in cases]
    runs = {g.stem: _run(job, g, feeds, plan.raw.parent) for g in graphs}
    if plan.quantized and any(not isinstance(r, str) for r in runs.values()):
        fp8_run = runs[graphs[0].stem]
        codes = [{} for _ in cases] if isinstance(fp8_run, str) else fp8_run.codes
        ref = _fp8_reference(job, plan, cases, codes)
    for g in graphs:
        g_run = runs[g.stem]
        if isinstance(g_run, str):
            g.validation = {"status": "skipped", "reason": g_run}
            continue
        fp8 = g.quantized
        tol = validation_tolerance(sp, Precision.FP32 if g_run.compute == "float32" else plan.precision, fp8)
        want = ref.outputs if fp8 or not plan.quantized else ref.unquantized
        g.validation, failures = validate.check_cases(
            g_run, g.stem, plan.check_shapes, want, tol, ref.against(fp8)
        )
        g.failures += failures
        if fp8:
            g.validation["fp8_codes"] = ref.codes.to_json()
            if (why := ref.codes.failure(g.stem)) is not None:
                g.validation["status"] = "failed"
                g.failures.append(why)
            g.information = validate.information(g_run, plan.check_shapes, ref.unquantized)


def _fp8_reference(job: Job, plan: _Plan, cases: list, codes: list) -> reference.Reference:
    """The FP8 transformer's reference, loaded again now that ONNX Runtime's session is gone."""
    from sd35trt.stages.export import reference

    job.phase("reference")
    _free_memory(job.device)  # what ONNX Runtime freed goes back before the module comes in
    module = _load(job, plan)
    # it runs at the small validation shapes only: the rest of the positional table can go
    reference.crop_pos_embed(module, max(max(s["hidden_states"][-2:]) for s in plan.check_shapes))
    ref = reference.pytorch_reference(module, plan.sp, cases, plan.precision, codes)
    del module
    _free_memory(job.device)
    return ref


def _load(job: Job, plan: _Plan):
    from sd35trt.stages.export import tracing

    calibration = job.calibration if plan.quantized else None
    args = (job.config, job.root, plan.component, plan.precision, job.device, job.slg, calibration)
    return tracing.load_module(*args, job.loras, job.controlnets.get(plan.component))


def _run(job: Job, graph: Graph, feeds: list, scratch: Path) -> validate.GraphRun | str:
    """ONNX Runtime's results for ``graph`` (FP8 codes kept in ``scratch``), or why it cannot run here."""
    from sd35trt.stages.export import validate

    path = job.out / f"{graph.stem}.onnx"
    try:
        return validate.run_cases(path, job.providers, feeds, codes=graph.quantized, codes_dir=scratch)
    except validate.NotValidated as err:
        job.progress(f"warning: {graph.stem} not validated: {err}")
        return f"not validated: {err}"


def _free_memory(device: str) -> None:
    from sd35trt.models.loading import trim_heap

    gc.collect()
    trim_heap()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def load_traced(raw: Path, quantized: bool, opset: int, trace_opset: int, component: Component) -> ModelProto:
    """The traced graph (weights left on disk), with standard Q/DQ, cleaned, at ``opset``."""
    import onnx
    from onnx import version_converter

    from sd35trt.stages.export import onnx_tools

    model = onnx.load(str(raw), load_external_data=False)
    if quantized and onnx_tools.rewrite_fp8_qdq(model) == 0:
        raise ExportError(
            "the restored calibration put no FP8 quantizer into the transformer graph "
            "(every Linear excluded?); export with export.quantize: false instead"
        )
    custom = onnx_tools.custom_ops(model)
    if custom:
        raise ExportError(
            f"the {component.value} graph has ops ORT and TensorRT can't read: {sorted(custom)}"
        )
    if opset > trace_opset:
        model = version_converter.convert_version(model, opset)
    model = onnx_tools.clean_up(model)
    if onnx_tools.cast_unsupported_bf16(model):
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


def _save(
    job: Job,
    graph: Graph,
    model: ModelProto,
    source: Path,
    path: Path,
    sp: ComponentSpec,
    shared: bool = False,
) -> None:
    """Write ``model`` to ``path`` and check the file (external-data guards, ONNX checker).

    ``shared``: ``model``'s external tensors already live beside ``path`` (the unquantized
    transformer reuses the FP8 graph's data file), so only the graph is written.
    """
    import onnx

    from sd35trt.stages.export import onnx_files

    if shared:
        onnx.save_model(model, str(path))
        graph.files = [path]
        data = source.with_name(source.name + ".data")
        graph.shared_data = data if data.is_file() else None
    else:
        external = onnx_files.tensors_bytes(model) > job.external_threshold or any(
            onnx_files.uses_external_data(t) for t in onnx_files.iter_tensors(model)
        )
        graph.files = onnx_files.save_model(model, path, source, external)
    onnx_files.check_onnx_file(path)
    graph.signature = onnx_files.io_signature(model)
    names = (list(graph.signature["inputs"]), list(graph.signature["outputs"]))
    if names != (sp.input_names, sp.output_names):
        # The spec and the traced wrapper disagree: a bug, not a user error.
        raise RuntimeError(
            f"{path} has inputs/outputs {names}, the spec says {(sp.input_names, sp.output_names)}"
        )
