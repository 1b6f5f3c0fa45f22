"""The build stage: one engine per exported component, and the engine manifest.

Reads the verified export record, builds every component's engine with TensorRT (a plan) or
ONNX Runtime (an offline-optimized model) into a staged ``engines/`` directory, copies the
tokenizer files and scheduler config beside them, writes ``engines/manifest.json`` (everything
the runtime needs; see :mod:`sd35trt.artifacts.engine_manifest`) and only then records the stage in the run
manifest. ``tensorrt`` is imported inside functions only.

A rebuild happens when the build config, the export, the backend or the machine (TensorRT
version, GPU) changed, when an engine file fails verification, or with ``force``; otherwise the
existing record is returned.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from sd35trt.artifacts.containment import contained_path
from sd35trt.artifacts.engine_manifest import ENGINE_MANIFEST_NAME, EngineManifest, EngineRecord
from sd35trt.artifacts.manifest import (
    FileRecord,
    HashCache,
    RunManifest,
    Stage,
    atomic_write_json,
    atomic_write_text,
    file_record,
    new_record,
    now_utc,
    record_digest,
    records_for_tree,
    staged_output,
    tool_versions,
)
from sd35trt.artifacts.records import (
    BuildDetails,
    BuildMachine,
    BuildRecord,
    BuiltEngine,
    ExportedComponent,
    StageRecord,
)
from sd35trt.artifacts.runlock import locked_stage
from sd35trt.backends import registry as backends
from sd35trt.backends.base import BuildJob, EngineBackend
from sd35trt.backends.layers import LayerReport
from sd35trt.backends.load import verify_engines
from sd35trt.backends.machine import NO_MACHINE, GpuInfo, MachineInfo
from sd35trt.components import TOKENIZER_SUBFOLDERS, Component, ModelDims, ShapeRange, profile
from sd35trt.config import Backend, Config
from sd35trt.errors import BuildError, ManifestError, ModelError, Sd35TrtError
from sd35trt.guidance import cfg_enabled
from sd35trt.stages.check import check_config

Progress = Callable[[str], None]
SCHEDULER_SUBFOLDER = "scheduler"
SKIP_LAYERS_INPUT = "skip_layers"
CONTROLNET_INPUT = "controlnet_block_samples"


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_backend(requested: Backend, machine: MachineInfo) -> tuple[Backend, str]:
    """The backend a build uses, and why (see :func:`sd35trt.backends.registry.resolve_backend`).

    Raises:
        BackendUnavailableError: ``tensorrt`` was asked for where TensorRT or a CUDA GPU is missing.
    """
    chosen, reason = backends.resolve_backend(requested, machine)
    return chosen.backend, reason


@dataclass(frozen=True)
class Source:
    """The ONNX file an engine is built from (path relative to the run directory)."""

    path: str
    fp8: bool
    note: str | None = None


def choose_source(
    component: Component, entry: ExportedComponent, backend: Backend, gpu: GpuInfo | None
) -> Source:
    """The export to build ``component`` from: the FP8 one unless the backend cannot run FP8 on ``gpu``.

    Args:
        component: the component.
        entry: its entry in the export record.
        backend: the backend building it.
        gpu: the GPU it is built for (``None``: none, ONNX Runtime on the CPU).

    Raises:
        BuildError: the GPU has no FP8 and the export has no unquantized graph to fall back on.
    """
    quantized = entry.quantized
    runs_fp8 = backends.backend_of(backend).runs_fp8(MachineInfo(tensorrt_version=None, gpu=gpu))
    if not quantized or runs_fp8 or gpu is None:
        return Source(entry.onnx, fp8=quantized)
    fallback = entry.onnx_unquantized
    if not fallback:
        raise BuildError(
            f"{gpu.name} ({gpu.sm}) has no FP8 (needs sm_89 or newer) and the export has no unquantized "
            f"{component.value}: re-run `sd35trt export` with export.quantize: false, or build with "
            "--backend onnxruntime"
        )
    note = f"{gpu.name} ({gpu.sm}) has no FP8: building {component.value} from the unquantized {fallback}"
    return Source(fallback, fp8=False, note=note)


def onnx_inputs(path: Path) -> tuple[dict[str, tuple[int | str, ...]], bool]:
    """Input shapes of an ONNX file (ints, or axis names for dynamic dims), without its weights.

    Returns:
        ``({input: shape}, has_external_data)``.

    Raises:
        ModelError: the file is not a loadable ONNX model, or its external data is unsafe
            (absolute, escaping the directory, a symlink, or truncated).
    """
    from sd35trt.stages.export.onnx_tools import check_external_data, uses_external_data

    model = check_external_data(path)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims
        )
    return shapes, external


def engine_profile(
    config: Config, dims: ModelDims, component: Component, skip_layers: int = 0, controlnet: int = 0
) -> dict[str, ShapeRange]:
    """Profile of ``component`` from the config: batch (doubled under CFG), latent sizes, text lengths.

    Classifier-free guidance is on by default when ``runtime.guidance_scale > 1`` (as in diffusers), so
    the optimal batch of the text encoders and the transformer is then twice the image batch.

    Raises:
        ConfigError: a size is not a multiple of the model's size multiple, or too large.
    """
    return profile(
        component,
        dims,
        config.build,
        max_sequence_length=config.runtime.max_sequence_length,
        cfg_by_default=cfg_enabled(config.runtime.guidance_scale),
        skip_layers=skip_layers,
        controlnet=controlnet,
    )


def check_inputs_match(source: str, inputs: Mapping[str, tuple], shapes: Mapping[str, ShapeRange]) -> None:
    """The ONNX inputs must be the profile's inputs, with the same ranks and fixed sizes.

    Raises:
        BuildError: naming the model, the input, and what was found and expected.
    """
    if sorted(inputs) != sorted(shapes):
        raise BuildError(
            f"{source} has inputs {sorted(inputs)}, the spec expects {sorted(shapes)}: "
            "re-run `sd35trt export`"
        )
    for name, dims in inputs.items():
        r = shapes[name]
        if len(dims) != len(r.min):
            raise BuildError(f"{source}: input {name} has rank {len(dims)}, the spec expects {len(r.min)}")
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0 and not r.min[axis] == r.max[axis] == d:
                raise BuildError(
                    f"{source}: input {name} axis {axis} is fixed at {d}, the profile needs "
                    f"{r.min[axis]}..{r.max[axis]}: re-run `sd35trt export`"
                )


def support_dirs(model_dir: Path) -> list[Path]:
    """The model's tokenizer and scheduler folders, which travel with the engines.

    Raises:
        ModelError: one is missing (checked before any engine is built).
    """
    dirs = [model_dir / sub for sub in (*TOKENIZER_SUBFOLDERS.values(), SCHEDULER_SUBFOLDER)]
    for d in dirs:
        if not d.is_dir():
            raise ModelError(f"{d} is missing: the engines need the model's {d.name}/ files beside them")
    return dirs


#: The resolved config, written beside the engines.
CONFIG_NAME = "config.yaml"


def _copy_support_files(dirs: list[Path], out: Path) -> list[FileRecord]:
    """Copy tokenizers and the scheduler config beside the engines; the runtime needs no model dir."""
    for d in dirs:
        shutil.copytree(d, out / d.name, symlinks=False)
    return [file_record(out, p) for d in dirs for p in sorted((out / d.name).rglob("*")) if p.is_file()]


def _export_file(run_dir: Path, export_rec: StageRecord, rel: str) -> FileRecord:
    for f in export_rec.files:
        if f.path == rel:
            return f
    return file_record(run_dir, rel)


def _up_to_date(
    runs: RunManifest,
    digest: str,
    export_rec: StageRecord,
    backend: Backend,
    machine: MachineInfo,
) -> bool:
    """Whether the last build still holds for this config, export, backend and machine.

    Its record must match the files on disk (the check ``package`` and the next stages make), so
    a build interrupted between publishing ``engines/`` and recording it is redone, never called
    up to date while ``package`` asks for a rebuild.
    """
    run_dir = runs.run_dir
    try:
        previous = runs.verified(Stage.BUILD, digest, cache=HashCache(run_dir))
    except ManifestError:
        return False
    if previous.upstream.get(Stage.EXPORT) != record_digest(export_rec):
        return False
    if previous.details.backend is not backend:
        return False
    try:
        engines = verify_engines(
            run_dir / Stage.BUILD.directory, cache=HashCache(run_dir), check_machine=False
        )
    except Sd35TrtError:  # missing or modified: rebuild
        return False
    # Built for another TensorRT version or GPU (TensorRT-RTX: another TensorRT-RTX version): rebuild.
    stale = any(backends.backend_of(r.backend).rebuild_reason(r, machine) for r in engines.engines.values())
    return engines.backend is backend and not stale


@dataclass(frozen=True)
class _Job:
    """What every component's build shares."""

    config: Config
    dims: ModelDims
    run_dir: Path
    out: Path  # the staged engines directory
    backend: EngineBackend
    machine: MachineInfo
    export_rec: StageRecord
    progress: Progress
    allow_partial_fp8: bool = False
    build_has_fp8: bool = False


