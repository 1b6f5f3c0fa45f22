"""TensorRT for RTX backend: real plans built on any machine, run on RTX-class GPUs.

Written against the ``tensorrt_rtx`` 1.7 Python API (``tests/unit/backends/test_tensorrt_rtx.py``
builds with the real libraries); ``tensorrt_rtx`` is imported inside functions only. It shares
:func:`~sd35trt.backends.tensorrt_build.build_serialized` and :class:`TrtEngine` with TensorRT;
what differs:

- **Build anywhere.** The ahead-of-time build needs no GPU: the plan is compiled for the
  ``build.compute_capabilities`` targets and runs on any of them. No timing cache: with one the
  build looks for a GPU.
- **The layer report from the build log** (:func:`~sd35trt.backends.layers.parse_builder_log`,
  log kept in ``<run>/build_logs/``), as the plan cannot be deserialized without a GPU. With
  several targets the log lists one compiled graph (12.0 in TensorRT-RTX 1.7, measured).
- **Run time.** The GPU must be a target and the TensorRT-RTX version the one that built the plan,
  both checked before a byte is deserialized. A JIT specializes the plan at load; its kernels are
  kept in a runtime cache file per engine in ``<engines>.runtime-cache/``, written back at release
  under a file lock, atomically. CUDA graphs are TensorRT-RTX's own (``WHOLE_GRAPH_CAPTURE``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.artifacts.files import atomic_write_bytes, atomic_write_text
from sd35trt.backends.base import BuildJob, BuiltEngine
from sd35trt.backends.layers import (
    LAYERS_MESSAGE,
    LayerInfoError,
    Precision,
    parse_builder_log,
    quantized_formats,
    quantized_linear_nodes,
)
from sd35trt.backends.machine import MachineInfo, same_tensorrt_version, sm_name
from sd35trt.backends.tensorrt import TensorRTBackend, TrtEngine
from sd35trt.backends.tensorrt_build import apply_builder_options, build_serialized, recorded_options
from sd35trt.components import Component
from sd35trt.config import (
    ALL_COMPUTE_CAPABILITIES,
    FP8_COMPUTE_CAPABILITIES,
    Backend,
    BuildSettings,
    ComputeCapability,
)
from sd35trt.errors import BuildError, ConfigError

if TYPE_CHECKING:
    from sd35trt.artifacts.engine_manifest import EngineManifest, EngineRecord

LIBRARY = "TensorRT-RTX"
#: The wheels that provide ``tensorrt_rtx`` (pinned in requirements.lock).
INSTALL = "pip install tensorrt_rtx_cu13 (requirements.lock pins it)"
#: Where the builder logs go, per run directory.
BUILD_LOGS = "build_logs"
RUNTIME_CACHE_SUFFIX = ".runtime-cache"


def build_targets(settings: BuildSettings, fp8: bool) -> tuple[ComputeCapability, ...]:
    """The compute capabilities a build targets: the configured ones, else the defaults."""
    if settings.compute_capabilities:
        return settings.compute_capabilities
    return FP8_COMPUTE_CAPABILITIES if fp8 else ALL_COMPUTE_CAPABILITIES


def check_targets(targets: Sequence[ComputeCapability], formats: Iterable[Precision], source: str) -> None:
    """Refuse targets that cannot run the engine's low-precision types.

    Raises:
        ConfigError: FP8 for a target below 8.9, or FP4 for a target other than 12.x, naming the
            target and the ONNX.
    """
    formats = set(formats)
    for fmt, runs, where in (
        (Precision.FP8, "has_fp8", "8.9, 12.0 and 12.1"),
        (Precision.FP4, "has_fp4", "12.0 and 12.1"),
    ):
        lacking = [c.value for c in targets if not getattr(c, runs)] if fmt in formats else []
        if lacking:
            raise ConfigError(
                f"build.compute_capabilities has {', '.join(lacking)}, which cannot run the "
                f"{fmt.value.upper()} layers of {source} ({fmt.value.upper()} runs on {where}); drop it "
                "from the targets"
            )


def describe_targets(capabilities: Iterable[tuple[int, int]]) -> str:
    """``8.9 (RTX 4090, L40S, L4), 12.0 (RTX 5090, ...)``: targets with example GPUs."""
    parts = []
    for cc in capabilities:
        text = f"{cc[0]}.{cc[1]}"
        try:
            parts.append(f"{text} ({ComputeCapability(text).examples})")
        except ValueError:
            parts.append(text)
    return ", ".join(parts)


def _capture_logger(trt: Any) -> Any:
    """An ``ILogger`` keeping info and louder messages and the verbose ``Layers:`` message.

    Warnings and errors are also printed to stderr, as ``trt.Logger(WARNING)`` would. The rest of
    the verbose output (hundreds of thousands of lines at full size) is dropped as it arrives.
    """
    severity = trt.ILogger.Severity
    levels = (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING, severity.INFO, severity.VERBOSE)
    tags = dict(zip(levels, "FEWIV", strict=True))

    class CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            if level == severity.VERBOSE and not msg.startswith(LAYERS_MESSAGE):
                return
            self.lines.append(f"[{tags.get(level, '?')}] {msg}")
            if level in levels[:3]:
                print(f"[{LIBRARY}] [{tags[level]}] {msg}", file=sys.stderr, flush=True)

        def text(self) -> str:
            return "\n".join(self.lines) + "\n"

    return CaptureLogger()


def build_rtx_plan(job: BuildJob) -> BuiltEngine:
    """Build ``job.target`` with TensorRT-RTX (no GPU needed) and read its layer report from the log.

    Raises:
        ConfigError: a target cannot run the model's FP8 / FP4 layers.
        BuildError: the parser or the builder failed, or the log has no readable ``Layers:`` section.
    """
    import tensorrt_rtx as trt

    targets = build_targets(job.settings, job.build_has_fp8)
    check_targets(targets, quantized_formats(job.source), job.source.name)
    logger = _capture_logger(trt)

    def configure(config: Any) -> None:
        apply_builder_options(trt, config, job.settings)
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, cc.name), i):
                raise BuildError(f"{LIBRARY} {trt.__version__} refused compute capability {cc.value}")

    # TensorRT-RTX networks are strongly typed: no creation flag
    serialized, _ = build_serialized(trt, logger, job, configure, flags=0, library=LIBRARY)
    atomic_write_bytes(job.target, memoryview(serialized))
    log_text = logger.text()
    log_path = job.run_dir / BUILD_LOGS / f"{job.component.value}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log_path, log_text)
    try:
        built = parse_builder_log(log_text)
    except LayerInfoError as err:
        raise BuildError(f"{job.target.name}: {err} ({log_path})") from None
    quantized = quantized_linear_nodes(job.source) if job.fp8 else []
    return BuiltEngine(
        options={
            **recorded_options(job.settings),
            "compute_capabilities": [cc.value for cc in targets],
            "tensorrt_rtx_version": trt.__version__,
            "build_log": log_path.relative_to(job.run_dir).as_posix(),
        },
        layers=built.report(quantized),
        device_memory_bytes=built.activation_bytes,
        compute_capabilities=tuple(cc.version for cc in targets),
    )


class TrtRtxEngine(TrtEngine):
    """One component's TensorRT-RTX engine: its context comes from an ``IRuntimeConfig`` holding
    the allocation strategy, the runtime cache (JIT-compiled kernels) and the CUDA graph strategy."""

    module = "tensorrt_rtx"
    library = LIBRARY
    builtin_cuda_graphs = True

    def __init__(self, *args: Any, runtime_cache: Path | None = None, **kwargs: Any) -> None:
        """``runtime_cache``: the runtime cache file (``None``: kept in memory only)."""
        super().__init__(*args, **kwargs)
        self.runtime_cache = runtime_cache
        # Held while the context lives: the config and cache objects must outlive it.
        self._runtime_config: Any = None
        self._runtime_cache: Any = None

    def _new_context(self, trt: Any, engine: Any, user_managed: bool) -> Any:
        config = engine.create_runtime_config()
        if user_managed:
            config.set_execution_context_allocation_strategy(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED
            )
        cache = config.create_runtime_cache()
        if self.runtime_cache is not None and self.runtime_cache.is_file():
            # Rejected (False) when made by another GPU, driver or TensorRT-RTX: start empty then.
            cache.deserialize(self.runtime_cache.read_bytes())
        config.set_runtime_cache(cache)
        if self.use_cuda_graph:
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._runtime_config, self._runtime_cache = config, cache
        return engine.create_execution_context(config)

    def save_runtime_cache(self) -> bool:
        """Write the runtime cache back (atomically, under a file lock: several processes may
        share it). Returns whether it was written (not when the directory is read-only)."""
        if self.runtime_cache is None or self._runtime_config is None:
            return False
        from filelock import FileLock

        blob = self._runtime_cache.serialize()
        try:
            self.runtime_cache.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.runtime_cache) + ".lock", timeout=60):
                atomic_write_bytes(self.runtime_cache, memoryview(blob))
        except OSError as err:
            print(f"[{LIBRARY}] runtime cache not saved to {self.runtime_cache}: {err}", file=sys.stderr)
            return False
        return True

    def _deactivate_impl(self) -> None:
        if self._context is not None:
            self.save_runtime_cache()
        super()._deactivate_impl()  # the context goes first
        self._runtime_config = self._runtime_cache = None


def runtime_cache_path(manifest: EngineManifest, component: Component) -> Path:
    """``<engines>.runtime-cache/<component>-<plan sha256[:16]>.cache``: beside the engines, outside
    the verified directory, one file per plan (a rebuilt plan starts its own)."""
    rec = manifest.record(component)
    directory = manifest.directory.parent / f"{manifest.directory.name}{RUNTIME_CACHE_SUFFIX}"
    return directory / f"{component.value}-{rec.file.sha256[:16]}.cache"


class TensorRTRtxBackend(TensorRTBackend):
    """TensorRT-RTX plans: built on any machine for compute capability targets, run on those GPUs.

    Runs like TensorRT (device, shared activation memory, weight streaming: inherited); builds,
    records and checks machines its own way.
    """

    backend = Backend.TENSORRT_RTX
    label = LIBRARY
    requirements = f"TensorRT-RTX ({INSTALL}); running them needs a GPU of a target compute capability"
    portable = True
    engine_class = TrtRtxEngine

    def missing(self, machine: MachineInfo) -> list[str]:
        return [] if machine.tensorrt_rtx_version else ["TensorRT-RTX (import tensorrt_rtx failed)"]

    def describe(self, machine: MachineInfo) -> str:
        return f"{LIBRARY} {machine.tensorrt_rtx_version}"

    def runs_fp8(self, machine: MachineInfo) -> bool:
        return True  # on its targets, which must have FP8 (checked when building)

    def recorded_machine(self, machine: MachineInfo) -> MachineInfo:
        return MachineInfo(tensorrt_version=machine.tensorrt_rtx_version, gpu=None)

    def built_for(self, record: EngineRecord) -> str:
        sms = ", ".join(sm_name(cc) for cc in record.compute_capabilities) or "no recorded target"
        return f"{sms} / {LIBRARY} {record.tensorrt_version}"

    def runs_on(self, manifest: EngineManifest) -> str:
        """``GPUs of compute capability 8.9 (RTX 4090, ...) or 12.0 (RTX 5090, ...) with TensorRT-RTX 1.7``.

        Every engine of the set must load: the targets they share.
        """
        records = list(manifest.engines.values())
        shared = [
            cc for cc in records[0].compute_capabilities if all(cc in r.compute_capabilities for r in records)
        ]
        versions = sorted({r.tensorrt_version or "?" for r in records})
        where = describe_targets(shared).replace("), ", ") or ") if shared else "no GPU all of them target"
        return f"GPUs of compute capability {where} with {LIBRARY} {', '.join(versions)}"

    def incompatibility(self, record: EngineRecord, machine: MachineInfo) -> str | None:
        runs_on = f"they run on compute capability {describe_targets(record.compute_capabilities)}"
        if machine.gpu is None:
            return f"this machine has no CUDA GPU ({runs_on})"
        if machine.gpu.compute_capability not in record.compute_capabilities:
            return f"this GPU is {machine.gpu.name} ({machine.gpu.sm}), not a target ({runs_on})"
        return self.rebuild_reason(record, machine)

    def rebuild_reason(self, record: EngineRecord, machine: MachineInfo) -> str | None:
        # The plan is built for targets, not for this machine: only the library version matters.
        here = machine.tensorrt_rtx_version
        if here is None:
            return f"this machine has no {LIBRARY} ({INSTALL})"
        if record.tensorrt_version is None or not same_tensorrt_version(record.tensorrt_version, here):
            return f"this machine has {LIBRARY} {here}"
        return None

    def build(self, job: BuildJob) -> BuiltEngine:
        return build_rtx_plan(job)

    def engine_options(self, manifest: EngineManifest, component: Component) -> dict[str, Any]:
        return {"runtime_cache": runtime_cache_path(manifest, component)}
