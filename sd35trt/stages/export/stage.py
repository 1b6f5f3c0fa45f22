"""``sd35trt export``: the six components to validated ONNX, then the manifest record.

Steps per component (in :class:`~sd35trt.components.Component` order, one model in memory at a
time):

1. Load the module in its export precision, LoRAs fused; for the FP8 transformer, restore the
   calibration.
2. Draw fresh random inputs at the validation shapes and keep PyTorch's outputs (for the FP8
   transformer also the outputs with its quantizers off).
3. Trace at the profile's ``opt`` shape with ``torch.onnx.export``; free the module.
4. Rewrite FP8 Q/DQ to standard ONNX, clean up, optionally fold FP8 weights, save (external
   data over 2 GB), check the file (external-data guards + ONNX checker).
5. Run it in ONNX Runtime on the kept inputs and compare.

All validation failures are collected and raised together; nothing is published then.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.files import atomic_write_json, sha256_file
from sd35trt.artifacts.manifest import RunManifest, Stage
from sd35trt.artifacts.records import (
    CalibrationInput,
    ExportDetails,
    ExportedComponent,
    ExportRecord,
    StageRecord,
    ValidationStatus,
)
from sd35trt.components import (
    Component,
    ComponentSpec,
    ModelDims,
    exported_components,
    sample_shapes,
    spec,
    validation_tolerance,
)
from sd35trt.config import Config, ModelSource, Precision
from sd35trt.errors import ExportError, ManifestError
from sd35trt.stages.check import check_config, check_fp32_blocks, skip_layer_indices
from sd35trt.stages.driver import Progress, StageRun, StageSpec, print_progress, run_stage
from sd35trt.stages.export.report import report_json, report_line

if TYPE_CHECKING:
    from collections.abc import Sequence

    from onnx import ModelProto

    from sd35trt.models.controlnet import ResolvedControlNet
    from sd35trt.models.loading import ResolvedModel
    from sd35trt.stages.export import validate

REPORT_FILE = "export_report.json"
#: File stem of the transformer graph without Q/DQ, exported beside the FP8 one.
UNQUANTIZED_STEM = "transformer_unquantized"


@dataclass
class _Job:
    """What every component's export needs, resolved once."""

    config: Config
    root: Path  # the diffusers model directory
    loras: tuple  # ResolvedLora: fused into every component they have weights for
    dims: ModelDims
    out: Path  # the staged onnx/ directory
    scratch: Path
    slg: tuple[int, ...]
    controlnet: ResolvedControlNet | None  # model.controlnet's
    calibration: Path | None
    device: str
    providers: list[str]
    external_threshold: int
    progress: Progress
    phase: Progress = lambda _name: None  # receives each export step's name as it starts


@dataclass
class _Graph:
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


class _Export(StageSpec):
    """The export stage (:func:`export`): reads the calibration when it quantizes."""

    stage, details = Stage.EXPORT, ExportDetails
    resolved: ResolvedModel
    dims: ModelDims

    def __init__(self, external_threshold: int | None) -> None:
        self.external_threshold = external_threshold

    def upstream(self, config: Config) -> tuple[Stage, ...]:
        return (Stage.CALIBRATE,) if config.export.quantize else ()

    def prepare(self, run: StageRun) -> dict:
        """Resolve the model and refuse settings it can't take (here or at build) before tracing."""
        from sd35trt.models.loading import resolve_model

        self.resolved = resolve_model(run.config, run.run_dir)
        self.dims = ModelDims.from_model_dir(self.resolved.directory)
        check_config(run.config, self.dims, Stage.EXPORT, self.resolved.directory)
        return self.resolved.identity()

    def produce(self, run: StageRun, out: Path) -> ExportDetails:
        """Export and validate every component into ``out``; all validation failures raised together."""
        from sd35trt.models.loading import check_weights
        from sd35trt.stages.export import tracing

        config, root, dims = run.config, self.resolved.directory, self.dims
        cal = run.inputs.get(Stage.CALIBRATE)
        calibration = _calibration_file(run.run_dir, cal, run.manifest) if cal is not None else None
        if config.export.quantize and config.calibrate.fp8_attention:
            tracing.check_fp8_attention(_precision(config, Component.TRANSFORMER))
        if config.model.source is not ModelSource.RANDOM:
            check_weights(root)
        slg = skip_layer_indices(config, dims)
        start = time.perf_counter()
        loras, threshold = self.resolved.loras, self.external_threshold
        job = _make_job(config, root, loras, dims, out, slg, calibration, threshold, run.progress)
        graphs: list[_Graph] = []
        components = exported_components(
            config.runtime.cache is not None, config.model.controlnet is not None
        )
        _warn_slow_on_cpu(config, components, job.device, run.progress)
        for i, component in enumerate(components, 1):
            graphs += _export_component(job, component, f"[{i}/{len(components)}] {component.value}")
        shutil.rmtree(job.scratch, ignore_errors=True)
        failures = [f for g in graphs for f in g.failures]
        if failures:
            raise ExportError(f"export validation failed ({len(failures)}): " + "; ".join(failures))
        seconds = time.perf_counter() - start
        report = report_json(graphs, config.export.opset, job.device, job.providers, seconds)
        atomic_write_json(out / REPORT_FILE, report)
        run.progress(f"export done in {seconds:.1f} s -> {run.run_dir / Stage.EXPORT.directory}")
        return _details(run, self, slg, graphs, cal, calibration)


