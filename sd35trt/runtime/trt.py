"""TensorRT backend: the plan builder and the engine runner.

Written against the TensorRT 10 and 11 Python API. ``tensorrt`` is imported inside functions only.

Building: the ONNX parser reads the model from its file (so external weights resolve), into a
strongly typed network: layer precisions come from the ONNX dtypes and FP8 from its Q/DQ nodes.
TensorRT 11 removed weak typing (``BuilderFlag.FP16/BF16/FP8``, precision constraints) and makes
every network strongly typed, its ``STRONGLY_TYPED`` creation flag being a no-op; TensorRT 10
needs the flag. One optimization profile per engine; the timing cache is loaded before and saved
after the build.

Running: ``set_input_shape`` / ``set_tensor_address`` on torch CUDA tensors and
``execute_async_v3`` on one stream; optionally a CUDA graph captured per input shapes and
replayed (TensorRT needs one ``execute_async_v3`` before capture to finish deferred setup).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.components import ComponentSpec, ShapeRange
from sd35trt.errors import BuildError, DeviceOutOfMemoryError, IncompatibleEngineError, VerificationError
from sd35trt.manifest import atomic_write_bytes
from sd35trt.runtime.engine import Engine

if TYPE_CHECKING:
    import torch

Progress = Callable[[str], None]
_GIB = 1 << 30


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings, from ``config.build``."""

    optimization_level: int = 3
    workspace_gib: float | None = None
    weight_streaming: bool = False
    refit: bool = False

    def to_json(self) -> dict:
        return {
            "builder_optimization_level": self.optimization_level,
            "workspace_bytes": int(self.workspace_gib * _GIB) if self.workspace_gib else None,
            "weight_streaming": self.weight_streaming,
            "refit": self.refit,
        }


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


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    shapes: Mapping[str, ShapeRange],
    options: TrtBuildOptions,
    timing_cache: Path | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Build a TensorRT plan from an ONNX file.

    Args:
        onnx_path: the model; external weights are resolved beside it.
        plan_path: where to write the serialized plan.
        shapes: the optimization profile, per input.
        options: builder optimization level, workspace limit, weight streaming, refit.
        timing_cache: read before the build when it exists, written back after it.
        progress: receives progress lines.
        label: prefix of the progress lines (e.g. ``[4/5] transformer``).

    Returns:
        The options to record in the engine manifest (builder settings, timing cache use).

    Raises:
        BuildError: the parser or the builder failed (the parser's errors are listed).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors or 'no details'}")

    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * _GIB))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    add_profile(builder, config, shapes)

    cache_loaded = bool(timing_cache and timing_cache.is_file())
    cache = config.create_timing_cache(timing_cache.read_bytes() if cache_loaded else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another TensorRT version or GPU: start empty rather than mix tactics.
        cache_loaded = False
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    # The monitor (like the parser, which owns the parsed weights) must outlive the build.
    monitor = _progress_monitor(trt, progress, label) if progress is not None else None
    if monitor is not None:
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    atomic_write_bytes(plan_path, memoryview(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return {
        **options.to_json(),
        "strongly_typed": True,
        "timing_cache": timing_cache.name if timing_cache else None,
        "timing_cache_reused": cache_loaded,
    }


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.FP8: torch.float8_e4m3fn,
    }
    try:
        return table[dtype]
    except KeyError:
        raise TypeError(f"TensorRT dtype {dtype} has no torch equivalent") from None


class TrtEngine(Engine):
    """One component's TensorRT engine, run on torch CUDA tensors on one stream.

    Construct only with a plan that :func:`sd35trt.runtime.engines.verify_engines` accepted;
    ``activate`` checks the sha256 of the bytes it reads once more before TensorRT sees them.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        path: str | Path,
        sha256: str,
        *,
        device: str = "cuda",
        use_cuda_graph: bool = False,
        weight_streaming_budget: int | None = None,
    ) -> None:
        """
        Args:
            spec: the component's I/O contract.
            path: the plan file.
            sha256: its sha256 from the engine manifest.
            device: the CUDA device to run on.
            use_cuda_graph: capture a CUDA graph for the current input shapes and replay it while
                they stay the same (pays off for static shapes).
            weight_streaming_budget: bytes of streamable weights kept on the device (plans built
                with weight streaming only); ``None`` keeps TensorRT's default.
        """
        super().__init__(spec)
        self.path = Path(path)
        self.sha256 = sha256
        self.device = device
        self.use_cuda_graph = use_cuda_graph
        self.weight_streaming_budget = weight_streaming_budget
        self._state: dict[str, Any] = {}

    def activate(self) -> None:
        # The bytes TensorRT deserializes are the bytes hashed here, before tensorrt is even imported.
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise VerificationError(
                f"{self.path} sha256 {digest[:12]}… does not match the engine manifest's {self.sha256[:12]}… "
                "(modified since verification); rebuild with `sd35trt build`"
            )
        import tensorrt as trt
        import torch

        device = torch.device(self.device)
        with torch.cuda.device(device):
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise IncompatibleEngineError(
                    f"TensorRT {trt.__version__} could not deserialize {self.path.name}: "
                    "rebuild with `sd35trt build`"
                )
            if self.weight_streaming_budget is not None:
                engine.weight_streaming_budget_v2 = self.weight_streaming_budget
            context = engine.create_execution_context()
            if context is None:
                raise DeviceOutOfMemoryError(
                    f"out of memory creating the execution context of {self.path.name}"
                )
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            expected = (sorted(self.spec.input_names), sorted(self.spec.output_names))
            if (sorted(inputs), sorted(outputs)) != expected:
                raise VerificationError(
                    f"{self.path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, the {self.name} "
                    f"spec expects {sorted(self.spec.input_names)} and {sorted(self.spec.output_names)}; "
                    "rebuild with `sd35trt build`"
                )
            self._state = {
                "logger": logger,
                "runtime": runtime,
                "engine": engine,
                "context": context,
                "stream": torch.cuda.Stream(device),
                "device": device,
                "dtypes": {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names},
                "graph": None,  # (input shapes, CUDAGraph, static inputs, static outputs)
            }
        self.active = True

    def _bind(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses for ``inputs``; allocate and bind the outputs."""
        import torch

        s = self._state
        context = s["context"]
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(
                    f"engine {self.name}: input {name} shape {tuple(t.shape)} is outside its profile"
                )
            context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=s["dtypes"][name], device=s["device"])
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self) -> None:
        s = self._state
        if not s["context"].execute_async_v3(s["stream"].cuda_stream):
            raise RuntimeError(f"engine {self.name}: execute_async_v3 failed (see the TensorRT log)")

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        if not self._state:
            raise RuntimeError(f"engine {self.name} is not active: call activate() first")
        missing = [n for n in self.spec.input_names if n not in feeds]
        if missing:
            raise ValueError(f"engine {self.name}: missing inputs {missing}")
        s = self._state
        device, stream = s["device"], s["stream"]
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            inputs = {
                n: feeds[n].detach().to(device=device, dtype=s["dtypes"][n]).contiguous()
                for n in self.spec.input_names
            }
            shapes = tuple(tuple(t.shape) for t in inputs.values())
            stream.wait_stream(current)
            if self.use_cuda_graph:
                outputs = self._run_graph(inputs, shapes)
            else:
                outputs = self._bind(inputs)
                self._execute()
            for t in (*inputs.values(), *outputs.values()):
                t.record_stream(stream)
            current.wait_stream(stream)
        return outputs

    def _run_graph(self, inputs: Mapping[str, torch.Tensor], shapes: tuple) -> dict[str, torch.Tensor]:
        import torch

        s = self._state
        stream = s["stream"]
        if s["graph"] is None or s["graph"][0] != shapes:
            with torch.cuda.stream(stream):  # ordered after the inputs: `stream` waited for them
                static_in = {n: t.clone() for n, t in inputs.items()}
                static_out = self._bind(static_in)
                self._execute()  # TensorRT finishes deferred setup on the first enqueue: not capturable
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self._execute()
            s["graph"] = (shapes, graph, static_in, static_out)
        _, graph, static_in, static_out = s["graph"]
        with torch.cuda.stream(stream):
            for n, t in inputs.items():
                static_in[n].copy_(t, non_blocking=True)
            graph.replay()
            return {n: t.clone() for n, t in static_out.items()}

    def deactivate(self) -> None:
        self._state = {}
        self.active = False
