"""The build stage: one engine per exported component, with the tokenizer files, scheduler config
and ``engines/manifest.json`` (:mod:`sd35trt.artifacts.engine_manifest`) beside them."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from sd35trt.artifacts.containment import contained_path
from sd35trt.artifacts.engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineManifest,
    EngineRecord,
    read_engine_manifest,
)
from sd35trt.artifacts.files import (
    HashCache,
    atomic_write_bytes,
    atomic_write_json,
    file_record,
    json_text,
    records_for_tree,
)
from sd35trt.artifacts.manifest import FileRecord, Stage, now_utc, tool_versions
from sd35trt.artifacts.records import (
    BuildDetails,
    BuildMachine,
    BuildRecord,
    BuiltEngine,
    ExportDetails,
    ExportedComponent,
    Fingerprint,
    StageRecord,
)
from sd35trt.backends import registry as backends
from sd35trt.backends.base import BuildJob, EngineBackend
from sd35trt.backends.layers import LayerReport
from sd35trt.backends.load import verify_engines
from sd35trt.backends.machine import NO_MACHINE, GpuInfo, MachineInfo
from sd35trt.components import (
    CONTROLNET_INPUT,
    TOKENIZER_SUBFOLDERS,
    Component,
    ModelDims,
    ShapeRange,
    profile,
)
from sd35trt.config import Backend, Config
from sd35trt.errors import BuildError, ModelError, Sd35TrtError
from sd35trt.guidance import cfg_enabled
from sd35trt.stages.check import check_config
from sd35trt.stages.driver import Progress, StageRun, StageSpec, print_progress, run_stage

SCHEDULER_SUBFOLDER = "scheduler"
SKIP_LAYERS_INPUT = "skip_layers"
#: The ControlNet graph's text input, absent from SD3.5-large's ControlNets.
CONTROLNET_TEXT_INPUT = "encoder_hidden_states"


@dataclass(frozen=True)
class Source:
    """The ONNX file an engine is built from (path relative to the run directory)."""

    path: str
    fp8: bool
    note: str | None = None


def choose_source(
    component: Component, entry: ExportedComponent, backend: Backend, gpu: GpuInfo | None
) -> Source:
    """The export to build ``component`` from: the FP8 one unless the backend cannot run FP8 on ``gpu``
    (``None``: no GPU).

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
    """``({input: shape}, has_external_data)`` of an ONNX file (ints, or axis names for dynamic
    dims), without its weights.

    Raises:
        ModelError: the file is not a loadable ONNX model, or its external data is unsafe
            (absolute, escaping the directory, a symlink, or truncated).
    """
    from sd35trt.stages.export.onnx_files import check_external_data, uses_external_data

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
    config: Config,
    dims: ModelDims,
    component: Component,
    skip_layers: int = 0,
    controlnet: int = 0,
    controlnet_text: bool = True,
) -> dict[str, ShapeRange]:
    """Profile of ``component`` from the config: batch, latent sizes, text lengths; the optimal
    batch is doubled when the default ``runtime.guidance_scale`` turns CFG on.

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
        controlnet_text=controlnet_text,
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
    return [rec for d in dirs for rec in records_for_tree(out, d.name)]


def _export_file(run_dir: Path, export_rec: StageRecord, rel: str) -> FileRecord:
    return next((f for f in export_rec.files if f.path == rel), None) or file_record(run_dir, rel)


def _model_dir(run: StageRun, exported: ExportDetails) -> Path:
    """The export's model directory: relative to the run directory, or absolute (faults.md #31).

    An older export's path, relative to where it ran, is taken only when it leads into this run
    directory, never into another run's.

    Raises:
        ModelError: a relative path that is not in the run directory (re-running export fixes it).
    """
    recorded = exported.model_dir
    if recorded.is_absolute() or (run.run_dir / recorded).is_dir():
        return recorded if recorded.is_absolute() else run.run_dir / recorded
    if recorded.absolute().is_relative_to(run.run_dir.absolute()) and recorded.is_dir():
        return recorded
    raise ModelError(
        f"the export record names model_dir {recorded}, which is not inside {run.run_dir} (an older "
        f"export recorded it relative to where it ran): re-run {run.command(Stage.EXPORT, '--force')}"
    )


def check_fp8(
    component: Component, layers: LayerReport | None, source: str, allow_partial: bool
) -> str | None:
    """Refuse an FP8 engine in which quantized Linear layers did not become FP8 GEMMs; return a
    warning instead when ``allow_partial`` lets it through.

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