def export(
    config: Config,
    run_dir: Path,
    force: bool = False,
    *,
    hint: str = "",
    progress: Progress | None = None,
    external_threshold: int | None = None,
) -> ExportRecord:
    """Export, validate and record the six components of ``config``'s model.

    Runs through :func:`~sd35trt.stages.driver.run_stage` (lock, upstream checks, freshness,
    staging, record).

    Args:
        config: the run's config (``model`` and ``export`` sections; ``build`` ranges pick the
            validation shapes, ``runtime`` the skip-layer-guidance input and T5 length).
        run_dir: ``runs/<name>``; with ``export.quantize`` it must hold a fresh calibration.
        force: export again even when the existing export is up to date.
        hint: appended to suggested commands (e.g. ``--config configs/tiny.yaml``).
        progress: receives one line per step (default: stderr).
        external_threshold: tensor bytes above which a graph is saved with external data
            (default :data:`~sd35trt.stages.export.onnx_tools.EXTERNAL_DATA_THRESHOLD`, just under 2 GiB).

    Returns:
        The export record now in ``run_dir/manifest.json``.

    Raises:
        RunDirError: ``run_dir`` is not a run directory, or cannot be written.
        ManifestError, StaleArtifactError, VerificationError: the calibration is missing, was
            made with other settings, or its file changed.
        ConfigError: skip-layer-guidance layers outside the transformer, build ranges that don't
            fit the model, or FP8 attention with a float32 transformer.
        ModelError: the model directory (or repo id) is unusable, or a LoRA does not fit it.
        CalibrationError: the calibration does not match the transformer.
        ExportError: a graph failed validation (every failure named) or the checker.
    """
    spec = _Export(external_threshold)
    return run_stage(spec, config, run_dir, force=force, hint=hint, progress=progress or print_progress)


def export_component(
    config: Config,
    model_root: Path,
    component: Component,
    out: Path,
    *,
    calibration: Path | None = None,
    progress: Progress | None = None,
    phase: Progress | None = None,
    device: str | None = None,
) -> list[Path]:
    """Export and validate one component into ``out``, outside any run directory or manifest.

    The steps :func:`export` runs per component, for checking one graph on its own: a published
    architecture's transformer cut to a few blocks, or the transformer alone at full size.

    Args:
        config: the config (``model``, ``export``, ``build`` and ``runtime`` sections as in
            :func:`export`; ``model`` must describe ``model_root``).
        model_root: the diffusers model directory (or a ``random`` source's architecture).
        component: which component.
        out: the directory to write the graph(s) to (created if missing).
        calibration: for an FP8 transformer, the calibration file to restore.
        progress: receives one line per graph (default: stderr).
        phase: receives each step's name as it starts (``load``, ``reference``, ``trace``,
            ``rewrite``, ``save``, ``validate``, ``unquantized``), so a caller can tell how far it got.
        device: where the module loads and traces (default: CUDA when present, else CPU).

    Returns:
        The ``.onnx`` files written (the FP8 transformer's unquantized graph too).

    Raises:
        ConfigError, ModelError, CalibrationError, ExportError: as :func:`export`.
    """
    dims = ModelDims.from_model_dir(model_root)
    slg = skip_layer_indices(config, dims)
    check_fp32_blocks(config, dims)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from sd35trt.models.lora import resolve_loras

    loras = resolve_loras(config.model.loras, config.model.allow_download)  # fused as export fuses them
    job = _make_job(
        config, Path(model_root), loras, dims, out, slg, calibration, None, progress or print_progress
    )
    job.phase, job.device = phase or job.phase, device or job.device
    try:
        graphs = _export_component(job, component, component.value)
    finally:
        shutil.rmtree(job.scratch, ignore_errors=True)
    failures = [f for g in graphs for f in g.failures]
    if failures:
        raise ExportError(f"export validation failed ({len(failures)}): " + "; ".join(failures))
    return [g.files[0] for g in graphs]