def check_fp8(
    component: Component, layers: LayerReport | None, source: str, allow_partial: bool
) -> str | None:
    """Refuse an FP8 engine in which quantized Linear layers did not become FP8 GEMMs.

    Returns:
        A warning when ``allow_partial`` lets such an engine through, else ``None``.

    Raises:
        BuildError: naming the engine, the counts and the ONNX nodes that fell back.
    """
    if layers is None or not layers.detailed or layers.fp8_complete:
        return None
    named = ", ".join(layers.fell_back) or "not traceable by name"
    more = layers.fell_back_count - len(layers.fell_back)
    message = (
        f"the {component.value} engine has {layers.fp8_gemms} FP8 GEMM layers for {layers.quantized_linear} "
        f"FP8-quantized Linear layers in {source}: {layers.fell_back_count} fell back to higher precision "
        f"({named}{f' and {more} more' if more > 0 else ''})"
    )
    if allow_partial:
        return message + " (allowed by --allow-partial-fp8)"
    raise BuildError(message + "; build with --allow-partial-fp8 to accept it")


def _build_one(job: _Job, component: Component, entry: ExportedComponent, label: str) -> EngineRecord:
    """Build one engine into ``job.out`` and describe it."""
    config, run_dir, backend, machine, progress = (
        job.config,
        job.run_dir,
        job.backend,
        job.machine,
        job.progress,
    )
    source = choose_source(component, entry, backend.backend, machine.gpu)
    if source.note:
        progress(f"{label}: {source.note}")
    # The export record is read from disk: a path it names must not lead out of the run directory.
    src_path = contained_path(run_dir, source.path)
    inputs, external = onnx_inputs(src_path)
    skip = (
        inputs[SKIP_LAYERS_INPUT][0]
        if component is Component.TRANSFORMER and SKIP_LAYERS_INPUT in inputs
        else 0
    )
    if not isinstance(skip, int) or skip < 0:
        raise BuildError(f"{source.path}: input {SKIP_LAYERS_INPUT} must have a fixed size, found {skip!r}")
    # The ControlNet's residual count, from the transformer graph's input (its own graph's output).
    controlnet = inputs[CONTROLNET_INPUT][1] if CONTROLNET_INPUT in inputs else 0
    shapes = engine_profile(config, job.dims, component, skip, controlnet)
    check_inputs_match(source.path, inputs, shapes)
    target = job.out / f"{component.value}{backend.suffix}"
    progress(f"{label}: {backend.backend.value} build from {source.path}")
    start = time.perf_counter()
    built = backend.build(
        BuildJob(
            component=component,
            source=src_path,
            target=target,
            shapes=shapes,
            settings=config.build,
            fp8=source.fp8,
            external_data=external,
            machine=machine,
            run_dir=run_dir,
            progress=progress,
            label=label,
            allow_partial_fp8=job.allow_partial_fp8,
            build_has_fp8=job.build_has_fp8,
        )
    )
    seconds = time.perf_counter() - start
    warning = check_fp8(component, built.layers, source.path, job.allow_partial_fp8)
    if warning:
        progress(f"{label}: warning: {warning}")
    recorded = backend.recorded_machine(machine)
    rec = EngineRecord(
        backend=backend.backend,
        file=file_record(job.out, target),
        extra_files=tuple(file_record(job.out, p) for p in built.extra_files),
        precision=entry.precision,
        fp8=source.fp8,
        profile=shapes,
        source_onnx=_export_file(run_dir, job.export_rec, source.path),
        build_seconds=seconds,
        skip_layers=skip,
        controlnet_layers=controlnet,
        tensorrt_version=recorded.tensorrt_version,
        gpu_name=recorded.gpu.name if recorded.gpu else None,
        compute_capability=recorded.gpu.compute_capability if recorded.gpu else None,
        options=dict(built.options),
        layers=built.layers,
        device_memory_bytes=built.device_memory_bytes,
        streamable_weights_bytes=built.streamable_weights_bytes,
        compute_capabilities=built.compute_capabilities,
    )
    size_mib = sum(f.size for f in rec.files) / (1 << 20)
    precision = rec.precision.value + (" + fp8" if rec.fp8 else "")
    progress(f"{label}: done in {seconds:.1f} s ({size_mib:.1f} MiB, {precision})")
    if rec.layers is not None:
        progress(f"{label}: {rec.layers.summary()}")
    return rec


