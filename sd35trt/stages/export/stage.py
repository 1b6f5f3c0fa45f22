"""``sd35trt export``: each component (CLIP-L, CLIP-G, T5, the transformer, the VAE decoder and
encoder, the configured ControlNets) to validated ONNX, then the manifest record.

Each component in :class:`~sd35trt.components.Component` order, one model in memory at a time,
goes through :func:`sd35trt.stages.export.steps.export_graphs` (trace, write, validate). All
validation failures are collected and raised together; nothing is published then.
"""

from __future__ import annotations

import shutil
import time
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
from sd35trt.components import Component, ModelDims, exported_components
from sd35trt.config import Config, ModelSource, Precision
from sd35trt.errors import ExportError, ManifestError
from sd35trt.stages.check import check_config, check_fp32_blocks, skip_layer_indices
from sd35trt.stages.driver import Progress, StageRun, StageSpec, print_progress, run_stage
from sd35trt.stages.export import steps
from sd35trt.stages.export.report import report_json

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sd35trt.models.loading import ResolvedModel

REPORT_FILE = "export_report.json"
#: File stem of the transformer graph without Q/DQ, exported beside the FP8 one.
UNQUANTIZED_STEM = steps.unquantized_stem(Component.TRANSFORMER)


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
            tracing.check_fp8_attention(steps.component_precision(config, Component.TRANSFORMER))
        if config.model.source is not ModelSource.RANDOM:
            check_weights(root)
        slg = skip_layer_indices(config, dims)
        start = time.perf_counter()
        loras, threshold = self.resolved.loras, self.external_threshold
        job = _make_job(config, root, loras, dims, out, slg, calibration, threshold, run.progress)
        graphs: list[steps.Graph] = []
        components = exported_components(
            config.runtime.cache is not None, [c.type for c in config.model.controlnets]
        )
        _warn_slow_on_cpu(config, components, job.device, run.progress)
        for i, component in enumerate(components, 1):
            graphs += steps.export_graphs(job, component, f"[{i}/{len(components)}] {component.value}")
        shutil.rmtree(job.scratch, ignore_errors=True)
        _raise_failures(graphs)
        seconds = time.perf_counter() - start
        report = report_json(graphs, config.export.opset, job.device, job.providers, seconds)
        atomic_write_json(out / REPORT_FILE, report)
        run.progress(f"export done in {seconds:.1f} s -> {run.run_dir / Stage.EXPORT.directory}")
        return _details(run, self, slg, graphs, components, cal, calibration)


def export(
    config: Config,
    run_dir: Path,
    force: bool = False,
    *,
    hint: str = "",
    progress: Progress | None = None,
    external_threshold: int | None = None,
) -> ExportRecord:
    """Export, validate and record the components of ``config``'s model.

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
            (default :data:`~sd35trt.stages.export.onnx_files.EXTERNAL_DATA_THRESHOLD`, just under 2 GiB).

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
        graphs = steps.export_graphs(job, component, component.value)
    finally:
        shutil.rmtree(job.scratch, ignore_errors=True)
    _raise_failures(graphs)
    return [g.files[0] for g in graphs]


def _raise_failures(graphs: list[steps.Graph]) -> None:
    failures = [f for g in graphs for f in g.failures]
    if failures:
        raise ExportError(f"export validation failed ({len(failures)}): " + "; ".join(failures))


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
) -> steps.Job:
    from sd35trt.models.controlnet import resolve_controlnets
    from sd35trt.models.loading import default_device, limit_heap_retention
    from sd35trt.stages.export import onnx_files, tracing, validate

    limit_heap_retention()
    if config.export.quantize:
        tracing.import_modelopt()
    return steps.Job(
        config=config,
        root=root,
        loras=loras,
        dims=dims,
        out=out,
        scratch=out / ".scratch",
        slg=slg,
        controlnets={net.component: net for net in resolve_controlnets(config.model, root)},
        calibration=calibration,
        device=default_device(),
        providers=validate.providers(),
        external_threshold=external_threshold or onnx_files.EXTERNAL_DATA_THRESHOLD,
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
    fp16 = [c for c in components if steps.component_precision(config, c) is Precision.FP16]
    slow = [c for c in fp16 if c in SLOW_IN_FP16_ON_CPU]
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


def _details(
    run: StageRun,
    plan: _Export,
    slg: tuple[int, ...],
    graphs: list[steps.Graph],
    exported: list[Component],
    calibrate_record: StageRecord | None,
    calibration: Path | None,
) -> ExportDetails:
    base, config = Stage.EXPORT.directory, run.config

    def rel(p: Path | None) -> str | None:
        return None if p is None else f"{base}/{p.name}"

    components: dict[Component, ExportedComponent] = {}
    by_stem = {g.stem: g for g in graphs}
    for component in exported:
        g = by_stem[component.value]
        is_transformer = component.is_transformer
        plain = by_stem.get(steps.unquantized_stem(component)) if is_transformer else None
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
        model=run.model_input(plan.resolved),
    )