def _make_job(
    config: Config,
    root: Path,
    loras: tuple,
    dims: ModelDims,
    out: Path,
    slg: tuple[int, ...],
    calibration: Path | None,
    external_threshold: int | None,
    progress: Progress,
) -> _Job:
    from sd35trt.models.controlnet import resolve_controlnet
    from sd35trt.stages.export import onnx_tools, tracing, validate

    tracing.limit_heap_retention()
    if config.export.quantize:
        tracing.import_modelopt()
    return _Job(
        config=config,
        root=root,
        loras=loras,
        dims=dims,
        out=out,
        scratch=out / ".scratch",
        slg=slg,
        controlnet=resolve_controlnet(config.model, root),
        calibration=calibration,
        device=tracing.default_device(),
        providers=validate.providers(),
        external_threshold=external_threshold or onnx_tools.EXTERNAL_DATA_THRESHOLD,
        progress=progress,
    )


#: Components whose FP16 forward PyTorch runs orders of magnitude slower on a CPU than in FP32 or
#: BF16 (its CPU convolutions have no fast FP16 kernels): the SD3.5 VAE decoding an 8x8 latent took
#: 185 s in FP16 against 1.4 s in FP32 and BF16 (2 cores, torch 2.x).
SLOW_IN_FP16_ON_CPU = (Component.VAE_DECODER, Component.VAE_ENCODER)


def _warn_slow_on_cpu(
    config: Config, components: Sequence[Component], device: str, progress: Progress
) -> None:
    """Say before tracing when an FP16 component will trace and validate for hours on the CPU."""
    if device != "cpu":
        return
    slow = [c for c in components if c in SLOW_IN_FP16_ON_CPU and _precision(config, c) is Precision.FP16]
    for setting in dict.fromkeys(c.model.value for c in slow):  # the VAE encoder shares the decoder's
        progress(
            f"warning: export.precision.{setting} is fp16 on the CPU, where PyTorch's FP16 "
            "convolutions are ~100x slower than FP32 (this may take hours): export on a GPU, "
            f"or set export.precision.{setting} to fp32 or bf16"
        )


def _calibration_file(run_dir: Path, record: StageRecord, manifest: RunManifest) -> Path:
    from sd35trt.models.quantize import CALIBRATION_FILE

    rel = f"{Stage.CALIBRATE.directory}/{CALIBRATION_FILE}"
    if not any(f.path == rel for f in record.files):
        raise ManifestError(
            f"the calibrate record in {manifest.path} does not list {rel}: re-run `sd35trt calibrate`"
        )
    return run_dir / rel


def _precision(config: Config, component: Component) -> Precision:
    # The ControlNet is exported in the transformer's precision (it is made of its blocks).
    model = Component.TRANSFORMER if component is Component.CONTROLNET else component.model
    return getattr(config.export.precision, model.value)


def unquantized_stem(component: Component) -> str:
    """File stem of a transformer graph's copy without Q/DQ (:data:`UNQUANTIZED_STEM` for the whole)."""
    return f"{component.value}_unquantized"


