"""The build stage: one engine per exported component, and the engine manifest.

Reads the verified export record, builds every component's engine with TensorRT (a plan) or
ONNX Runtime (an offline-optimized model) into a staged ``engines/`` directory, copies the
tokenizer files and scheduler config beside them, writes ``engines/manifest.json`` (everything
the runtime needs; see :mod:`sd35trt.runtime.engines`) and only then records the stage in the run
manifest. ``tensorrt`` is imported inside functions only.

A rebuild happens when the build config, the export, the backend or the machine (TensorRT
version, GPU) changed, when an engine file fails verification, or with ``force``; otherwise the
existing record is returned.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from sd35trt.components import TOKENIZER_SUBFOLDERS, Component, ModelDims, ShapeRange, profile
from sd35trt.config import Backend, Config, Precision
from sd35trt.errors import BackendUnavailableError, BuildError, ModelError, Sd35TrtError
from sd35trt.manifest import (
    FileRecord,
    RunManifest,
    Stage,
    atomic_write_json,
    atomic_write_text,
    file_record,
    new_record,
    now_utc,
    record_digest,
    records_for_tree,
    staged_directory,
    tool_versions,
)
from sd35trt.runtime import ort as ort_backend
from sd35trt.runtime.engines import (
    ENGINE_MANIFEST_NAME,
    ENGINE_SUFFIX,
    EngineManifest,
    EngineRecord,
    GpuInfo,
    MachineInfo,
    verify_engines,
)

Progress = Callable[[str], None]
SCHEDULER_SUBFOLDER = "scheduler"
SKIP_LAYERS_INPUT = "skip_layers"


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_backend(requested: Backend, machine: MachineInfo) -> tuple[Backend, str]:
    """The backend a build uses, and why.

    Raises:
        BackendUnavailableError: ``tensorrt`` was asked for where TensorRT or a CUDA GPU is missing.
    """
    missing = [
        what
        for what, absent in (
            ("TensorRT (import tensorrt failed)", not machine.tensorrt_version),
            ("CUDA GPU", not machine.gpu),
        )
        if absent
    ]
    if requested is Backend.ONNXRUNTIME:
        return Backend.ONNXRUNTIME, "requested"
    if requested is Backend.TENSORRT:
        if missing:
            raise BackendUnavailableError(
                "backend tensorrt needs TensorRT and a CUDA GPU; this machine has no "
                f"{' and no '.join(missing)}: use --backend onnxruntime (or auto)"
            )
        return Backend.TENSORRT, "requested"
    if missing:
        return Backend.ONNXRUNTIME, f"auto: no {' and no '.join(missing)}, using ONNX Runtime"
    return (
        Backend.TENSORRT,
        f"auto: TensorRT {machine.tensorrt_version} on {machine.gpu.name} ({machine.gpu.sm})",
    )


@dataclass(frozen=True)
class Source:
    """The ONNX file an engine is built from (path relative to the run directory)."""

    path: str
    fp8: bool
    note: str | None = None


def choose_source(component: Component, entry: Mapping, backend: Backend, gpu: GpuInfo | None) -> Source:
    """The export to build ``component`` from: the FP8 one unless TensorRT runs on a GPU without FP8.

    Raises:
        BuildError: the GPU has no FP8 and the export has no unquantized graph to fall back on.
    """
    quantized = bool(entry.get("quantized"))
    if not (quantized and backend is Backend.TENSORRT and gpu is not None and not gpu.has_fp8):
        return Source(entry["onnx"], fp8=quantized)
    fallback = entry.get("onnx_unquantized")
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
    from sd35trt.export.onnx_tools import check_external_data, uses_external_data

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
    config: Config, dims: ModelDims, component: Component, skip_layers: int = 0
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
        cfg_by_default=config.runtime.guidance_scale > 1.0,
        skip_layers=skip_layers,
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


def timing_cache_path(run_dir: Path, tensorrt_version: str, gpu: GpuInfo) -> Path:
    """Timing caches are valid per TensorRT version and GPU: one file per pair, reused by rebuilds."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower()
    return run_dir / "timing_cache" / f"tensorrt-{tensorrt_version}_{slug}_{gpu.sm}.cache"


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


def _export_file(run_dir: Path, export_rec: dict, rel: str) -> FileRecord:
    for f in export_rec.get("files", []):
        if f["path"] == rel:
            return FileRecord.from_json(f)
    return file_record(run_dir, rel)