def _build_one(run: StageRun, plan: _Build, out: Path, component: Component, label: str) -> EngineRecord:
    """Build one engine into ``out`` (the staged engines directory) and describe it."""
    config, run_dir, progress = run.config, run.run_dir, run.progress
    backend, machine = plan.backend, plan.machine
    export_rec = run.inputs[Stage.EXPORT]
    entry = export_rec.details.components[component]
    source = choose_source(component, entry, backend.backend, machine.gpu)
    if source.note:
        progress(f"{label}: {source.note}")
    # The export record is read from disk: a path it names must not lead out of the run directory.
    src_path = contained_path(run_dir, source.path)
    inputs, external = onnx_inputs(src_path)
    skip = inputs[SKIP_LAYERS_INPUT][0] if component.is_transformer and SKIP_LAYERS_INPUT in inputs else 0
    if not isinstance(skip, int) or skip < 0:
        raise BuildError(f"{source.path}: input {SKIP_LAYERS_INPUT} must have a fixed size, found {skip!r}")
    # The ControlNet's residual count, from the transformer graph's input (its own graph's output).
    controlnet = inputs[CONTROLNET_INPUT][1] if CONTROLNET_INPUT in inputs else 0
    # SD3.5-large's ControlNets read no text (sd35trt.models.controlnet)
    text = not component.is_controlnet or CONTROLNET_TEXT_INPUT in inputs
    shapes = engine_profile(config, export_rec.details.dims, component, skip, controlnet, text)
    check_inputs_match(source.path, inputs, shapes)
    target = out / f"{component.value}{backend.suffix}"
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
            build_has_fp8=plan.build_has_fp8,
        )
    )
    seconds = time.perf_counter() - start
    warning = check_fp8(component, built.layers, source.path, plan.allow_partial_fp8)
    if warning:
        progress(f"{label}: warning: {warning}")
    recorded = backend.recorded_machine(machine)
    rec = EngineRecord(
        backend=backend.backend,
        file=file_record(out, target),
        extra_files=tuple(file_record(out, p) for p in built.extra_files),
        precision=entry.precision,
        fp8=source.fp8,
        profile=shapes,
        source_onnx=_export_file(run_dir, export_rec, source.path),
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


class _Build(StageSpec):
    """The build stage (:func:`build`): reusable while the engines are this backend's and load here."""

    stage, details = Stage.BUILD, BuildDetails
    backend: EngineBackend  # the one chosen
    reason: str
    build_has_fp8: bool = False  # some component is FP8 (TensorRT-RTX then checks its targets)

    def __init__(self, requested: Backend | None, machine: MachineInfo | None, allow_partial_fp8: bool):
        self.requested, self.machine, self.allow_partial_fp8 = requested, machine, allow_partial_fp8

    def prepare(self, run: StageRun) -> dict:
        """Choose the backend (detecting the machine only where that needs it)."""
        from sd35trt.models.loading import weights_identity

        requested = self.requested or run.config.build.backend
        if self.machine is None:
            need_machine = requested is Backend.AUTO or backends.backend_of(requested).needs_machine_check
            self.machine = MachineInfo.detect() if need_machine else NO_MACHINE
        self.backend, self.reason = backends.resolve_backend(requested, self.machine)
        if requested is Backend.AUTO:
            run.progress(f"build backend {self.backend.backend.value} ({self.reason})")
        # The export fingerprint covers the weights (repo commit, LoRA bytes): a new LoRA is stale here too.
        return weights_identity(run.config)

    def reusable(self, run: StageRun, record: StageRecord) -> bool:
        if record.details.backend is not self.backend.backend:
            return False
        engines_dir = run.run_dir / Stage.BUILD.directory
        try:
            engines = verify_engines(engines_dir, cache=HashCache(run.run_dir), check_machine=False)
        except Sd35TrtError:  # missing or modified: rebuild
            return False
        # Built for another TensorRT version or GPU (TensorRT-RTX: another TensorRT-RTX version): rebuild.
        stale = any(
            backends.backend_of(r.backend).rebuild_reason(r, self.machine) for r in engines.engines.values()
        )
        return engines.backend is self.backend.backend and not stale

    def refresh(self, run: StageRun, record: StageRecord) -> dict[str, bytes]:
        """Rewrite the engine manifest's runtime defaults (and config.yaml) when only they changed.

        The defaults (steps, guidance, size, negative prompt, skip-layer guidance window) are read
        at run time; no engine depends on them, so changing one rebuilds nothing.
        """
        manifest = read_engine_manifest(run.run_dir / Stage.BUILD.directory)
        defaults = run.config.runtime.model_dump(mode="json")
        recorded = manifest.runtime_defaults.model_dump(mode="json")
        if recorded == defaults:
            return {}
        changes = Fingerprint("", {"runtime": defaults}).changes({"runtime": recorded})
        run.progress(f"build: runtime defaults updated in the engine manifest, no engine rebuilt ({changes})")
        config_yaml = _config_yaml(run.config)
        rewritten = FileRecord(CONFIG_NAME, len(config_yaml), hashlib.sha256(config_yaml).hexdigest())
        support = tuple(rewritten if f.path == CONFIG_NAME else f for f in manifest.support_files)
        updated = manifest.model_copy(
            update={"runtime_defaults": run.config.runtime, "support_files": support}
        )
        return {ENGINE_MANIFEST_NAME: json_text(updated.to_json()).encode(), CONFIG_NAME: config_yaml}

    def produce(self, run: StageRun, out: Path) -> BuildDetails:
        """Build every exported component's engine into ``out``, with its support files and manifest."""
        config, run_dir = run.config, run.run_dir
        export_rec = run.inputs[Stage.EXPORT]
        exported = export_rec.details
        check_config(config, exported.dims, Stage.BUILD)  # every problem of the ranges, before any engine
        components = [c for c in Component if c in exported.components]
        if not components:
            raise BuildError(
                f"the export record in {run.manifest.path} lists no components: "
                f"re-run {run.command(Stage.EXPORT)}"
            )
        support = support_dirs(_model_dir(run, exported))
        self.build_has_fp8 = any(exported.components[c].quantized for c in components)
        engines = {
            c: _build_one(run, self, out, c, f"[{i}/{len(components)}] {c.value}")
            for i, c in enumerate(components, 1)
        }
        support_files = _copy_support_files(support, out)
        # The whole config the engines were made with travels with them (``package`` ships it).
        atomic_write_bytes(out / CONFIG_NAME, _config_yaml(config))
        support_files.append(file_record(out, out / CONFIG_NAME))
        engine_manifest = EngineManifest(
            directory=run_dir / Stage.BUILD.directory,
            backend=self.backend.backend,
            engines=engines,
            dims=exported.dims,
            runtime_defaults=config.runtime,
            build_settings={**config.build.model_dump(mode="json"), "backend": self.backend.backend.value},
            support_files=tuple(support_files),
            created=now_utc(),
            versions=tool_versions(),
            # the weights the engines hold, without the machine-specific model directory
            model=exported.model.model_dump(mode="json", exclude={"directory"}) if exported.model else {},
        )
        atomic_write_json(out / ENGINE_MANIFEST_NAME, engine_manifest.to_json())
        run.progress(
            f"built {len(engines)} {self.backend.backend.value} engines in {run_dir / Stage.BUILD.directory}"
        )
        return _details(self, engines)


def _config_yaml(config: Config) -> bytes:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode()


def _details(plan: _Build, engines: Mapping[Component, EngineRecord]) -> BuildDetails:
    # Machine-independent engines (ONNX Runtime) record no TensorRT / GPU.
    target = plan.backend.recorded_machine(plan.machine)
    return BuildDetails(
        backend=plan.backend.backend,
        backend_reason=plan.reason,
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
    """Build every exported component's engine into ``run_dir/engines`` (through
    :func:`~sd35trt.stages.driver.run_stage`, which documents ``force``, ``hint`` and ``progress``).

    Engines are rebuilt when the ``build`` section, the T5 length, whether CFG is on by default
    (the profiles' optimal batch), the export, the backend or the machine (TensorRT version, GPU)
    changed, or an engine file fails verification; other runtime settings are generation
    defaults, updated in the engine manifest without a rebuild.

    Args:
        backend: overrides ``config.build.backend`` (``auto``: TensorRT where it imports and a CUDA
            GPU is present, else ONNX Runtime).
        machine: this machine's TensorRT and GPU (detected when ``None``; tests fabricate it).
        allow_partial_fp8: an FP8 engine whose quantized Linear layers did not all become FP8
            GEMMs is built with a warning instead of failing.

    Returns:
        The build record now in ``run_dir/manifest.json``.

    Raises:
        RunDirError, RunDirBusyError: see :func:`~sd35trt.stages.driver.run_stage`.
        ManifestError, StaleArtifactError, VerificationError: the export is missing, stale or corrupt.
        BackendUnavailableError: ``tensorrt`` requested where it cannot run.
        ConfigError: the profile ranges do not fit the model.
        BuildError: an engine could not be built, or an FP8 engine runs quantized layers in
            higher precision (nothing is published then).
        ModelError: the model directory lacks the tokenizer or scheduler files.
        UnsafeArtifactError: the export record names an ONNX file outside the run directory or
            through a symlink.
    """
    spec = _Build(backend, machine, allow_partial_fp8)
    return run_stage(spec, config, run_dir, force=force, hint=hint, progress=progress or print_progress)