def _export_component(job: _Job, component: Component, label: str) -> list[_Graph]:
    """Trace, process, save and validate one component (two graphs for the FP8 transformer).

    An FP8 transformer is loaded twice: once to trace, and again after ONNX Runtime has run, as
    its reference follows ONNX Runtime's FP8 codes one step away
    (:mod:`sd35trt.stages.export.reference`); the module and the session never coexist.
    """
    from sd35trt.stages.export import onnx_tools, reference, tracing, validate

    t0 = time.perf_counter()
    config = job.config
    precision = _precision(config, component)
    quantized = component.is_transformer and config.export.quantize
    # the first-block-cache head never gates a block (the config keeps block 0 out of SLG)
    gated = component.is_transformer and component is not Component.TRANSFORMER_FIRST_BLOCK
    n_skip = len(job.slg) if gated else 0
    # the ControlNet residual input is the whole transformer's only (never with runtime.cache)
    cn = job.controlnet if component in (Component.TRANSFORMER, Component.CONTROLNET) else None
    controlnet = (cn.layers, cn.takes_text) if cn is not None else (0, True)
    sp = spec(component, job.dims, n_skip, *controlnet)
    trace_shapes, *check_shapes = sample_shapes(
        component, job.dims, config.build, config.runtime.max_sequence_length, n_skip, *controlnet
    )
    opset = config.export.opset
    trace_opset = min(opset, tracing.max_trace_opset())
    raw = job.scratch / component.value / f"{component.value}.onnx"
    raw.parent.mkdir(parents=True)

    job.phase("load")
    module = _load(job, component, precision, quantized)
    vocab = tracing.vocab_size(module)
    cases = [
        tracing.make_inputs(sp, s, precision, case=i, vocab=vocab, device=job.device)
        for i, s in enumerate(check_shapes, 1)
    ]
    ref = None
    if not quantized:
        job.phase("reference")
        ref = reference.pytorch_reference(module, sp, cases, precision)
    job.phase("trace")
    sample = tracing.make_inputs(sp, trace_shapes, precision, case=0, vocab=vocab, device=job.device)
    with tracing.fp8_tracing(module) if quantized else contextlib.nullcontext():
        tracing.trace(module, sp, sample, raw, trace_opset)
    del module, sample
    _free_memory(job.device)

    job.phase("rewrite")
    model = _load_traced(raw, quantized, opset, trace_opset, component)
    graph = _Graph(component.value, component, precision, quantized)
    if component.is_transformer and config.export.fp32_blocks:
        graph.fp32_blocks = config.export.fp32_blocks
    if quantized:
        graph.fp8 = {
            "qdq_pairs": onnx_tools.count_ops(model).get("QuantizeLinear", 0),
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
    _save(job, graph, model, raw, path, sp)
    graphs = [graph]
    if quantized and not config.export.fp8_weights:
        # The unquantized graph is the FP8 one without its Q/DQ pairs: no second trace, and with
        # external data it shares the FP8 graph's data file (no second copy on disk).
        job.phase("unquantized")
        stem = unquantized_stem(component)
        plain = _Graph(stem, component, precision, quantized=False, fp32_blocks=graph.fp32_blocks)
        upath = job.out / f"{stem}.onnx"
        _save(job, plain, onnx_tools.clean_up(onnx_tools.strip_qdq(model)), path, upath, sp, shared=True)
        graphs.append(plain)
    del model

    job.phase("validate")
    feeds = [{n: tracing.to_numpy(x) for n, x in zip(sp.input_names, c, strict=True)} for c in cases]
    runs = {g.stem: _run(job, g, feeds) for g in graphs}
    if quantized and any(not isinstance(r, str) for r in runs.values()):
        job.phase("reference")
        fp8_run = runs[graph.stem]
        codes = [{} for _ in cases] if isinstance(fp8_run, str) else fp8_run.codes
        module = _load(job, component, precision, quantized)
        ref = reference.pytorch_reference(module, sp, cases, precision, codes)
        del module
        _free_memory(job.device)
    for g in graphs:
        g_run = runs[g.stem]
        if isinstance(g_run, str):
            g.validation = {"status": "skipped", "reason": g_run}
            continue
        fp8 = g.quantized
        tol = validation_tolerance(sp, Precision.FP32 if g_run.compute == "float32" else precision, fp8)
        want = ref.outputs if fp8 or not quantized else ref.unquantized
        g.validation, failures = validate.check_cases(
            g_run, g.stem, check_shapes, want, tol, ref.against(fp8)
        )
        g.failures += failures
        if fp8:
            g.validation["fp8_codes"] = ref.codes.to_json()
            if (why := ref.codes.failure(g.stem)) is not None:
                g.validation["status"] = "failed"
                g.failures.append(why)
            g.information = validate.information(g_run, check_shapes, ref.unquantized)
    graph.seconds = time.perf_counter() - t0
    shutil.rmtree(raw.parent, ignore_errors=True)
    job.progress(report_line(label, graphs))
    return graphs


def _load(job: _Job, component: Component, precision: Precision, quantized: bool):
    from sd35trt.stages.export import tracing

    return tracing.load_module(
        job.config,
        job.root,
        component,
        precision,
        job.device,
        job.slg,
        job.calibration if quantized else None,
        job.loras,
    )


def _run(job: _Job, graph: _Graph, feeds: list) -> validate.GraphRun | str:
    """ONNX Runtime's results for ``graph``, or the one line saying why it cannot run here."""
    from sd35trt.stages.export import validate

    try:
        return validate.run_cases(job.out / f"{graph.stem}.onnx", job.providers, feeds, codes=graph.quantized)
    except validate.NotValidated as err:
        job.progress(f"warning: {graph.stem} not validated: {err}")
        return f"not validated: {err}"


def _free_memory(device: str) -> None:
    from sd35trt.stages.export import tracing

    gc.collect()
    tracing.trim_heap()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _load_traced(
    raw: Path, quantized: bool, opset: int, trace_opset: int, component: Component
) -> ModelProto:
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
    job: _Job,
    graph: _Graph,
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

    from sd35trt.stages.export import onnx_tools

    if shared:
        onnx.save_model(model, str(path))
        graph.files = [path]
        data = source.with_name(source.name + ".data")
        graph.shared_data = data if data.is_file() else None
    else:
        external = onnx_tools.tensors_bytes(model) > job.external_threshold or any(
            onnx_tools.uses_external_data(t) for t in onnx_tools.iter_tensors(model)
        )
        graph.files = onnx_tools.save_model(model, path, source, external)
    onnx_tools.check_onnx_file(path)
    graph.signature = onnx_tools.io_signature(model)
    names = (list(graph.signature["inputs"]), list(graph.signature["outputs"]))
    if names != (sp.input_names, sp.output_names):
        # The spec and the traced wrapper disagree: a bug, not a user error.
        raise RuntimeError(
            f"{path} has inputs/outputs {names}, the spec says {(sp.input_names, sp.output_names)}"
        )


def _details(
    run: StageRun,
    plan: _Export,
    slg: tuple[int, ...],
    graphs: list[_Graph],
    calibrate_record: StageRecord | None,
    calibration: Path | None,
) -> ExportDetails:
    base, config = Stage.EXPORT.directory, run.config

    def rel(p: Path | None) -> str | None:
        return None if p is None else f"{base}/{p.name}"

    components: dict[Component, ExportedComponent] = {}
    by_stem = {g.stem: g for g in graphs}
    for component in exported_components(
        config.runtime.cache is not None, config.model.controlnet is not None
    ):
        g = by_stem[component.value]
        is_transformer = component.is_transformer
        plain = by_stem.get(unquantized_stem(component)) if is_transformer else None
        components[component] = ExportedComponent(
            onnx=rel(g.files[0]),
            external_data=rel(g.external_data),
            precision=g.precision,
            quantized=g.quantized,
            inputs=g.signature["inputs"],
            outputs=g.signature["outputs"],
            validation=ValidationStatus(g.validation["status"]),
            onnx_unquantized=rel(plain.files[0]) if plain else None,
            onnx_unquantized_external_data=rel(plain.external_data) if plain else None,
            # None: not the transformer, whose entry alone has these keys (see ExportedComponent).
            fp8_weights=bool(g.quantized and config.export.fp8_weights) if is_transformer else None,
            fp32_blocks=g.fp32_blocks if is_transformer else None,
        )
    return ExportDetails(
        model_dir=run.relative(plan.resolved.directory),
        dims=plan.dims,
        opset=config.export.opset,
        skip_layers=slg,
        max_sequence_length=config.runtime.max_sequence_length,
        report=f"{base}/{REPORT_FILE}",
        calibration=None
        if calibration is None or calibrate_record is None
        else CalibrationInput(
            record=calibrate_record.digest(),
            file=calibration.relative_to(run.run_dir).as_posix(),
            sha256=sha256_file(calibration),
        ),
        components=components,
        model=run.model_input(plan.resolved).model_copy(
            update={"controlnet": None if config.model.controlnet is None else config.model.controlnet.type}
        ),
    )