@locked_stage(Stage.BUILD)
def build(
    config: Config,
    run_dir: Path,
    backend: Backend | None = None,
    force: bool = False,
    *,
    hint: str = "",
    machine: MachineInfo | None = None,
    progress: Progress | None = None,
    allow_partial_fp8: bool = False,
) -> BuildRecord:
    """Build every exported component's engine into ``run_dir/engines``.

    Args:
        config: the run's config (``build`` and ``runtime`` sections shape the engines).
        run_dir: ``runs/<name>``, holding a verified export.
        backend: overrides ``config.build.backend`` (``auto``: TensorRT where it imports and a CUDA
            GPU is present, else ONNX Runtime).
        force: rebuild even when the existing engines are up to date.
        hint: appended to suggested commands (e.g. ``--config configs/tiny.yaml``).
        machine: this machine's TensorRT and GPU (detected when ``None``; tests fabricate it).
        progress: receives one line per step (default: stderr).
        allow_partial_fp8: an FP8 engine whose quantized Linear layers did not all become FP8
            GEMMs is built with a warning instead of failing.

    Returns:
        The build record now in ``run_dir/manifest.json``.

    Raises:
        ManifestError, StaleArtifactError, VerificationError: the export is missing, stale or corrupt.
        BackendUnavailableError: ``tensorrt`` requested where it cannot run.
        ConfigError: the profile ranges do not fit the model.
        BuildError: an engine could not be built, or an FP8 engine runs quantized layers in
            higher precision (nothing is published then).
        ModelError: the model directory lacks the tokenizer or scheduler files.
        UnsafeArtifactError: the export record names an ONNX file outside the run directory or
            through a symlink.
    """
    from sd35trt.models.loading import stage_digest, weights_identity

    run_dir = Path(run_dir)
    report = progress or print_progress
    runs = RunManifest(run_dir)
    # The export digest covers the weights (repo commit, LoRA bytes): a changed LoRA file is stale here too.
    export_digest = stage_digest(config, Stage.EXPORT, weights_identity(config))
    # Deciding whether to rebuild rehashes no unchanged file; a rebuild checks the export fully.
    export_rec = runs.verified(Stage.EXPORT, export_digest, hint=hint, cache=HashCache(run_dir))
    # Every problem of the build ranges, before any engine.
    check_config(config, export_rec.details.dims, Stage.BUILD)
    requested = backend or config.build.backend
    if machine is None:
        need_machine = requested is Backend.AUTO or backends.backend_of(requested).needs_machine_check
        machine = MachineInfo.detect() if need_machine else NO_MACHINE
    chosen, reason = backends.resolve_backend(requested, machine)
    if requested is Backend.AUTO:
        report(f"build backend {chosen.backend.value} ({reason})")

    digest = config.digest(*Stage.BUILD.config_sections)
    if not force and _up_to_date(runs, digest, export_rec, chosen.backend, machine):
        report(f"engines in {run_dir / Stage.BUILD.directory} are up to date (use --force to rebuild)")
        return runs.require(Stage.BUILD, hint)
    export_rec = runs.verified(Stage.EXPORT, export_digest, hint=hint)

    exported = export_rec.details
    dims, entries = exported.dims, exported.components
    components = [c for c in Component if c in entries]
    if not components:
        export_cmd = "`sd35trt export" + (f" {hint}`" if hint else "`")
        raise BuildError(f"the export record in {runs.path} lists no components: re-run {export_cmd}")
    support = support_dirs(exported.model_dir)

    engines: dict[Component, EngineRecord] = {}
    # Machine-independent engines (ONNX Runtime) record no TensorRT / GPU.
    target = chosen.recorded_machine(machine)
    with staged_output(run_dir, Stage.BUILD) as out:
        has_fp8 = any(entries[c].quantized for c in components)
        job = _Job(
            config, dims, run_dir, out, chosen, machine, export_rec, report, allow_partial_fp8, has_fp8
        )
        for i, component in enumerate(components, 1):
            label = f"[{i}/{len(components)}] {component.value}"
            engines[component] = _build_one(job, component, entries[component], label)
        support_files = _copy_support_files(support, out)
        # The whole config the engines were made with travels with them (``package`` ships it).
        atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        support_files.append(file_record(out, out / CONFIG_NAME))
        engine_manifest = EngineManifest(
            directory=run_dir / Stage.BUILD.directory,
            backend=chosen.backend,
            engines=engines,
            dims=dims,
            runtime_defaults=config.runtime,
            build_settings={**config.build.model_dump(mode="json"), "backend": chosen.backend.value},
            support_files=tuple(support_files),
            created=now_utc(),
            versions=tool_versions(),
            # the weights the engines hold, without the machine-specific model directory
            model=exported.model.model_dump(mode="json", exclude={"directory"}) if exported.model else {},
        )
        atomic_write_json(out / ENGINE_MANIFEST_NAME, engine_manifest.to_json())

    details = BuildDetails(
        backend=chosen.backend,
        backend_reason=reason,
        engines_manifest=f"{Stage.BUILD.directory}/{ENGINE_MANIFEST_NAME}",
        components={
            c: BuiltEngine(
                engine=f"{Stage.BUILD.directory}/{r.file.path}",
                precision=r.precision,
                fp8=r.fp8,
                build_seconds=round(r.build_seconds, 3),
            )
            for c, r in engines.items()
        },
        machine=BuildMachine(
            tensorrt_version=target.tensorrt_version,
            gpu_name=target.gpu.name if target.gpu else None,
            compute_capability=target.gpu.compute_capability if target.gpu else None,
        ),
    )
    record = new_record(
        Stage.BUILD,
        digest,
        records_for_tree(run_dir, Stage.BUILD.directory),
        upstream={Stage.EXPORT: export_rec},
        details=details,
    )
    runs.put(Stage.BUILD, record)
    report(f"built {len(engines)} {chosen.backend.value} engines in {run_dir / Stage.BUILD.directory}")
    return record
