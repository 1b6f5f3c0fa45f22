"""TensorRT plan builder, and the layer information read back from each plan.

Written against the TensorRT 10 and 11 Python API (checked against the real bindings of both by
``tests/unit/test_tensorrt_api.py``). ``tensorrt`` is imported inside functions only.

:func:`build_serialized` is what TensorRT and TensorRT-RTX builds share (``tensorrt_rtx`` builds
through it too). The ONNX parser reads the model from its file (so external weights resolve),
into a strongly typed network: layer precisions come from the ONNX dtypes and FP8 from its Q/DQ
nodes. TensorRT 11 removed weak typing (``BuilderFlag.FP16/BF16/FP8``, precision constraints) and makes every
network strongly typed; TensorRT 10 needs the ``STRONGLY_TYPED`` creation flag. One optimization
profile per engine; the timing cache is loaded before and saved after the build. Builder
optimization level 4 by default, as ModelOpt's and NVIDIA's demo/Diffusion FP8 diffusion builds.

After the build the plan is deserialized once more to read its layer information
(``ProfilingVerbosity.DETAILED``, JSON) into a :class:`~sd35trt.backends.layers.LayerReport`,
and its activation memory and streamable weight sizes, all recorded in the engine manifest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35trt.artifacts.files import atomic_write_bytes
from sd35trt.backends.layers import LayerInfoError, LayerReport, parse_layer_information, summarize
from sd35trt.backends.machine import MachineInfo
from sd35trt.components import ShapeRange
from sd35trt.config import BuildSettings
from sd35trt.errors import BuildError

Progress = Callable[[str], None]
_GIB = 1 << 30
#: Builder optimization level of FP8 diffusion engines in ModelOpt's and NVIDIA's demo/Diffusion builds.
DEFAULT_OPTIMIZATION_LEVEL = 4


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings, from ``config.build``."""

    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    workspace_gib: float | None = None
    weight_streaming: bool = False
    refit: bool = False

    @classmethod
    def from_settings(cls, settings: BuildSettings) -> TrtBuildOptions:
        return cls(
            optimization_level=settings.optimization_level,
            workspace_gib=settings.workspace_gib,
            weight_streaming=settings.weight_streaming,
            refit=settings.refit,
        )

    def to_json(self) -> dict:
        """What the engine manifest records; the weight streaming budget too (run-time setting)."""
        return {
            "builder_optimization_level": self.optimization_level,
            "workspace_bytes": int(self.workspace_gib * _GIB) if self.workspace_gib else None,
            "weight_streaming": self.weight_streaming,
            "refit": self.refit,
            "strongly_typed": True,
            "profiling_verbosity": "detailed",
        }


def apply_builder_options(trt: Any, config: Any, options: TrtBuildOptions) -> None:
    """Set ``options`` on a TensorRT or TensorRT-RTX ``IBuilderConfig``."""
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * _GIB))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)


@dataclass(frozen=True)
class PlanFacts:
    """What the built plan itself says, read back after the build.

    Attributes:
        layers: the layer report (precision per layer, FP8 GEMMs, fused attention).
        device_memory_bytes: activation memory at the largest profile (``device_memory_size_v2``).
        streamable_weights_bytes: weights weight streaming can keep off the device.
    """

    layers: LayerReport
    device_memory_bytes: int
    streamable_weights_bytes: int


def timing_cache_path(run_dir: Path, machine: MachineInfo) -> Path | None:
    """Timing caches are valid per TensorRT version and GPU: one file per pair, reused by rebuilds."""
    if machine.gpu is None or machine.tensorrt_version is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine.gpu.name).strip("-").lower()
    return run_dir / "timing_cache" / f"tensorrt-{machine.tensorrt_version}_{slug}_{machine.gpu.sm}.cache"


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])