def _up_to_date(
    run_dir: Path,
    previous: dict | None,
    digest: str,
    export_rec: dict,
    backend: Backend,
    machine: MachineInfo,
) -> bool:
    """Whether ``previous`` (the last build record) still holds for this config, export and machine."""
    if previous is None or previous.get("config_digest") != digest:
        return False
    if previous.get("upstream", {}).get(Stage.EXPORT.value) != record_digest(export_rec):
        return False
    if previous.get("details", {}).get("backend") != backend.value:
        return False
    try:
        engines = verify_engines(run_dir / Stage.BUILD.directory, machine=machine)
    except Sd35TrtError:  # missing, modified, or built for another TensorRT / GPU: rebuild
        return False
    return engines.backend is backend


@dataclass(frozen=True)
class _Job:
    """What every component's build shares."""

    config: Config
    dims: ModelDims
    run_dir: Path
    out: Path  # the staged engines directory
    backend: Backend
    machine: MachineInfo
    export_rec: dict
    progress: Progress


def _build_one(job: _Job, component: Component, entry: Mapping, label: str) -> EngineRecord:
    """Build one engine into ``job.out`` and describe it."""
    config, run_dir, out, backend, machine, progress = (
        job.config, job.run_dir, job.out, job.backend, job.machine, job.progress,
    )  # fmt: skip
    source = choose_source(component, entry, backend, machine.gpu)
    if source.note:
        progress(f"{label}: {source.note}")
    src_path = run_dir / source.path
    inputs, external = onnx_inputs(src_path)
    skip = (
        inputs[SKIP_LAYERS_INPUT][0]
        if component is Component.TRANSFORMER and SKIP_LAYERS_INPUT in inputs
        else 0
    )
    if not isinstance(skip, int) or skip < 0:
        raise BuildError(f"{source.path}: input {SKIP_LAYERS_INPUT} must have a fixed size, found {skip!r}")
    shapes = engine_profile(config, job.dims, component, skip)
    check_inputs_match(source.path, inputs, shapes)
    target = out / f"{component.value}{ENGINE_SUFFIX[backend]}"
    progress(f"{label}: {backend.value} build from {source.path}")
    start = time.perf_counter()
    gpu = machine.gpu
    if backend is Backend.TENSORRT:
        from sd35trt.runtime import trt as trt_backend

        settings = trt_backend.TrtBuildOptions(
            optimization_level=config.build.optimization_level,
            workspace_gib=config.build.workspace_gib,
            weight_streaming=config.build.weight_streaming,
            refit=config.build.refit,
        )
        cache = timing_cache_path(run_dir, machine.tensorrt_version, gpu)
        options = trt_backend.build_plan(src_path, target, shapes, settings, cache, progress, label)
    else:
        options = ort_backend.optimize_model(src_path, target, external_data=external)
    seconds = time.perf_counter() - start
    # ONNX Runtime writes the data file only when some initializer reaches its size threshold.
    data_file = target.with_name(target.name + ".data")
    extra = [file_record(out, data_file)] if backend is Backend.ONNXRUNTIME and data_file.is_file() else []
    rec = EngineRecord(
        component=component,
        backend=backend,
        file=file_record(out, target),
        extra_files=tuple(extra),
        precision=Precision(entry.get("precision", getattr(config.export.precision, component.value).value)),
        fp8=source.fp8,
        profile=shapes,
        source_onnx=_export_file(run_dir, job.export_rec, source.path),
        build_seconds=seconds,
        skip_layers=skip,
        tensorrt_version=machine.tensorrt_version if backend is Backend.TENSORRT else None,
        gpu_name=gpu.name if backend is Backend.TENSORRT and gpu else None,
        compute_capability=gpu.compute_capability if backend is Backend.TENSORRT and gpu else None,
        options=options,
    )
    size_mib = sum(f.size for f in rec.files) / (1 << 20)
    precision = rec.precision.value + (" + fp8" if rec.fp8 else "")
    progress(f"{label}: done in {seconds:.1f} s ({size_mib:.1f} MiB, {precision})")
    return rec


