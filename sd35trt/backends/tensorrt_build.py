"""TensorRT plan builder, and the layer information read back from each plan.

Written against the TensorRT 10 and 11 Python API (checked against the real bindings of both by
``tests/unit/backends/test_tensorrt_api.py``). ``tensorrt`` is imported inside functions only.
:func:`build_serialized` is what TensorRT and TensorRT-RTX builds share.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sd35trt.artifacts.files import atomic_write_bytes
from sd35trt.backends.base import BuildJob, BuiltEngine, Progress
from sd35trt.backends.layers import LayerInfoError, parse_layer_information, quantized_linear_nodes, summarize
from sd35trt.backends.machine import MachineInfo
from sd35trt.components import ShapeRange
from sd35trt.config import BuildSettings
from sd35trt.errors import BuildError

_GIB = 1 << 30


def recorded_options(settings: BuildSettings) -> dict[str, Any]:
    """The builder settings the engine manifest records, the run-time weight streaming budget too."""
    budget = settings.weight_streaming_budget_gib
    return {
        "builder_optimization_level": settings.optimization_level,
        "workspace_bytes": int(settings.workspace_gib * _GIB) if settings.workspace_gib else None,
        "weight_streaming": settings.weight_streaming,
        "refit": settings.refit,
        "strongly_typed": True,
        "profiling_verbosity": "detailed",
        **(
            {"weight_streaming_budget_bytes": int(budget * _GIB) if budget is not None else None}
            if settings.weight_streaming
            else {}
        ),
    }


def apply_builder_options(trt: Any, config: Any, settings: BuildSettings) -> None:
    """Set ``settings`` on a TensorRT or TensorRT-RTX ``IBuilderConfig``."""
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * _GIB))
    if settings.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if settings.refit:
        config.set_flag(trt.BuilderFlag.REFIT)


def timing_cache_path(run_dir: Path, machine: MachineInfo) -> Path | None:
    """Timing caches are valid per TensorRT version and GPU: one file per pair, reused by rebuilds."""
    if machine.gpu is None or machine.tensorrt_version is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine.gpu.name).strip("-").lower()
    return run_dir / "timing_cache" / f"tensorrt-{machine.tensorrt_version}_{slug}_{machine.gpu.sm}.cache"


def network_flags(trt: Any) -> int:
    """Creation flags of a strongly typed network on TensorRT 10 and 11.

    TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored, so pass
    none); TensorRT 10 needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
    """
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def add_profile(builder: Any, config: Any, shapes: Mapping[str, ShapeRange]) -> int:
    """Add one optimization profile with ``shapes`` (min / opt / max per input) to ``config``.

    Raises:
        BuildError: TensorRT rejects the profile (e.g. opt outside min..max).
    """
    profile = builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, r.min, r.opt, r.max)
    index = config.add_optimization_profile(profile)
    if index < 0:
        ranges = ", ".join(f"{n} {r.min}..{r.max}" for n, r in shapes.items())
        raise BuildError(f"TensorRT rejected the optimization profile ({ranges})")
    return index


def _progress_monitor(trt: Any, report: Progress, label: str, every_s: float = 5.0) -> Any:
    """An ``IProgressMonitor`` that reports top-level builder phases, at most every ``every_s``."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                report(f"{label}: {phase_name}")

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self._last >= every_s:
                self._last = now
                report(f"{label}: {phase_name} {step + 1}/{self._steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self._steps.pop(phase_name, None)

    return Monitor()


def build_serialized(
    trt: Any,
    logger: Any,
    job: BuildJob,
    configure: Callable[[Any], None],
    *,
    flags: int,
    library: str = "TensorRT",
) -> tuple[Any, Any]:
    """Parse ``job.source`` with ``trt`` (``tensorrt`` or ``tensorrt_rtx``) into a strongly typed
    network and build its serialized plan.

    The parser reads the model from its file (so external weights resolve); one optimization
    profile; detailed profiling verbosity (layer names, types and tactics: what ``inspect`` and the
    FP8 check read). ``configure`` sets the library's own options on the ``IBuilderConfig``.

    Returns:
        The serialized plan (``IHostMemory``) and the builder config (it holds the timing cache).

    Raises:
        BuildError: the parser rejected the model (its errors listed), the profile was refused,
            or the builder failed.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{library}'s ONNX parser rejected {job.source}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    configure(config)
    add_profile(builder, config, job.shapes)
    # The monitor (like the parser, which owns the parsed weights) must outlive the build.
    monitor = _progress_monitor(trt, job.progress, job.label)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"{library} could not build an engine from {job.source} (see the {library} log above)"
        )
    return serialized, config


def build_plan(job: BuildJob) -> BuiltEngine:
    """Build ``job.target`` with TensorRT, then deserialize it once to read its layer information.

    The timing cache (:func:`timing_cache_path`) is read before the build when it exists and
    written back after it. Builder optimization level, workspace, weight streaming and refit come
    from ``job.settings``.

    Raises:
        BuildError: the parser or the builder failed (the parser's errors are listed), or the
            built plan cannot be deserialized, or its layer information is not the documented JSON.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    timing_cache = timing_cache_path(job.run_dir, job.machine)
    cache_loaded = bool(timing_cache and timing_cache.is_file())

    def configure(config: Any) -> None:
        nonlocal cache_loaded
        apply_builder_options(trt, config, job.settings)
        cache = config.create_timing_cache(timing_cache.read_bytes() if cache_loaded else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # A cache from another TensorRT version or GPU: start empty rather than mix tactics.
            cache_loaded = False
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized, config = build_serialized(trt, logger, job, configure, flags=network_flags(trt))
    atomic_write_bytes(job.target, memoryview(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise BuildError(f"TensorRT built {job.target.name} but cannot deserialize it to inspect it")
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        layers, detailed = parse_layer_information(text)
    except LayerInfoError as err:
        raise BuildError(f"{job.target.name}: {err}") from None
    return BuiltEngine(
        options={
            **recorded_options(job.settings),
            "timing_cache": timing_cache.name if timing_cache else None,
            "timing_cache_reused": cache_loaded,
        },
        layers=summarize(layers, detailed, quantized_linear_nodes(job.source) if job.fp8 else []),
        device_memory_bytes=int(engine.device_memory_size_v2),
        streamable_weights_bytes=int(engine.streamable_weights_size),
    )