def network_flags(trt: Any) -> int:
    """Creation flags of a strongly typed network on TensorRT 10 and 11.

    TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored, so pass
    none); TensorRT 10 needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
    """
    if tensorrt_major(trt.__version__) >= 11:
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
    onnx_path: Path,
    shapes: Mapping[str, ShapeRange],
    configure: Callable[[Any], None],
    *,
    flags: int,
    library: str = "TensorRT",
    progress: Progress | None = None,
    label: str = "",
) -> tuple[Any, Any]:
    """Parse an ONNX file into a strongly typed network and build its serialized plan.

    What TensorRT and TensorRT-RTX builds share: the parser reads the model from its file (so
    external weights resolve), one optimization profile, detailed profiling verbosity (layer
    names, types and tactics: what ``inspect`` and the FP8 check read), progress reports.

    Args:
        trt: the ``tensorrt`` or ``tensorrt_rtx`` module.
        logger: the builder's ``ILogger``.
        onnx_path: the model.
        shapes: the optimization profile, per input.
        configure: sets the library's own builder options on the ``IBuilderConfig``.
        flags: network creation flags (see :func:`network_flags`; TensorRT-RTX: 0).
        library: ``TensorRT`` or ``TensorRT-RTX``, for messages.
        progress: receives progress lines.
        label: prefix of the progress lines (e.g. ``[4/5] transformer``).

    Returns:
        The serialized plan (``IHostMemory``) and the builder config (what the build left in
        it: the timing cache).

    Raises:
        BuildError: the parser rejected the model (its errors listed), the profile was refused,
            or the builder failed.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{library}'s ONNX parser rejected {onnx_path}: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    configure(config)
    add_profile(builder, config, shapes)
    # The monitor (like the parser, which owns the parsed weights) must outlive the build.
    monitor = _progress_monitor(trt, progress, label) if progress is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"{library} could not build an engine from {onnx_path} (see the {library} log above)"
        )
    return serialized, config


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    shapes: Mapping[str, ShapeRange],
    options: TrtBuildOptions,
    timing_cache: Path | None = None,
    progress: Progress | None = None,
    label: str = "",
    quantized_nodes: list[str] | None = None,
) -> tuple[dict[str, Any], PlanFacts]:
    """Build a TensorRT plan from an ONNX file and read its layer information back.

    Args:
        onnx_path: the model; external weights are resolved beside it.
        plan_path: where to write the serialized plan.
        shapes: the optimization profile, per input.
        options: builder optimization level, workspace limit, weight streaming, refit.
        timing_cache: read before the build when it exists, written back after it.
        progress: receives progress lines.
        label: prefix of the progress lines (e.g. ``[4/5] transformer``).
        quantized_nodes: the ONNX's FP8-quantized MatMul / Gemm nodes, for the layer report.

    Returns:
        The options to record in the engine manifest (builder settings, timing cache use), and
        what the plan says about itself.

    Raises:
        BuildError: the parser or the builder failed (the parser's errors are listed), or the
            built plan cannot be read back.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    cache_loaded = bool(timing_cache and timing_cache.is_file())

    def configure(config: Any) -> None:
        nonlocal cache_loaded
        apply_builder_options(trt, config, options)
        cache = config.create_timing_cache(timing_cache.read_bytes() if cache_loaded else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # A cache from another TensorRT version or GPU: start empty rather than mix tactics.
            cache_loaded = False
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized, config = build_serialized(
        trt, logger, onnx_path, shapes, configure, flags=network_flags(trt), progress=progress, label=label
    )
    atomic_write_bytes(plan_path, memoryview(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    facts = read_plan_facts(trt, logger, serialized, plan_path.name, quantized_nodes or [])
    recorded = {
        **options.to_json(),
        "timing_cache": timing_cache.name if timing_cache else None,
        "timing_cache_reused": cache_loaded,
    }
    return recorded, facts


def read_plan_facts(trt: Any, logger: Any, plan: Any, name: str, quantized_nodes: list[str]) -> PlanFacts:
    """Deserialize a just-built plan and read its layer information and memory sizes.

    Raises:
        BuildError: the plan does not deserialize, or its layer information is not the
            documented JSON.
    """
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BuildError(f"TensorRT built {name} but cannot deserialize it to inspect it")
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        layers, detailed = parse_layer_information(text)
    except LayerInfoError as err:
        raise BuildError(f"{name}: {err}") from None
    return PlanFacts(
        layers=summarize(layers, detailed, quantized_nodes),
        device_memory_bytes=int(engine.device_memory_size_v2),
        streamable_weights_bytes=int(engine.streamable_weights_size),
    )