def build(
    config: Config,
    run_dir: Path,
    backend: Backend | None = None,
    force: bool = False,
    *,
    hint: str = "",
    machine: MachineInfo | None = None,
    progress: Progress | None = None,
) -> dict:
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

    Returns:
        The build record now in ``run_dir/manifest.json``.

    Raises:
        ManifestError, StaleArtifactError, VerificationError: the export is missing, stale or corrupt.
        BackendUnavailableError: ``tensorrt`` requested where it cannot run.
        ConfigError: the profile ranges do not fit the model.
        BuildError: an engine could not be built (nothing is published then).
        ModelError: the model directory lacks the tokenizer or scheduler files.
    """
    run_dir = Path(run_dir)
    report = progress or print_progress
    runs = RunManifest(run_dir)
    export_rec = runs.verified(Stage.EXPORT, config.digest(*Stage.EXPORT.config_sections), hint=hint)
    requested = backend or config.build.backend
    if machine is None:
        need_tensorrt = requested is not Backend.ONNXRUNTIME
        machine = MachineInfo.detect() if need_tensorrt else MachineInfo(tensorrt_version=None, gpu=None)
    chosen, reason = resolve_backend(requested, machine)
    if requested is Backend.AUTO:
        report(f"build backend {chosen.value} ({reason})")

    digest = config.digest(*Stage.BUILD.config_sections)
    if not force and _up_to_date(run_dir, runs.get(Stage.BUILD), digest, export_rec, chosen, machine):
        report(f"engines in {run_dir / Stage.BUILD.directory} are up to date (use --force to rebuild)")
        return runs.require(Stage.BUILD, hint)

    details = export_rec.get("details", {})
    export_cmd = "`sd35trt export" + (f" {hint}`" if hint else "`")
    try:
        dims = ModelDims.from_json(details["dims"])
        entries = details["components"]
        model_dir = Path(details["model_dir"])
    except (KeyError, TypeError) as err:
        raise BuildError(f"the export record in {runs.path} lacks {err}: re-run {export_cmd}") from None
    components = [c for c in Component if c.value in entries]
    if not components:
        raise BuildError(f"the export record in {runs.path} lists no components: re-run {export_cmd}")
    support = support_dirs(model_dir)

    engines: dict[Component, EngineRecord] = {}
    # ONNX Runtime engines are machine-independent: record no TensorRT / GPU for them.
    target = machine if chosen is Backend.TENSORRT else MachineInfo(tensorrt_version=None, gpu=None)
    with staged_directory(run_dir, Stage.BUILD.directory) as out:
        job = _Job(config, dims, run_dir, out, chosen, target, export_rec, report)
        for i, component in enumerate(components, 1):
            label = f"[{i}/{len(components)}] {component.value}"
            engines[component] = _build_one(job, component, entries[component.value], label)
        support_files = _copy_support_files(support, out)
        # The whole config the engines were made with travels with them (``package`` ships it).
        atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        support_files.append(file_record(out, out / CONFIG_NAME))
        engine_manifest = EngineManifest(
            directory=run_dir / Stage.BUILD.directory,
            backend=chosen,
            engines=engines,
            dims=dims,
            runtime_defaults=config.runtime.model_dump(mode="json"),
            build_settings={**config.build.model_dump(mode="json"), "backend": chosen.value},
            support_files=tuple(support_files),
            created=now_utc(),
            versions=tool_versions(),
        )
        atomic_write_json(out / ENGINE_MANIFEST_NAME, engine_manifest.to_json())

    record = new_record(
        Stage.BUILD,
        digest,
        records_for_tree(run_dir, Stage.BUILD.directory),
        upstream={Stage.EXPORT: export_rec},
        details={
            "backend": chosen.value,
            "backend_reason": reason,
            "engines_manifest": f"{Stage.BUILD.directory}/{ENGINE_MANIFEST_NAME}",
            "components": {
                c.value: {
                    "engine": f"{Stage.BUILD.directory}/{r.file.path}",
                    "precision": r.precision.value,
                    "fp8": r.fp8,
                    "build_seconds": round(r.build_seconds, 3),
                }
                for c, r in engines.items()
            },
            "machine": {
                "tensorrt_version": target.tensorrt_version,
                "gpu_name": target.gpu.name if target.gpu else None,
                "compute_capability": list(target.gpu.compute_capability) if target.gpu else None,
            },
        },
    )
    runs.put(Stage.BUILD, record)
    report(f"built {len(engines)} {chosen.value} engines in {run_dir / Stage.BUILD.directory}")
    return record
